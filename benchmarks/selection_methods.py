"""Selection methods side by side: full fine-tuning, BitFit, Child-Tuning F and D.

For each method, in its own process (so peak memory is its own): trainable and per-step updated
parameters, optimizer-state bytes (the tensors in optimizer.state), peak process memory, and the
mean AdamW step time as a ratio to full fine-tuning measured in the same run. Child-Tuning D's
Fisher pass is timed separately. Prints a table and writes JSON.

    flock /tmp/peftkit-heavy.lock python benchmarks/selection_methods.py            # smollm2-135m
    python benchmarks/selection_methods.py --model tiny-llama --steps 2           # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import add_smoke_flag, machine, parse_with_smoke

# child_tuning_f trains with its one-pass AdamW (what `peftkit train` uses with AdamW);
# child_tuning_f_hooks masks around torch's AdamW's step instead (the path for any other optimizer).
METHODS = ("full", "bitfit", "child_tuning_f", "child_tuning_f_hooks", "child_tuning_d")
F_MODES = ("child_tuning_f", "child_tuning_f_hooks")


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name, folder or hub id")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per method")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed first steps (state and allocator warm-up)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--reserve-ratio", type=float, default=0.3, help="Child-Tuning p")
    parser.add_argument("--fisher-batches", type=int, default=4, help="D: Fisher pass batches")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--output", default="benchmarks/results/selection_methods.json", help="JSON to write"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS),
        help="methods to run ('full' always runs first: the others are timed against it)",
    )  # fmt: skip
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    add_smoke_flag(parser)
    return parse_with_smoke(
        parser, model="tiny-llama", steps=1, warmup=1, seq_len=16, fisher_batches=1
    )


def batches(vocab_size: int, args: argparse.Namespace, count: int, seed: int) -> list[dict]:
    """Random-token causal-LM batches (timing does not depend on the text)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        ids = torch.randint(4, vocab_size, (args.batch_size, args.seq_len), generator=generator)
        made.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return made


def config_for(method: str, args: argparse.Namespace) -> Any:
    """The peftkit config of a benchmarked method (None: full fine-tuning)."""
    from peftkit.methods.bitfit import BitFitConfig
    from peftkit.methods.child_tuning import ChildTuningConfig

    if method == "bitfit":  # Llama-style models have no biases: add zero ones (see the docs)
        return BitFitConfig(missing_biases="add")
    if method.startswith("child_tuning"):
        mode = "F" if method in F_MODES else "D"
        return ChildTuningConfig(
            mode=mode, reserve_ratio=args.reserve_ratio, fisher_batches=args.fisher_batches
        )
    return None


def run_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train a few steps with one method and measure it."""
    import torch

    import peftkit
    from peftkit.api import applied
    from peftkit.models import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, "causal-lm")
    data = batches(model.config.vocab_size, args, args.warmup + args.steps, seed=0)
    config = config_for(method, args)
    hooks = None
    fisher_seconds = None
    if config is not None:
        model = peftkit.apply(model, config)
        hooks = applied(model).method.training_hooks(model, config)
        if hooks.prepare:
            fisher = batches(model.config.vocab_size, args, args.fisher_batches, seed=1)
            start = time.perf_counter()
            hooks.prepare(model, fisher)
            fisher_seconds = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused=True: Trainer's default optimizer (adamw_torch_fused), what `peftkit train` steps with.
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01, fused=True)
    if method == "child_tuning_f_hooks":  # torch's fused AdamW, masked around its step
        from peftkit.methods.child_tuning import replace_optimizer

        optimizer = replace_optimizer(model, optimizer, one_pass=False)
    elif hooks and hooks.replace_optimizer:
        optimizer = hooks.replace_optimizer(model, optimizer)  # as PeftkitTrainer does
    model.train()
    phases: dict[str, list[float]] = {"forward_backward": [], "hooks": [], "optimizer": []}
    for step, batch in enumerate(data):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        backward_done = time.perf_counter()
        if hooks and hooks.before_optimizer_step:
            hooks.before_optimizer_step(model, step)
        hooks_done = time.perf_counter()
        optimizer.step()
        optimizer_done = time.perf_counter()
        if hooks and hooks.after_optimizer_step:
            hooks.after_optimizer_step(model, step)
        end = time.perf_counter()
        phases["forward_backward"].append(backward_done - start)
        phases["hooks"].append(hooks_done - backward_done + end - optimizer_done)
        phases["optimizer"].append(optimizer_done - hooks_done)
    # The first steps allocate optimizer state and buffers: the median of the rest is the cost.
    timed = {name: statistics.median(values[args.warmup :]) for name, values in phases.items()}
    steps = [sum(parts) for parts in zip(*phases.values(), strict=True)]
    trainable_count = sum(p.numel() for p in trainable)
    ratio = args.reserve_ratio if method in F_MODES else 1.0
    return {
        "method": method,
        "trainable_parameters": trainable_count,
        "updated_per_step": round(trainable_count * ratio),
        "optimizer_state_bytes": sum(
            t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        ),
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_seconds": statistics.median(steps[args.warmup :]),
        "step_seconds_each": steps,
        "phase_seconds": timed,
        "fisher_seconds": fisher_seconds,
    }


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each method in a fresh process, so peak memory is per method."""
    results = []
    for method in ["full", *(m for m in args.methods if m != "full")]:
        if args.smoke:  # one process for all (the numbers mean nothing; the code paths run)
            results.append(run_worker(method, args))
            continue
        command = [sys.executable, __file__, "--worker", method, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    full = results[0]
    for row in results:
        row["step_time_vs_full"] = row["step_seconds"] / full["step_seconds"]
        row["optimizer_state_vs_full"] = (
            row["optimizer_state_bytes"] / full["optimizer_state_bytes"]
        )
    return results


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| method | trainable | updated / step | optimizer state (MiB) | vs full "
        "| peak memory (MiB) "
        "| step (s) | step vs full | fwd+bwd / hooks / optimizer (s) | Fisher pass (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in results:
        fisher = f"{row['fisher_seconds']:.1f}" if row["fisher_seconds"] is not None else "-"
        phases = " / ".join(f"{v:.2f}" for v in row["phase_seconds"].values())
        lines.append(
            f"| {row['method']} | {row['trainable_parameters']:,} | {row['updated_per_step']:,} "
            f"| {row['optimizer_state_bytes'] / 2**20:.1f} | {row['optimizer_state_vs_full']:.3f} "
            f"| {row['peak_memory_bytes'] / 2**20:.0f} | {row['step_seconds']:.2f} "
            f"| {row['step_time_vs_full']:.2f} | {phases} | {fisher} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the comparison (or, with --worker, one method of it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return
    results = run_all(args)
    print(table(results))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "output")}
    settings["load_average_at_end"] = os.getloadavg()  # other processes skew CPU timings
    payload = {"settings": settings, "machine": machine(), "results": results}
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
