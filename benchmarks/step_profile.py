"""Where a training step's time goes, by kind of operator: full fine-tuning against peftkit's LoRA.

Every operator of one profiled step (torch.profiler, self CPU time on the main thread) is put in
one kind: matrix multiplies, attention, the loss, the optimizer, random draws (dropout masks),
the autograd engine's own bookkeeping, elementwise and normalisation work, memory (copies, fills,
allocations), or other. What the step's wall time holds beyond the operators' self time is
Python and dispatch (`outside operators`). The difference between the arms, kind by kind, is
what LoRA adds or saves; what both arms share is the work outside the multiplies that no
method removes. The arms run on the same base weights and batches, each step timed in
interleaved rounds; then `--profiled` steps of each run under the profiler.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/step_profile.py    # smollm2-135m
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

from common import (
    adamw_step,
    add_step_flags,
    base_parser,
    batches_of,
    interleaved,
    markdown_table,
    median,
    parse_with_smoke,
    setup,
    timed,
    write_json,
)

# (kind, substrings of an operator's name), first match wins.
KINDS = (
    ("matrix multiplies", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("adamw", "adam_", "_foreach")),
    ("random draws", ("bernoulli", "uniform_", "aten::rand", "normal_", "multinomial")),
    ("autograd engine", ("autograd::", "AccumulateGrad")),
    (
        "memory",
        (
            "copy_",
            "fill_",
            "zero_",
            "aten::empty",
            "clone",
            "_to_copy",
            "aten::cat",
            "contiguous",
            "resize_",
            "set_",
        ),
    ),  # fmt: skip
    (
        "elementwise and norms",
        (
            "aten::add",
            "aten::mul",
            "aten::sub",
            "aten::div",
            "aten::pow",
            "rsqrt",
            "aten::mean",
            "aten::sum",
            "silu",
            "aten::neg",
            "aten::sigmoid",
            "aten::where",
            "aten::exp",
            "aten::sqrt",
            "aten::ge",
            "aten::lt",
            "aten::gt",
            "aten::eq",
            "masked",
            "aten::sin",
            "aten::cos",
            "embedding",
            "threshold",
        ),
    ),  # fmt: skip
)


def kind_of(name: str) -> str:
    """The kind of one operator, by its name."""
    for kind, parts in KINDS:
        if any(part in name for part in parts):
            return kind
    return "other"


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    add_step_flags(parser, steps=3, rounds=2, batch_size=4, seq_len=128)
    parser.add_argument("--profiled", type=int, default=2, help="steps of each arm profiled")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (all linear layers)")
    return parse_with_smoke(parser, model="tiny-llama", steps=1, rounds=1, seq_len=16, profiled=1)


def profile_kinds(step: Any, steps: int) -> tuple[dict[str, float], dict[str, list], float]:
    """Milliseconds per step by kind, each kind's top operators, and the steps' wall ms."""
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) * 1e3 / steps
    kinds: dict[str, float] = defaultdict(float)
    ops: dict[str, list] = defaultdict(list)
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        kind = kind_of(event.key)
        kinds[kind] += ms
        ops[kind].append((event.key, ms, event.count // steps))
    top = {k: [{"op": o, "ms": m, "calls": c} for o, m, c in sorted(v, key=lambda x: -x[1])[:5]]
           for k, v in ops.items()}  # fmt: skip
    kinds["outside operators"] = max(0.0, wall - sum(kinds.values()))
    return dict(kinds), top, wall


def main() -> None:
    """Time both arms interleaved, profile each, print and write the time by kind."""
    args = parse_args()
    setup(args)

    import peftkit
    from peftkit.models import load_model

    model, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    batches = batches_of(tokenizer, args.batch_size, args.seq_len, 4)
    config = peftkit.LoraConfig(rank=args.rank, target_modules="all-linear")
    lora = peftkit.apply(copy.deepcopy(model), config)
    model.requires_grad_(True)
    steps = {
        "full fine-tuning": adamw_step(model, batches),
        "peftkit LoRA": adamw_step(lora, batches),
    }
    for step in steps.values():
        step()  # AdamW's state is allocated on the first step: not timed
    seconds = interleaved({name: timed(s, args.steps) for name, s in steps.items()}, args.rounds)
    profiled = {name: profile_kinds(s, args.profiled) for name, s in steps.items()}
    names = [kind for kind, _ in KINDS] + ["other", "outside operators"]
    full_kinds, lora_kinds = profiled["full fine-tuning"][0], profiled["peftkit LoRA"][0]
    rows = [
        [kind, f"{full_kinds.get(kind, 0):.0f}", f"{lora_kinds.get(kind, 0):.0f}",
         f"{lora_kinds.get(kind, 0) - full_kinds.get(kind, 0):+.0f}"]
        for kind in names
    ]  # fmt: skip
    walls = {name: profiled[name][2] for name in steps}
    rows.append(["profiled step (wall)", f"{walls['full fine-tuning']:.0f}",
                 f"{walls['peftkit LoRA']:.0f}",
                 f"{walls['peftkit LoRA'] - walls['full fine-tuning']:+.0f}"])  # fmt: skip
    timed_medians = {name: median(s) for name, s in seconds.items()}
    print(f"{args.model}, AdamW, batch {args.batch_size} x {args.seq_len}, {args.threads} threads; "
          f"LoRA r {args.rank} on all linear layers; ms per step")  # fmt: skip
    print(markdown_table(["kind", "full fine-tuning", "peftkit LoRA", "LoRA - full"], rows))
    ratio = timed_medians["peftkit LoRA"] / timed_medians["full fine-tuning"]
    print(
        f"timed (unprofiled) median step: full {timed_medians['full fine-tuning']:.3f} s, "
        f"LoRA {timed_medians['peftkit LoRA']:.3f} s, ratio {ratio:.3f}"
    )
    results = {
        "ms_per_step_by_kind": {name: profiled[name][0] for name in steps},
        "top_operators_by_kind": {name: profiled[name][1] for name in steps},
        "profiled_wall_ms": walls, "timed_step_seconds": seconds,
        "median_step_seconds": timed_medians, "lora_over_full": ratio,
        "kinds": {kind: list(parts) for kind, parts in KINDS},
    }  # fmt: skip
    print(f"wrote {write_json('step_profile', args, results, args.output)}")


if __name__ == "__main__":
    main()
