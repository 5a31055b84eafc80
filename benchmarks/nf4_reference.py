"""peftkit's NF4 round trip (methods/lora/loftq.py) against bitsandbytes' own, value by value.

LoftQ's point is that the adapter fits what the base's quantisation loses, so peftkit's quantiser
must give the values the 4-bit base will hold. bitsandbytes is not a peftkit dependency; this
check runs where it is installed (its CPU backend quantises NF4 too):

    pip install bitsandbytes==0.50.2     # into a scratch environment
    flock /tmp/peftkit-heavy.lock python benchmarks/nf4_reference.py

It quantises random matrices of several shapes (some not a multiple of the block size) and every
linear weight of SmolLM2-135M's first two layers with `bitsandbytes.functional.quantize_4bit`
(nf4, blocksize 64, no double quantisation: the setting PEFT's LoftQ and transformers' default
BitsAndBytesConfig use), dequantises, and compares with `nf4_round_trip`."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table  # noqa: E402


def bitsandbytes_round_trip(weight):
    """bitsandbytes' NF4 quantise-dequantise of a float32 tensor on the CPU."""
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(
        weight.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False
    )
    return bnb.dequantize_4bit(packed, state).reshape(weight.shape)


def main() -> int:
    """Compare on every matrix; print the table, write the JSON."""
    import bitsandbytes
    import torch
    from safetensors import safe_open

    from peftkit.methods.lora.loftq import nf4_round_trip

    torch.manual_seed(0)
    matrices = {f"randn {r}x{c}": torch.randn(r, c) * 0.05
                for r, c in [(64, 64), (96, 200), (33, 77), (576, 1536)]}  # fmt: skip
    weights = Path.home() / ".cache/peftkit/smollm2-135m-instruct/model.safetensors"
    with safe_open(str(weights), "pt") as f:
        for name in f.keys():
            if name.startswith(("model.layers.0.", "model.layers.1.")) and name.endswith(
                "proj.weight"
            ):
                matrices[name] = f.get_tensor(name).float()
    rows, results = [], {}
    for name, weight in matrices.items():
        ours, theirs = nf4_round_trip(weight), bitsandbytes_round_trip(weight)
        equal = float((ours == theirs).float().mean())
        largest = float((ours - theirs).abs().max())
        results[name] = {"shape": list(weight.shape), "identical_share": equal,
                         "max_abs_difference": largest}  # fmt: skip
        rows.append([name, "x".join(map(str, weight.shape)), f"{equal:.6f}", f"{largest:.3g}"])
    print(markdown_table(["matrix", "shape", "identical values", "largest difference"], rows))
    output = Path(__file__).parent.parent / "docs/results/nf4-vs-bitsandbytes.json"
    output.write_text(json.dumps({
        "bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
        "machine": platform.machine(), "results": results,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
