"""Proxy-Tuning decoding speed against the three models decoding on their own.

Proxy-tuned decoding runs the base, the expert and the anti-expert once per token, so its floor is
the sum of the three models' own cached decode step times. This script measures, in one run and
interleaved (so machine noise hits all alike): each model's own `generate`, and proxy-tuned
`generate`, each at N new tokens and at 1 new token; a decode step is (t(N) - t(1)) / (N - 1),
with the best of the rounds for each t, which removes the prefill. Orchestration overhead =
proxy step / (sum of own steps) - 1.

Variants: `cheap` (expert = a second copy of the model with a LoRA adapter, anti-expert = the same
copy with the adapter off, via peftkit's WithoutAdapter), `copies` (three separate models; the
expert's LoRA is merged into its weights). Weights are random LoRA updates: speed does not depend
on what the adapter learnt. Prints a table and writes JSON.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/proxy_decoding.py   # smollm2-135m
    .venv/bin/python benchmarks/proxy_decoding.py --model tiny --new-tokens 8      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from common import add_smoke_flag, machine, parse_with_smoke

PROMPTS = [
    "Explain in one paragraph why the sky is blue.",
    "Write a short note thanking a colleague for their help with a difficult bug.",
    "List three things to pack for a weekend hiking trip.",
    "What is the capital of France, and what is it famous for?",
]


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="'tiny' (tiny-llama), 'smollm2-135m', or a name"
    )
    parser.add_argument("--variant", choices=("cheap", "copies"), default="cheap", help="see above")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts decoded together")
    parser.add_argument("--new-tokens", type=int, default=32, help="N: tokens per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (best is reported)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the expert")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--output", default="benchmarks/results/proxy_decoding.json", help="JSON to write"
    )
    add_smoke_flag(parser)
    return parse_with_smoke(parser, model="tiny", new_tokens=2, repeats=1, batch_size=2)


def load(name: str, seed: int) -> tuple[Any, Any]:
    """A causal LM and its tokenizer in eval mode."""
    from peftkit.models import load_model

    model, tokenizer = load_model("tiny-llama" if name == "tiny" else name, "causal-lm", seed=seed)
    return model.eval(), tokenizer


def lora_expert(name: str, rank: int) -> Any:
    """A second copy of the model with a LoRA adapter whose B is random (so it changes outputs)."""
    import torch

    import peftkit

    model, _ = load(name, seed=2)
    expert = peftkit.apply(model, peftkit.LoraConfig(rank=rank, dropout=0.0))
    with torch.no_grad():
        for parameter_name, parameter in expert.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.02)
    return expert.eval()


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The base, expert and anti-expert, and how to run each one's own generate."""
    from peftkit.decoding import WithoutAdapter

    base, tokenizer = load(args.model, seed=1)
    expert = lora_expert(args.model, args.rank)
    if args.variant == "cheap":
        anti_expert = WithoutAdapter(expert)
        anti_generate = adapter_off_generate(anti_expert)
    else:
        expert = expert.merge_and_unload().eval()  # a plain model, as a separately tuned copy
        anti_expert, _ = load(args.model, seed=2)
        anti_generate = anti_expert.generate
    return {
        "tokenizer": tokenizer,
        "models": (base, expert, anti_expert),
        "own": {"base": base.generate, "expert": expert.generate, "anti-expert": anti_generate},
    }


def adapter_off_generate(anti_expert: Any) -> Any:
    """The PEFT model's generate with its adapter off: the anti-expert decoding on its own."""

    def generate(**kwargs: Any) -> Any:
        with anti_expert.adapter_off():
            return anti_expert.peft_model.generate(**kwargs)

    return generate


def timed(run: Any) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def runners(setup: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """name -> function(new_tokens) decoding the benchmark batch for exactly that many tokens."""
    import torch

    from peftkit.decoding import proxy_generate_ids

    tokenizer = setup["tokenizer"]
    prompts = (PROMPTS * args.batch_size)[: args.batch_size]
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")

    def own(generate: Any) -> Any:
        def run(new_tokens: int) -> None:
            with torch.no_grad():
                generate(
                    **batch,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,  # no early end-of-sequence: equal work everywhere
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )

        return run

    def proxy(new_tokens: int) -> None:
        proxy_generate_ids(
            *setup["models"], tokenizer, prompts,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        )  # fmt: skip

    made = {name: own(generate) for name, generate in setup["own"].items()}
    made["proxy"] = proxy
    return made


def measure(setup: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Seconds per round for each runner at N and at 1 new tokens, interleaved round by round."""
    made = runners(setup, args)
    for run in made.values():
        run(2)  # warm-up: first calls pay for lazy initialisation
    times: dict[str, dict[str, list[float]]] = {name: {"full": [], "one": []} for name in made}
    for _ in range(args.repeats):
        for name, run in made.items():
            times[name]["full"].append(timed(lambda run=run: run(args.new_tokens)))
            times[name]["one"].append(timed(lambda run=run: run(1)))
    return times


def adapter_toggle_seconds(setup: dict[str, Any], times: int = 20) -> float | None:
    """Seconds to switch the cheap variant's adapter off and on again (paid twice per step)."""
    anti_expert = setup["models"][2]
    if not hasattr(anti_expert, "peft_model"):
        return None
    start = time.perf_counter()
    for _ in range(times):
        with anti_expert.adapter_off():
            pass
    return (time.perf_counter() - start) / times


def summarise(times: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> dict[str, Any]:
    """Decode steps, tokens/s, the sum of own steps, and proxy decoding's overhead over it."""
    # Best of rounds, for N tokens and for 1 token separately: on a shared machine other jobs only
    # ever add time (the timeit rule). A decode step is the difference over N - 1 tokens.
    steps = {
        name: (min(runs["full"]) - min(runs["one"])) / (args.new_tokens - 1)
        for name, runs in times.items()
    }
    own_sum = steps["base"] + steps["expert"] + steps["anti-expert"]
    return {
        "decode_step_seconds": steps,
        "decode_tokens_per_second": {
            name: args.batch_size / value for name, value in steps.items()
        },
        "own_sum_step_seconds": own_sum,
        "own_sum_tokens_per_second": args.batch_size / own_sum,
        "overhead": steps["proxy"] / own_sum - 1,
        "rounds_seconds": times,
    }


def print_table(result: dict[str, Any]) -> None:
    """The summary as a table."""
    print(
        f"\nproxy decoding, {result['model']} ({result['variant']}), batch {result['batch_size']}"
    )
    print(
        f"{'run':<22}{'decode step ms':>16}{'tokens/s':>12}   (best of {result['repeats']} rounds)"
    )
    rows = [
        *result["decode_step_seconds"].items(),
        ("sum of own three", result["own_sum_step_seconds"]),
    ]
    for name, seconds in rows:
        print(f"{name:<22}{seconds * 1000:>16.2f}{result['batch_size'] / seconds:>12.1f}")
    print(f"overhead of proxy decoding over the sum: {100 * result['overhead']:+.1f}%")
    if result["adapter_toggle_seconds"] is not None:
        print(f"adapter off/on toggle: {result['adapter_toggle_seconds'] * 1000:.2f} ms")


def main() -> None:
    """Build, measure, print and write JSON."""
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # generate's per-call notes would drown the table
    setup = build(args)
    result = {
        "model": args.model,
        "variant": args.variant,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        **summarise(measure(setup, args), args),
        "adapter_toggle_seconds": adapter_toggle_seconds(setup),
        "load_average_after": os.getloadavg(),
    }
    print_table(result)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
