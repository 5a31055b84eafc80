"""GGUF export of SmolLM2-135M-Instruct with a LoRA adapter merged in: what f16 and q8_0 cost in
fidelity, read back through transformers' GGUF reader, against the merged model in float32.

The adapter is random (rank 8 on every linear layer, B ~ N(0, 0.02)): export fidelity does not
depend on what was learnt. Per output type: export time, file size, the largest logit difference
(over the largest logit) and the share of positions whose top token agrees, on real review text
(8 x 128 tokens), and the greedy continuations (32 tokens) of four chat prompts. Prints a table
and writes JSON.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/gguf_export.py
    .venv/bin/python benchmarks/gguf_export.py --model tiny-llama     # smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import (
    base_parser,
    clock,
    markdown_table,
    packed_lm_features,
    parse_with_smoke,
    setup,
    write_json,
)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Give me three uses for baking soda.",
    "Explain what a neural network is in one sentence.",
]


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the random LoRA B")
    parser.add_argument("--outtypes", default="f16,q8_0", help="output types, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    return parse_with_smoke(parser, model="tiny-llama", new_tokens=2, outtypes="f16")


def merged_with_lora(name: str, rank: int, std: float, seed: int) -> tuple[Any, Any, Any]:
    """(base, merged model, tokenizer): the base with a random LoRA folded in."""
    import peftkit
    from peftkit.models import load_model

    base, tokenizer = load_model(name, "causal-lm", seed=seed)
    tuned_base, _ = load_model(name, "causal-lm", seed=seed)
    tuned = peftkit.apply(tuned_base, peftkit.LoraConfig(rank=rank, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in tuned.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, std)
    return base.eval(), peftkit.merge(tuned).eval(), tokenizer


def chat_prompt_ids(tokenizer: Any) -> list[list[int]]:
    """The prompts through the model's chat template (or plain, for a model without one)."""
    if not tokenizer.chat_template:
        return [tokenizer.encode(prompt) for prompt in PROMPTS]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        for prompt in PROMPTS
    ]  # fmt: skip


def greedy(model: Any, prompt: list[int], new_tokens: int, stop: int | None) -> list[int]:
    """Greedy continuation (token ids) of one prompt, up to new_tokens or the stop token."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=stop, pad_token_id=stop,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def agreement(expected: list[list[int]], actual: list[list[int]]) -> dict[str, Any]:
    """Identical continuations, and where each first differs (None: never)."""
    first = [
        next((i for i, (a, b) in enumerate(zip(e, x, strict=False)) if a != b), None)
        for e, x in zip(expected, actual, strict=True)
    ]
    return {"identical": sum(e == x for e, x in zip(expected, actual, strict=True)),
            "first_difference": first}  # fmt: skip


def logit_fidelity(reference: Any, candidate: Any, ids: torch.Tensor) -> dict[str, float]:
    """Largest logit difference over the largest logit, and top-token agreement."""
    with torch.no_grad():
        expected, actual = reference(ids).logits, candidate(ids).logits
    return {
        "max_relative_difference": float((actual - expected).abs().max() / expected.abs().max()),
        "top1_agreement": float((actual.argmax(-1) == expected.argmax(-1)).float().mean()),
    }


def main() -> None:
    """Build, export each type, read back, compare, report."""
    import transformers

    from peftkit.export import export_gguf

    args = parse_args()
    setup(args)
    base, merged, tokenizer = merged_with_lora(args.model, args.rank, args.lora_std, args.seed)
    features = packed_lm_features(tokenizer, 8, 128)
    ids = torch.tensor([feature["input_ids"] for feature in features])
    prompts = chat_prompt_ids(tokenizer)
    stop = tokenizer.eos_token_id
    expected_text = [greedy(merged, prompt, args.new_tokens, stop) for prompt in prompts]
    results: dict[str, Any] = {"adapter_vs_base": logit_fidelity(merged, base, ids)}
    with tempfile.TemporaryDirectory() as folder:
        for outtype in args.outtypes.split(","):
            path = Path(folder) / f"model.{outtype}.gguf"
            start = clock()
            report = export_gguf(merged, tokenizer, path, outtype=outtype)
            seconds = clock() - start
            loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name)
            texts = [greedy(loaded, prompt, args.new_tokens, stop) for prompt in prompts]
            results[outtype] = {
                "export_seconds": seconds,
                "file_mib": report["bytes"] / 2**20,
                "tensors": report["tensors"],
                **logit_fidelity(merged, loaded.eval(), ids),
                "greedy": agreement(expected_text, texts),
            }
            path.unlink()
    results["greedy_prompts"] = len(prompts)
    rows = [
        [kind, f"{r['file_mib']:.1f}", f"{r['export_seconds']:.1f}",
         f"{r['max_relative_difference']:.2e}", f"{r['top1_agreement']:.4f}",
         f"{r['greedy']['identical']}/{len(prompts)}"]
        for kind, r in results.items() if kind in args.outtypes.split(",")
    ]  # fmt: skip
    header = ["outtype", "MiB", "export s", "max logit diff / max", "top-1 agree", "greedy same"]
    print(markdown_table(header, rows))
    shift = results["adapter_vs_base"]
    print(f"(the adapter itself moves the logits by {shift['max_relative_difference']:.2e} of the "
          f"largest; top-1 agreement with the base {shift['top1_agreement']:.4f})")  # fmt: skip
    print(f"wrote {write_json('gguf_export', args, results, args.output)}")


if __name__ == "__main__":
    main()
