"""LoRA step time against full fine-tuning's and against HF PEFT's own LoRA modules, with profiles.

Theory: a training step costs about 6N FLOPs a token with every weight training (forward 2N,
backward 2N for input gradients and 2N for weight gradients) and 4N with a frozen base (no weight
gradients), so LoRA's step should take about 2/3 of full fine-tuning's, a little less once full
fine-tuning's AdamW update over every weight is counted. Arms: full fine-tuning, then for each
dropout asked for, peftkit's LoRA (`peftkit.apply`, its fast forward) and PEFT's own LoRA modules
with the same rank, alpha, targets and dropout (`peft.get_peft_model` on the PEFT config peftkit
builds, PEFT's forward). Every arm uses the same base weights, the same fixed-length chunks of real
review text and AdamW; they alternate round by round. Then one step of each runs under
torch.profiler and the top operators by self CPU time are printed.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lora_vs_full.py    # smollm2-135m
    .venv/bin/python benchmarks/lora_vs_full.py --model tiny-llama --steps 2 --rounds 1
"""

from __future__ import annotations

import copy
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


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    add_step_flags(parser, steps=3, rounds=2, batch_size=4, seq_len=128)
    parser.add_argument("--top", type=int, default=12, help="operators shown per profile")
    parser.add_argument(
        "--targets", default="all-linear", help="LoRA target_modules (default: every linear)"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument(
        "--dropouts", default="default,0", help="LoRA dropouts to time ('default': peftkit's)"
    )
    parser.add_argument(
        "--no-peft", action="store_true", help="leave out the arms of PEFT's own modules"
    )
    return parse_with_smoke(parser, model="tiny-llama", steps=1, rounds=1, seq_len=16, top=3)


def make_step(model: Any, batches: list[dict]) -> Any:
    """One AdamW step over the model's trainable parameters, on the next batch."""
    step = adamw_step(model, batches)
    step()  # the first step allocates AdamW's state: not timed
    return step


def profile(step: Any, top: int) -> tuple[str, list[dict[str, Any]]]:
    """One step under torch.profiler: the table of top operators by self CPU time, and as data."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
    total = sum(e.self_cpu_time_total for e in averages)
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    data = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
             "share": e.self_cpu_time_total / total} for e in rows]  # fmt: skip
    return table, data


def lora_arms(model: Any, args: Any) -> dict[str, tuple[Any, dict[str, Any]]]:
    """{arm: (model, description)}: peftkit's LoRA and PEFT's own, for each dropout asked for."""
    import peft

    import peftkit
    from peftkit.methods import lora

    default = peftkit.LoraConfig().dropout
    arms = {}
    for spec in args.dropouts.split(","):
        dropout = default if spec == "default" else float(spec)
        config = peftkit.LoraConfig(rank=args.rank, target_modules=args.targets, dropout=dropout)
        about = {"rank": args.rank, "targets": args.targets, "dropout": dropout}
        arms[f"peftkit LoRA, dropout {dropout:g}"] = (
            peftkit.apply(copy.deepcopy(model), config),
            {**about, "implementation": "peftkit"},
        )
        if not args.no_peft:
            base = copy.deepcopy(model)
            arms[f"PEFT LoRA, dropout {dropout:g}"] = (
                peft.get_peft_model(base, lora.peft_config(base, config)),
                {**about, "implementation": "peft"},
            )
    return arms


def main() -> None:
    """Time every arm, profile one step of each, print the ratios and the profiles."""
    args = parse_args()
    setup(args)

    from peftkit.models import load_model

    model, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    batches = batches_of(tokenizer, args.batch_size, args.seq_len, 4)
    arms = lora_arms(model, args)
    model.requires_grad_(True)
    models = {"full fine-tuning": (model, {"implementation": "full"}), **arms}
    steps = {name: make_step(m, batches) for name, (m, _) in models.items()}
    seconds = interleaved({name: timed(s, args.steps) for name, s in steps.items()}, args.rounds)
    profiles = {name: profile(s, args.top) for name, s in steps.items()}
    full = median(seconds["full fine-tuning"])
    rows, results = [], []
    for name, (m, about) in models.items():
        step = median(seconds[name])
        peer = name.replace("peftkit", "PEFT")
        vs_peft = step / median(seconds[peer]) if name != peer and peer in seconds else None
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        results.append({"arm": name, **about, "median_step_seconds": step,
                        "ratio_to_full": step / full, "ratio_to_peft": vs_peft,
                        "trainable_parameters": trainable, "step_seconds": seconds[name],
                        "profile": profiles[name][1]})  # fmt: skip
        rows.append([name, f"{step:.3f}", f"{step / full:.3f}",
                     "" if vs_peft is None else f"{vs_peft:.3f}", len(seconds[name])])  # fmt: skip
    print(f"{args.model}, AdamW, batch {args.batch_size} x {args.seq_len}, {args.threads} threads;"
          f" LoRA r {args.rank} on {args.targets}")  # fmt: skip
    header = ["arm", "median step s", "step time / full", "step time / PEFT's", "timed steps"]
    print(markdown_table(header, rows))
    for name, (table, _) in profiles.items():
        print(f"\nTop operators by self CPU time, one step of {name}:\n{table}")
    print(f"wrote {write_json('lora_vs_full', args, {'arms': results}, args.output)}")


if __name__ == "__main__":
    main()
