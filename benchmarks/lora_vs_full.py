"""LoRA step time as a ratio to full fine-tuning, and where the time goes (torch.profiler).

Theory: a training step costs about 6N FLOPs a token with every weight training (forward 2N,
backward 2N for input gradients and 2N for weight gradients) and 4N with a frozen base (no weight
gradients), so LoRA's step should take about 2/3 of full fine-tuning's, a little less once full
fine-tuning's AdamW update over every weight is counted. Both arms use the same base weights, the
same fixed-length chunks of real review text and AdamW; they alternate round by round. Then one
step of each runs under torch.profiler and the top operators by self CPU time are printed.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lora_vs_full.py    # smollm2-135m
    .venv/bin/python benchmarks/lora_vs_full.py --model tiny-llama --steps 2 --rounds 1
"""

from __future__ import annotations

import copy
from typing import Any

from common import (
    base_parser,
    clock,
    interleaved,
    markdown_table,
    median,
    packed_lm_features,
    setup,
    write_json,
)


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per arm per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per arm")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--top", type=int, default=12, help="operators shown per profile")
    parser.add_argument(
        "--targets", default="all-linear", help="LoRA target_modules (default: every linear)"
    )
    return parser.parse_args()


def make_step(model: Any, batches: list[dict]) -> Any:
    """One AdamW step over the model's trainable parameters, on the next batch."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    model.train()
    position = [0]

    def step() -> None:
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step allocates AdamW's state: not timed
    return step


def timed(step: Any, count: int) -> Any:
    """A function timing `count` calls of step."""

    def run() -> list[float]:
        seconds = []
        for _ in range(count):
            start = clock()
            step()
            seconds.append(clock() - start)
        return seconds

    return run


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


def main() -> None:
    """Time both arms, profile one step of each, print the ratio and the profiles."""
    args = parse_args()
    setup(args)
    import torch

    import peftkit
    from peftkit.models import load_model

    model, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    features = packed_lm_features(tokenizer, args.batch_size * 4, args.seq_len)
    batches = []
    for start in range(0, len(features), args.batch_size):
        chunk = features[start : start + args.batch_size]
        ids = torch.tensor([f["input_ids"] for f in chunk])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    lora_model = peftkit.apply(copy.deepcopy(model), "lora", target_modules=args.targets)
    # The profile of the default arm shows dropout's Bernoulli masks as LoRA's largest extra cost
    # on a CPU; the same adapters without dropout measure how much of the gap that is.
    plain_model = peftkit.apply(
        copy.deepcopy(model), "lora", target_modules=args.targets, dropout=0.0
    )
    model.requires_grad_(True)
    steps = {
        "full": make_step(model, batches),
        "lora": make_step(lora_model, batches),
        "lora_no_dropout": make_step(plain_model, batches),
    }
    seconds = interleaved({name: timed(s, args.steps) for name, s in steps.items()}, args.rounds)
    profiles = {name: profile(s, args.top) for name, s in steps.items()}
    full = median(seconds["full"])
    lora = median(seconds["lora"])
    plain = median(seconds["lora_no_dropout"])
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    rows = [
        ["full fine-tuning", f"{full:.3f}", "1.000", len(seconds["full"])],
        [f"LoRA r 8 ({args.targets})", f"{lora:.3f}", f"{lora / full:.3f}", len(seconds["lora"])],
        [
            f"LoRA r 8 ({args.targets}), dropout 0",
            f"{plain:.3f}",
            f"{plain / full:.3f}",
            len(seconds["lora_no_dropout"]),
        ],  # fmt: skip
    ]
    print(f"{args.model}, AdamW, batch {args.batch_size} x {args.seq_len}, {args.threads} threads;"
          f" LoRA trains {trainable:,} parameters")  # fmt: skip
    print(markdown_table(["arm", "median step s", "step time / full", "timed steps"], rows))
    print(f"LoRA / full = {lora / full:.3f}, without dropout {plain / full:.3f} (theory ~0.667)")
    for name, (table, _) in profiles.items():
        print(f"\nTop operators by self CPU time, one {name} step:\n{table}")
    results = {
        "full_step_seconds": full,
        "lora_step_seconds": lora,
        "ratio": lora / full,
        "lora_no_dropout_step_seconds": plain,
        "ratio_no_dropout": plain / full,
        "lora_trainable_parameters": trainable,
        "step_seconds": seconds,
        "profiles": {name: data for name, (_, data) in profiles.items()},
    }
    print(f"wrote {write_json('lora_vs_full', args, results, args.output)}")


if __name__ == "__main__":
    main()
