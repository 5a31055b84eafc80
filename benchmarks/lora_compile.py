"""Does torch.compile (inductor, CPU) pay for LoRA training? Eager against compiled step times.

Issue 17: the work outside the multiplies (~550 ms of a SmolLM2 LoRA step) is what a compiler
would fuse. Arms, on the same base weights, LoRA init, batches of real review text and AdamW:
peftkit's LoRA (fast forward) and PEFT's own forward (`fast_path: false`), each eager and as
`torch.compile(model)` (inductor, default mode, dynamic=False). A compiled arm's first step (the
compile) and warm-up steps are reported apart; after one settling step per arm, the arms take
turns, `--steps` steps per round. Graph breaks come from torch._dynamo's counters; a failed
compile is recorded with its error. The check (after timing, each after torch._dynamo.reset)
compares a compiled dropout-0 copy with an eager one: first loss, LoRA gradients, loss after one
AdamW update (same seed; inductor reorders float sums: ~1e-6). Inductor caches into a fresh
folder, so compile times are a first run's.

    for arm in peft fast; do                  # one compile per locked job, each < 15 minutes
      flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lora_compile.py --compile $arm \
        --no-check --output benchmarks/results/lora_compile_$arm.json
      flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lora_compile.py --compile $arm \
        --check-only --output benchmarks/results/lora_compile_check_$arm.json
    done
    .venv/bin/python benchmarks/lora_compile.py --model tiny-llama --steps 2 --rounds 1  # smoke

Time on 2 cores: the tiny-llama smoke ~2.5 minutes (~30 s a compile); a 4-layer cut of SmolLM2
compiled PEFT's forward in 39 s (backward 9 s), ~linear in layers, so ~5-7 minutes for all 30
(a probe of the full model stopped at 250 s unfinished). A timing job (one compile, 3 arms x 13
steps of ~2.5 s) ~8-10 minutes, a check job ~6-8 minutes: ~30-36 minutes for the four jobs.
Measured since (issue 33): the whole fast path compiled in 161 s at batch 4 x 256, and a job of
two arms (`--no-peft-eager`), 3 rounds x 2 steps, took 4 minutes.
"""

from __future__ import annotations

import copy
import os
import tempfile
import traceback
from typing import Any

from common import (
    adamw_step,
    base_parser,
    clock,
    interleaved,
    markdown_table,
    median,
    packed_lm_features,
    parse_with_smoke,
    setup,
    timed,
    write_json,
)

FAST, PEFT = "peftkit LoRA (fast path)", "PEFT forward (fast_path false)"


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--targets", default="all-linear", help="LoRA target_modules")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of timed arms")
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend (smoke: eager, tracing only)"
    )
    parser.add_argument("--dynamic", choices=["false", "true", "auto"], default="false",
                        help="torch.compile's dynamic (auto: None)")  # fmt: skip
    parser.add_argument(
        "--compile", choices=["peft", "fast", "both"], default="both", help="forwards to compile"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the dropout-0 equality check")
    parser.add_argument(
        "--no-peft-eager", action="store_true", help="no eager PEFT arm when PEFT is not compiled"
    )
    parser.add_argument("--check-only", action="store_true", help="only the dropout-0 check")
    smoke = {
        "model": "tiny-llama",
        "steps": 1,
        "rounds": 1,
        "warmup": 0,
        "seq_len": 16,
        "compile": "peft",
        "backend": "eager",
        "no_check": True,
    }
    return parse_with_smoke(parser, **smoke)


def lora_model(base: Any, args: Any, fast: bool, dropout: float) -> Any:
    """A LoRA copy of the base; the seed is reset first, so every copy starts with the same A."""
    import torch

    import peftkit

    torch.manual_seed(args.seed)
    options = {"rank": args.rank, "target_modules": args.targets, "dropout": dropout}
    return peftkit.apply(copy.deepcopy(base), peftkit.LoraConfig(**options, fast_path=fast))


def compiled(model: Any, args: Any) -> Any:
    """torch.compile of the model with the flags asked for (nothing compiles until it runs)."""
    import torch

    dynamic = {"false": False, "true": True, "auto": None}[args.dynamic]  # auto: dynamo decides
    if args.backend != "inductor":  # a mode is inductor's
        return torch.compile(model, backend=args.backend, dynamic=dynamic)
    return torch.compile(model, mode=args.mode, dynamic=dynamic)


def dynamo_counts() -> dict[str, Any]:
    """Graph breaks (reason -> count) and compiled graphs since the counters were cleared."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    frames = counters["frames"]
    return {"graph_breaks": sum(breaks.values()), "break_reasons": breaks,
            "unique_graphs": counters["stats"]["unique_graphs"],
            "frames_ok": frames["ok"], "frames_total": frames["total"]}  # fmt: skip


def failure(error: BaseException) -> str:
    """An error's type, message and innermost frames, short enough for the JSON."""
    text = "".join(traceback.format_exception(error))
    return text if len(text) < 4000 else text[:1500] + "\n...\n" + text[-2500:]


def start_arm(model: Any, batches: list[dict], args: Any, compile_it: bool) -> dict[str, Any]:
    """First step (the compile, when compiling) and the warm-up steps, timed apart, with dynamo's
    counts; {"error": ...} instead when the arm fails to run."""
    from torch._dynamo.utils import counters

    # Counts per arm. No torch._dynamo.reset(): it would throw away the arms compiled before.
    counters.clear()
    try:
        if compile_it:
            settle_siblings(model, batches[0])
        step = adamw_step(compiled(model, args) if compile_it else model, batches)
        start = clock()
        first_loss = step()
        first = clock() - start
        warmup = timed(step, args.warmup)()
    except Exception as error:  # noqa: BLE001 (a failed compile is a result, not a crash)
        return {"error": failure(error), **(dynamo_counts() if compile_it else {})}
    counts = dynamo_counts() if compile_it else {}
    return {"step": step, "first_step_seconds": first, "first_loss": first_loss,
            "warmup_seconds": warmup, **counts}  # fmt: skip


def settle_siblings(model: Any, batch: dict) -> None:
    """Two eager forwards before compiling: the fast path groups its sibling layers at the start
    of the second and removes its recorder's hooks, which would otherwise break the first compiled
    forwards and force a second compile once gone (a no-op for PEFT's forward)."""
    import torch

    with torch.no_grad():
        for _ in range(2):
            model(**batch)


def one_step(model: Any, batch: dict) -> tuple[float, Any, float]:
    """Loss, LoRA gradients (one vector) and the next loss after an AdamW update, on one batch."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainable])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), grads, float(model(**batch).loss.detach())


def check(base: Any, batches: list[dict], args: Any, fast: bool) -> dict[str, Any]:
    """A compiled dropout-0 copy against an eager one: do they compute the same step?"""
    from torch._dynamo.utils import counters

    eager = one_step(lora_model(base, args, fast, 0.0), batches[0])
    counters.clear()
    start = clock()
    try:
        done = one_step(compiled(lora_model(base, args, fast, 0.0), args), batches[0])
    except Exception as error:  # noqa: BLE001
        return {"error": failure(error), **dynamo_counts()}
    seconds = clock() - start
    gap = float((done[1] - eager[1]).norm() / eager[1].norm().clamp_min(1e-30))
    return {"eager_loss": eager[0], "compiled_loss": done[0],
            "loss_difference": abs(done[0] - eager[0]), "gradient_relative_difference": gap,
            "eager_loss_after_update": eager[2], "compiled_loss_after_update": done[2],
            "loss_after_update_difference": abs(done[2] - eager[2]),
            "compile_and_two_forwards_seconds": seconds, **dynamo_counts()}  # fmt: skip


def load_batches(args: Any) -> tuple[Any, list[dict]]:
    """The base model and four fixed batches of real review text."""
    import torch

    from peftkit.models import load_model

    model, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    features = packed_lm_features(tokenizer, args.batch_size * 4, args.seq_len)
    batches = []
    for start in range(0, len(features), args.batch_size):
        chunk = features[start : start + args.batch_size]
        ids = torch.tensor([f["input_ids"] for f in chunk])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return model, batches


def main() -> None:
    """Check, start (compile) and time every arm; print the table and the failures."""
    args = parse_args()
    # Set before torch's inductor reads its config, so no earlier run's kernels are reused.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    setup(args)
    import torch

    base, batches = load_batches(args)
    starts: dict[str, dict[str, Any]] = {}
    chosen = [(label, fast) for label, fast in ((PEFT, False), (FAST, True))
              if args.compile in ("both", "fast" if fast else "peft")]  # fmt: skip
    for label, fast in () if args.check_only else ((PEFT, False), (FAST, True)):  # PEFT first
        for compile_it in [False, True] if (label, fast) in chosen else [False]:
            name = f"{label}, {'compiled' if compile_it else 'eager'}"
            if args.no_peft_eager and not fast and (label, fast) not in chosen:
                continue  # two arms only: the fast path eager and compiled (a shorter job)
            model = lora_model(base, args, fast, args.dropout)
            starts[name] = start_arm(model, batches, args, compile_it)
            print(f"started {name}: first step {starts[name].get('first_step_seconds', 'failed')}")
    from torch._dynamo.utils import counters

    # One more step each: recompiles that a later arm's compile caused land here, not in timing.
    for start in (s for s in starts.values() if "step" in s):
        start["settle_seconds"] = timed(start["step"], 1)()[0]
    counters.clear()
    arms = {name: timed(s["step"], args.steps) for name, s in starts.items() if "step" in s}
    seconds = interleaved(arms, args.rounds) if arms else {}  # none with --check-only
    recompiled = counters["stats"]["unique_graphs"]  # compiles while timing: should be 0
    for start in starts.values():
        start.pop("step", None)  # free the timed models before the check builds its own
    checks = {}
    for label, fast in () if args.no_check else chosen:
        torch._dynamo.reset()  # timing is done: each check compiles as in a fresh process
        result = checks[f"{label}, compiled"] = check(base, batches, args, fast)
        print(f"check {label}:", {k: v for k, v in result.items() if k != "break_reasons"})
    reference = median(seconds[f"{FAST}, eager"]) if f"{FAST}, eager" in seconds else None
    results = [summary(n, s, seconds, reference) for n, s in starts.items()]
    print(
        f"\n{args.model}, AdamW, batch {args.batch_size} x {args.seq_len}, {args.threads} "
        f"threads; LoRA r {args.rank} on {args.targets}, dropout {args.dropout:g}; compile "
        f"mode {args.mode}, dynamic={args.dynamic}; {args.rounds} rounds x {args.steps} steps"
    )
    header = ["arm", "first step s", "median step s", "/ fast eager", "/ own eager",
              "graphs", "graph breaks", "break-even steps"]  # fmt: skip
    print(markdown_table(header, [table_row(entry) for entry in results]))
    for entry in [*results, *({"arm": f"check of {n}", **c} for n, c in checks.items())]:
        for reason, count in entry.get("break_reasons", {}).items():
            print(f"graph break in {entry['arm']} ({count}x): {reason.splitlines()[0][:200]}")
        if "error" in entry:
            print(f"{entry['arm']} failed:\n{entry['error'][-1500:]}")
    print(f"graphs compiled while timing: {recompiled}")
    results = {"arms": results, "graphs_compiled_while_timing": recompiled, "checks": checks}
    print(f"wrote {write_json('lora_compile', args, results, args.output)}")


def summary(name: str, start: dict, seconds: dict, reference: float | None) -> dict:
    """An arm's JSON entry: its start, step times, ratios and the steps to repay a compile."""
    entry = {"arm": name, **{k: v for k, v in start.items() if k != "step"}}
    if name not in seconds:
        return entry
    step = median(seconds[name])
    eager = median(seconds.get(name.replace("compiled", "eager"), [float("nan")]))
    # A compiled arm's overhead: what its first and warm-up steps took beyond its steady step.
    overhead = start["first_step_seconds"] + sum(start["warmup_seconds"])
    overhead -= (1 + len(start["warmup_seconds"])) * step
    repaid = "compiled" in name and eager > step
    return entry | {"median_step_seconds": step, "step_seconds": seconds[name],
                    "ratio_to_fast_eager": step / reference if reference else None,
                    "ratio_to_own_eager": step / eager,
                    "break_even_steps": overhead / (eager - step) if repaid else None}  # fmt: skip


def table_row(entry: dict) -> list[str]:
    """An arm's row of the printed table."""
    counts = [str(entry.get("unique_graphs", "")), str(entry.get("graph_breaks", ""))]
    if "median_step_seconds" not in entry:
        return [entry["arm"], "failed", "", "", "", *counts, ""]
    ratio, even = entry["ratio_to_fast_eager"], entry["break_even_steps"]
    return [entry["arm"], f"{entry['first_step_seconds']:.2f}",
            f"{entry['median_step_seconds']:.3f}", "" if ratio is None else f"{ratio:.3f}",
            f"{entry['ratio_to_own_eager']:.3f}", *counts,
            "" if even is None else f"{even:.0f}"]  # fmt: skip


if __name__ == "__main__":
    main()
