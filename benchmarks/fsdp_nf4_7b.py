"""A 7B-shaped NF4 model (Llama-2-7B's config) sharded over 2 CPU processes (gloo) as
`training.sharding: fsdp` shards it: the bytes of stored weights each process holds.

The model is built on the meta device (shapes, no values, no memory): every linear layer but the
output one is a bitsandbytes NF4 layer whose packed codes (half a byte a weight) are a uint8
Params4bit, the rest bf16, as `base.quantize: nf4, base.dtype: bf16` stores it. peftkit's
shard() then re-stores the packed codes as bf16 (float_storage) and applies FSDP2 per decoder
layer; each process counts the bytes of its local shards. This is the sharding layout, counted:
no training step runs (a real 7B NF4 build takes minutes per process on these cores). Not
counted: each NF4 layer's quantisation state (block scales), which stays whole on every process
(with double quantisation about one byte per 64 weights: `quant_state_gib_per_process`).

    .venv/bin/python benchmarks/fsdp_nf4_7b.py        # seconds; no flock needed (meta device)
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from common import base_parser, parse_with_smoke, write_json

WORLD = 2
GIB = 2**30


def worker(rank: int, model_name: str, port: int, folder: str) -> None:
    """One process: build the meta model, shard it, write the bytes it holds."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from peftkit.memory import meta
    from peftkit.models.quantize import bitsandbytes, quantizable_layers
    from peftkit.training.sharding import shard

    bnb = bitsandbytes()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    config = meta.resolve_config(model_name)[0]
    quantized = 0
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for name in quantizable_layers(model):
            old = model.get_submodule(name)
            count = old.in_features * old.out_features
            layer = bnb.nn.Linear4bit(old.in_features, old.out_features, old.bias is not None,
                                      torch.bfloat16, quant_type="nf4")  # fmt: skip
            codes = torch.empty(count // 2, 1, dtype=torch.uint8)  # two 4-bit codes a byte
            layer.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_type="nf4",
                                             module=layer, bnb_quantized=True)  # fmt: skip
            model.set_submodule(name, layer)
            quantized += count
    model.requires_grad_(False)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    shard(model, "fp32")
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    held = sum(t.numel() * t.element_size() for t in local)
    result = {"whole_bytes": whole, "held_bytes": held, "quantized_weights": quantized,
              "stored_dtypes": sorted({str(p.dtype) for p in model.parameters()})}  # fmt: skip
    Path(folder, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    """Spawn the 2 processes; write the JSON."""
    import torch.multiprocessing as mp

    parser = base_parser(__doc__.split("\n\n")[0], "llama-7b")
    # The smoke preset is the run itself (the meta device makes it seconds), its JSON to a
    # temporary folder.
    args = parse_with_smoke(parser)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(args.model, port, folder), nprocs=WORLD)
        ranks = [json.loads(Path(folder, f"{r}.json").read_text()) for r in range(WORLD)]
    whole = ranks[0]["whole_bytes"]
    results: dict[str, Any] = {
        "processes": WORLD,
        "whole_gib": whole / GIB,
        "held_gib": [r["held_bytes"] / GIB for r in ranks],
        "held_over_whole": [r["held_bytes"] / whole for r in ranks],
        "stored_dtypes_after_shard": ranks[0]["stored_dtypes"],
        "quantized_weights": ranks[0]["quantized_weights"],
        # double quantisation: an 8-bit scale per 64 weights, an fp32 one per 256 of those
        "quant_state_gib_per_process": ranks[0]["quantized_weights"]
        * (1 / 64 + 4 / 64 / 256)
        / GIB,
        "note": "meta-device layout count; no training step; the machine was shared by other "
        "jobs (irrelevant here: no timing)",
    }
    path = write_json("fsdp_nf4_7b", args, results, args.output)
    held = ", ".join(
        f"{gib:.2f} GiB ({share:.3f})"
        for gib, share in zip(results["held_gib"], results["held_over_whole"], strict=True)
    )
    scales = results["quant_state_gib_per_process"]
    print(f"{args.model} in NF4 (bf16 elsewhere): {results['whole_gib']:.2f} GiB of stored "
          f"weights; held per process over {WORLD}: {held}; block scales whole on each: "
          f"{scales:.3f} GiB")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
