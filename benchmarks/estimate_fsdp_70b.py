"""Llama-2-70B QLoRA per process: one GPU against two FSDP-sharded GPUs, from `peftkit estimate`.

The base's linear weights in NF4 whose codes are stored in bf16 (bitsandbytes'
bnb_4bit_quant_storage=bfloat16, so that FSDP can shard them), bf16 mixed precision, gradient
checkpointing, LoRA rank 64 on every linear layer (the QLoRA paper's setting) and LoRA's
defaults (rank 8 on q and v); batch 1 per process at 512 and 2048 tokens. Writes the estimates
as JSON and prints the Markdown table docs/estimate.md shows.

    .venv/bin/python benchmarks/estimate_fsdp_70b.py   # a few seconds per sequence length
    .venv/bin/python benchmarks/estimate_fsdp_70b.py --smoke   # 64 tokens, JSON to a temp path
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_smoke_flag, machine, parse_with_smoke

from peftkit.memory.estimate import account, measure, pass_dtype
from peftkit.memory.parts import GIB
from peftkit.tables import markdown_table

METHODS = {
    "LoRA r64, all linear": {"name": "lora", "rank": 64, "alpha": 16,
                             "target_modules": "all-linear"},
    "LoRA r8, q and v": {"name": "lora"},
}  # fmt: skip
PROCESSES = [(1, "none"), (2, "fsdp")]
STORAGE = {"dtype": "bf16-mixed", "base_dtype": "bf16", "quantization": "nf4"}


def main() -> None:
    """Estimate every (method, sequence length, processes) case; write JSON, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="docs/results/estimate-qlora-70b-fsdp.json")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512, 2048])
    add_smoke_flag(parser)
    args = parse_with_smoke(parser, seq_len=[64])
    activation = pass_dtype(STORAGE["dtype"], STORAGE["base_dtype"])
    cases, rows = [], []
    for label, section in METHODS.items():
        for seq_len in args.seq_len:
            # one process takes the chunked loss, several the plain one (as training does)
            found = {
                chunked: measure("llama-70b", section, 1, seq_len, activation, chunked_loss=chunked)
                for chunked in (True, False)
            }
            for gpus, sharding in PROCESSES:
                result = account(found[gpus == 1], STORAGE["dtype"], True, STORAGE["base_dtype"],
                                 STORAGE["quantization"], gpus, sharding)  # fmt: skip
                cases.append({"case": label, **result.as_dict()})
                parts = [result.weights, result.gradients + result.optimizer,
                         result.activations + result.loss_workspace, result.recompute,
                         result.workspace + result.gathered, result.total]  # fmt: skip
                rows.append([
                    label, str(seq_len), f"{gpus} ({sharding})",
                    *(f"{value / GIB:.2f}" for value in parts),
                    "yes" if result.total <= 24 * GIB else "no",
                ])  # fmt: skip
    header = ["method", "tokens", "GPUs (sharding)", "weights", "grads + AdamW",
              "activations + loss", "recompute", "dequant + gathered", "peak GiB",
              "<= 24 GiB"]  # fmt: skip
    payload = {"command": "python benchmarks/estimate_fsdp_70b.py", "storage": STORAGE,
               "seq_len": args.seq_len, "machine": machine(), "cases": cases}  # fmt: skip
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown_table(header, rows))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
