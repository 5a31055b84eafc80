"""The step cost of each way to store the frozen base, against the float32 base, in one process:
LoRA (r 8 on q and v) training steps on SmolLM2-135M with the base in fp32, in bf16, in NF4
computing in fp32 or in bf16, and the fp32 base with gradient checkpointing.

Every arm trains its own copy of the same model (same seed, same packed review batches of
batch x seq_len tokens) with AdamW over the LoRA weights (float32 masters in every arm); the arms
run interleaved round by round, so a noisy shared machine slows all of them alike, and the
reported figure is each arm's median step time over all rounds and its ratio to the fp32 arm's.
Weight memory is what the model's weights and buffers take as stored (quantisation constants
included: peftkit.models.precision.stored_bytes).

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lowbit_step.py
    .venv/bin/python benchmarks/lowbit_step.py --model tiny-llama --rounds 1 --steps 2   # smoke
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common import (
    base_parser,
    clock,
    interleaved,
    machine,
    markdown_table,
    median,
    packed_lm_features,
    parse_with_smoke,
    setup,
    write_json,
)

# name: (base.dtype, base.quantize, training.gradient_checkpointing)
ARMS = {
    "fp32 base": ("fp32", None, False),
    "bf16 base": ("bf16", None, False),
    "nf4 base, fp32 compute": ("fp32", "nf4", False),
    "nf4 base, bf16 compute": ("bf16", "nf4", False),
    "fp32 base + checkpointing": ("fp32", None, True),
}


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per arm per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="which arms (default: all)")
    return parse_with_smoke(parser, model="tiny-llama", steps=1, rounds=1, seq_len=16)


def batches(tokenizer: Any, count: int, batch_size: int, seq_len: int) -> list[dict[str, Any]]:
    """`count` batches of packed review text, every one of the same shape."""
    import torch

    features = packed_lm_features(tokenizer, count * batch_size, seq_len)
    found = []
    for start in range(0, len(features), batch_size):
        rows = features[start : start + batch_size]
        found.append({key: torch.tensor([row[key] for row in rows]) for key in rows[0]})
    return found


def arm(args: Any, name: str) -> tuple[Callable[[], list[float]], dict[str, Any]]:
    """One arm: its step function (runs --steps steps, returns their seconds) and its facts."""
    import torch

    import peftkit
    from peftkit.models import load_model
    from peftkit.models.precision import stored_bytes
    from peftkit.training.gradient_checkpointing import enable_gradient_checkpointing

    dtype, quantize, checkpointing = ARMS[name]
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, "causal-lm", dtype=dtype, quantize=quantize)
    if checkpointing:
        enable_gradient_checkpointing(model)
    torch.manual_seed(args.seed)
    model = peftkit.apply(model, peftkit.LoraConfig(rank=8, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    data = batches(tokenizer, args.steps * args.rounds, args.batch_size, args.seq_len)
    losses: list[float] = []
    model.train()

    def steps() -> list[float]:
        seconds = []
        for _ in range(args.steps):
            batch = data[len(losses) % len(data)]
            start = clock()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(clock() - start)
            losses.append(float(loss.detach()))
        return seconds

    facts = {
        "base_dtype": dtype,
        "quantize": quantize,
        "gradient_checkpointing": checkpointing,
        "weight_mib": stored_bytes(model) / 2**20,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "losses": losses,
    }
    return steps, facts


def main() -> None:
    """Build the arms, run them interleaved, print the table and write the JSON."""
    args = parse_args()
    setup(args)
    built = {name: arm(args, name) for name in args.arms}
    seconds = interleaved({name: step for name, (step, _) in built.items()}, args.rounds)
    baseline = median(seconds[args.arms[0]])
    tokens = args.batch_size * args.seq_len
    results = []
    for name, (_, facts) in built.items():
        step = median(seconds[name])
        results.append({"arm": name, **facts, "step_seconds": seconds[name],
                        "median_step_seconds": step, "tokens_per_second": tokens / step,
                        f"step_time_vs_{args.arms[0].split(',')[0].replace(' ', '_')}":
                        step / baseline})  # fmt: skip
    header = ["arm", "weights (MiB)", "median step (s)", f"vs {args.arms[0]}", "tokens/s"]
    rows = [[r["arm"], f"{r['weight_mib']:.0f}", f"{r['median_step_seconds']:.3f}",
             f"{r['median_step_seconds'] / baseline:.2f}x", f"{r['tokens_per_second']:.0f}"]
            for r in results]  # fmt: skip
    print(
        f"{args.model}, LoRA r 8 q,v, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.rounds} rounds x {args.steps} steps, {machine()['torch_threads']} threads"
    )
    print(markdown_table(header, rows))
    path = write_json("lowbit_step", args, results, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
