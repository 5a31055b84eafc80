"""Inference latency of a merged LoRA model against the base model and the unmerged adapter.

One run, interleaved rounds (machine noise hits all three alike): the base model, the base with
its LoRA adapter unmerged (PEFT layers), and the merged model saved with save_pretrained and
reloaded by plain transformers. Each timing is one forward pass over a fixed batch; the median of
the rounds is reported with the ratios to the base. Before timing, the merged model's logits are
checked against the unmerged adapter's. LoRA weights are random (B non-zero): speed does not
depend on what was learnt. Prints a table and writes JSON.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/merge_latency.py   # smollm2-135m
    .venv/bin/python benchmarks/merge_latency.py --model tiny --rounds 5          # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import add_smoke_flag, machine, parse_with_smoke


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'tiny' (tiny-llama) or a name")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument(
        "--targets", default="all-linear", help="LoRA target_modules: 'all-linear' or a,b,c"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--output", default="benchmarks/results/merge_latency.json", help="JSON to write"
    )
    add_smoke_flag(parser)
    return parse_with_smoke(parser, model="tiny", rounds=2, seq_len=16, batch_size=2)


def build(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Base, unmerged LoRA, and merged-then-reloaded models, plus the input batch."""
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.models import load_model

    name = "tiny-llama" if args.model == "tiny" else args.model
    base, _ = load_model(name, "causal-lm", seed=0)
    unmerged_base, _ = load_model(name, "causal-lm", seed=0)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    adapted = peftkit.apply(
        unmerged_base, peftkit.LoraConfig(rank=args.rank, dropout=0.0, target_modules=targets)
    )
    with torch.no_grad():
        for parameter_name, parameter in adapted.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.02)
    merged = peftkit.merge(load_unmerged_copy(adapted, name, folder))
    merged.config.quantization_config = None  # the GGUF-converted model carries one
    merged.save_pretrained(folder / "merged")
    plain = AutoModelForCausalLM.from_pretrained(folder / "merged")  # plain transformers
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
    models = {"base": base, "unmerged": adapted, "merged": plain}
    models = {k: m.to(args.device).eval() for k, m in models.items()}
    return {"models": models, "input_ids": ids.to(args.device)}


def load_unmerged_copy(adapted: Any, name: str, folder: Path) -> Any:
    """A second copy of the adapted model (merging consumes it), through peftkit save/load."""
    import peftkit
    from peftkit.models import load_model

    peftkit.save(adapted, folder / "adapter")
    fresh, _ = load_model(name, "causal-lm", seed=0)
    return peftkit.load(fresh, folder / "adapter")


def forward_seconds(model: Any, input_ids: torch.Tensor) -> float:
    """Wall time of one forward pass."""
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=input_ids)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(setup: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Interleaved timings per model, after one warm-up pass each."""
    models, ids = setup["models"], setup["input_ids"]
    for model in models.values():
        forward_seconds(model, ids)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(forward_seconds(model, ids))
    return times


def check_logits(setup: dict[str, Any]) -> float:
    """Largest absolute logit difference, merged (plain transformers) vs unmerged adapter."""
    models, ids = setup["models"], setup["input_ids"]
    with torch.no_grad():
        merged = models["merged"](input_ids=ids).logits
        unmerged = models["unmerged"](input_ids=ids).logits
    return float((merged - unmerged).abs().max())


def main() -> None:
    """Build, check, time, report."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        setup = build(args, Path(tmp))
        difference = check_logits(setup)
        times = measure(setup, args.rounds)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": args.model,
        "rank": args.rank,
        "targets": args.targets,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "device": args.device,
        "threads": args.threads,
        "machine": machine(),
        "max_abs_logit_difference_merged_vs_unmerged": difference,
        "median_seconds": median,
        "merged_over_base": median["merged"] / median["base"],
        "unmerged_over_base": median["unmerged"] / median["base"],
        "all_seconds": times,
    }
    print(f"{'model':<10} {'median ms':>10} {'vs base':>9}")
    for name, seconds in median.items():
        print(f"{name:<10} {seconds * 1e3:>10.2f} {seconds / median['base']:>9.3f}")
    print(f"max |logit difference| merged vs unmerged: {difference:.2e}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
