"""One mixed-adapter batch against the same rows run group by group, one adapter at a time.

Several LoRA adapters are loaded on one base; the batch's rows are assigned round-robin to the
adapters and to "none" (the base). Mixed: one forward (or generate) call with a name per row
(peftkit.methods.lora.mixed_batch). Grouped: for each adapter, switch to it and run only its rows;
the base rows run with the adapters disabled. Rounds are interleaved; medians are reported. Before
timing, the mixed logits are checked against the grouped ones. LoRA weights are random (B non-zero).

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/mixed_batch.py     # smollm2-135m
    .venv/bin/python benchmarks/mixed_batch.py --model tiny --rounds 3            # smoke run
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
    parser.add_argument("--adapters", type=int, default=3, help="LoRA adapters loaded")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of each adapter")
    parser.add_argument("--batch-size", type=int, default=8, help="rows in the mixed batch")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens per generate call")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--output", default="benchmarks/results/mixed_batch.json", help="JSON to write"
    )
    add_smoke_flag(parser)
    return parse_with_smoke(
        parser, model="tiny", adapters=2, batch_size=4, seq_len=8, new_tokens=2, rounds=1
    )


def build(args: argparse.Namespace, folder: Path) -> tuple[Any, list[str | None], torch.Tensor]:
    """The multi-adapter model, each row's adapter name, and the input ids."""
    import peftkit
    from peftkit.methods.lora import compose
    from peftkit.models import load_model

    name = "tiny-llama" if args.model == "tiny" else args.model
    folders = {}
    for index in range(args.adapters):
        base, _ = load_model(name, "causal-lm", seed=0)
        torch.manual_seed(index)
        model = peftkit.apply(base, peftkit.LoraConfig(rank=args.rank, dropout=0.0))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, 0.02)
        folders[f"task{index}"] = peftkit.save(model, folder / f"task{index}")
    base, _ = load_model(name, "causal-lm", seed=0)
    served = compose.load_adapters(base, folders).eval()
    choices: list[str | None] = [*folders, None]
    rows = [choices[i % len(choices)] for i in range(args.batch_size)]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(
        0, base.config.vocab_size, (args.batch_size, args.seq_len), generator=generator
    )
    return served, rows, ids


def run_mixed(model: Any, rows: list[str | None], ids: torch.Tensor, new_tokens: int) -> Any:
    """One call for the whole batch: forward logits, or generated ids when new_tokens > 0."""
    from peftkit.methods.lora.mixed_batch import mixed_forward, mixed_generate

    if new_tokens:
        options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        return mixed_generate(model, rows, input_ids=ids, **options)
    return mixed_forward(model, rows, input_ids=ids).logits


def run_grouped(model: Any, rows: list[str | None], ids: torch.Tensor, new_tokens: int) -> Any:
    """The same rows, one call per adapter group (switching adapters between calls)."""
    from peftkit.methods.lora import compose

    outputs: list[Any] = [None] * len(rows)
    for name in dict.fromkeys(rows):
        index = [i for i, row in enumerate(rows) if row == name]
        with torch.no_grad():
            if name is None:
                with model.disable_adapter():
                    result = call(model, ids[index], new_tokens)
            else:
                compose.set_active(model, name)
                result = call(model, ids[index], new_tokens)
        for position, i in enumerate(index):
            outputs[i] = result[position]
    return torch.stack(outputs)


def call(model: Any, ids: torch.Tensor, new_tokens: int) -> Any:
    """Forward logits or greedy generation for one group."""
    if new_tokens:
        options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        return model.generate(input_ids=ids, **options)
    return model(input_ids=ids).logits


def seconds(run: Any) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    """Build, check, time, report."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, rows, ids = build(args, Path(tmp))
    difference = float(
        (run_mixed(model, rows, ids, 0) - run_grouped(model, rows, ids, 0)).abs().max()
    )
    same_tokens = bool(
        torch.equal(
            run_mixed(model, rows, ids, args.new_tokens),
            run_grouped(model, rows, ids, args.new_tokens),
        )
    )
    modes = {"forward": 0, "generate": args.new_tokens}
    times: dict[str, list[float]] = {}
    for mode, new_tokens in modes.items():
        for kind in ("mixed", "grouped"):
            times[f"{mode}_{kind}"] = []
        for _ in range(args.rounds):
            for kind, runner in (("mixed", run_mixed), ("grouped", run_grouped)):
                elapsed = seconds(lambda r=runner, n=new_tokens: r(model, rows, ids, n))
                times[f"{mode}_{kind}"].append(elapsed)
    median = {key: statistics.median(values) for key, values in times.items()}
    result = {
        "model": args.model,
        "adapters": args.adapters,
        "rows": [row or "none" for row in rows],
        "seq_len": args.seq_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": machine(),
        "max_abs_logit_difference_mixed_vs_grouped": difference,
        "same_generated_tokens": same_tokens,
        "median_seconds": median,
        "forward_mixed_over_grouped": median["forward_mixed"] / median["forward_grouped"],
        "generate_mixed_over_grouped": median["generate_mixed"] / median["generate_grouped"],
        "all_seconds": times,
    }
    for key, value in median.items():
        print(f"{key:<18} {value * 1e3:>10.1f} ms")
    print(
        f"mixed / grouped: forward {result['forward_mixed_over_grouped']:.3f}, "
        f"generate {result['generate_mixed_over_grouped']:.3f}"
    )
    print(f"max |logit difference| {difference:.2e}; same generated tokens: {same_tokens}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
