"""llama.cpp runs the exported file: SmolLM2-135M-Instruct with a random LoRA merged in, exported
by peftkit as f16 and q8_0, loaded by llama.cpp (through llama-cpp-python) and compared with the
merged model in transformers (float32): the chat prompts' token ids from llama.cpp's own tokenizer
(reading the file's vocabulary, merges and pre-tokenizer name), the next-token logits at the end of
each prompt, and the greedy continuations (llama.cpp fed transformers' prompt ids, so that only the
model is compared). Prints a table and writes JSON.

llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores):

    flock /tmp/peftkit-heavy.lock .venv/bin/pip install "llama-cpp-python==0.3.36"
    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/gguf_llamacpp.py
    .venv/bin/python benchmarks/gguf_llamacpp.py --model tiny-llama        # smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import base_parser, markdown_table, parse_with_smoke, setup, write_json
from gguf_export import PROMPTS, agreement, chat_prompt_ids, greedy, merged_with_lora


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the random LoRA B")
    parser.add_argument("--outtypes", default="f16,q8_0", help="output types, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    return parse_with_smoke(parser, model="tiny-llama", new_tokens=2, outtypes="f16")


def llama_cpp_greedy(llm: Any, prompt: list[int], new_tokens: int, stop: int | None) -> dict:
    """llama.cpp's logits after the prompt, and its greedy continuation (token ids)."""
    llm.reset()
    llm.eval(prompt)
    first_logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    tokens: list[int] = []
    logits = first_logits
    for _ in range(new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        if token == stop:
            break
        llm.eval([token])
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return {"logits": first_logits, "tokens": tokens}


def prompt_logits(model: Any, prompt: list[int]) -> np.ndarray:
    """transformers' next-token logits at the end of a prompt."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].numpy()


def main() -> None:
    """Export, run both, compare, report."""
    import importlib.util

    from peftkit.export import export_gguf

    args = parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        refused = ("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36): "
                   "the GGUF files were not run in llama.cpp")  # fmt: skip
        if not args.smoke:
            raise SystemExit(refused)
        Llama = None  # smoke: the export and transformers' side run; llama.cpp's is refused
    else:
        from llama_cpp import Llama

        refused = None
    setup(args)
    _, merged, tokenizer = merged_with_lora(args.model, args.rank, args.lora_std, args.seed)
    prompts = chat_prompt_ids(tokenizer)
    texts = [tokenizer.decode(prompt) for prompt in prompts]
    stop = tokenizer.eos_token_id
    expected = [greedy(merged, prompt, args.new_tokens, stop) for prompt in prompts]
    expected_logits = [prompt_logits(merged, prompt) for prompt in prompts]
    results: dict[str, Any] = {"prompts": PROMPTS}
    with tempfile.TemporaryDirectory() as folder:
        for outtype in args.outtypes.split(","):
            path = Path(folder) / f"model.{outtype}.gguf"
            export_gguf(merged, tokenizer, path, outtype=outtype)
            if Llama is None:
                results[outtype] = {"exported_bytes": path.stat().st_size, "refused": refused}
                print(refused)
                continue
            # logits_all: llama-cpp-python keeps every position's logits in llm.scores by row
            llm = Llama(str(path), n_ctx=512, n_threads=args.threads, seed=args.seed,
                        logits_all=True, verbose=False)  # fmt: skip
            tokenized = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
            runs = [llama_cpp_greedy(llm, p, args.new_tokens, stop) for p in prompts]
            differences = [
                float(np.abs(run["logits"] - want).max() / np.abs(want).max())
                for run, want in zip(runs, expected_logits, strict=True)
            ]
            results[outtype] = {
                "tokenization_identical": sum(
                    a == b for a, b in zip(tokenized, prompts, strict=True)
                ),
                "max_relative_logit_difference": max(differences),
                "top1_identical": sum(
                    int(run["logits"].argmax() == want.argmax())
                    for run, want in zip(runs, expected_logits, strict=True)
                ),
                "greedy": agreement(expected, [run["tokens"] for run in runs]),
                "llama_cpp_text": [tokenizer.decode(run["tokens"]) for run in runs],
            }
            del llm
    results["transformers_text"] = [tokenizer.decode(tokens) for tokens in expected]
    count = len(prompts)
    rows = [
        [kind, f"{r['tokenization_identical']}/{count}",
         f"{r['max_relative_logit_difference']:.2e}",
         f"{r['top1_identical']}/{count}", f"{r['greedy']['identical']}/{count}",
         str(r["greedy"]["first_difference"])]
        for kind, r in results.items() if kind in args.outtypes.split(",") and not refused
    ]  # fmt: skip
    results["refused"] = refused
    header = ["outtype", "same prompt ids", "logit diff / max", "same top-1", "same greedy",
              "first difference at"]  # fmt: skip
    print(markdown_table(header, rows))
    for prompt, text in zip(PROMPTS, results["transformers_text"], strict=True):
        print(f"- {prompt!r} -> {text!r}")
    print(f"wrote {write_json('gguf_llamacpp', args, results, args.output)}")


if __name__ == "__main__":
    main()
