"""peftkit's NF4 round trip (methods/lora/loftq.py) against bitsandbytes' own, value by value.

LoftQ's point is that the adapter fits what the base's quantisation loses, so peftkit's quantiser
must give the values the 4-bit base will hold. bitsandbytes is not a peftkit dependency; this
check runs where it is installed (its CPU backend quantises NF4 too):

    pip install bitsandbytes==0.50.2     # into a scratch environment
    flock /tmp/peftkit-heavy.lock python benchmarks/nf4_reference.py

It quantises random matrices of several shapes (some not a multiple of the block size) and every
linear weight of SmolLM2-135M's first two layers with `bitsandbytes.functional.quantize_4bit`
(nf4, blocksize 64, no double quantisation: the setting PEFT's LoftQ and transformers' default
BitsAndBytesConfig use), dequantises, and compares with `nf4_round_trip`. `--smoke` runs two
small random matrices through `nf4_round_trip` and, where bitsandbytes is missing, refuses the
comparison by name (the JSON says so) instead of failing on the import."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import add_smoke_flag, machine, markdown_table, parse_with_smoke  # noqa: E402

OUTPUT = Path(__file__).parent.parent / "docs/results/nf4-vs-bitsandbytes.json"


def bitsandbytes_round_trip(weight):
    """bitsandbytes' NF4 quantise-dequantise of a float32 tensor on the CPU."""
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(
        weight.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False
    )
    return bnb.dequantize_4bit(packed, state).reshape(weight.shape)


def main() -> int:
    """Compare on every matrix; print the table, write the JSON."""
    import torch
    from safetensors import safe_open

    from peftkit.methods.lora.loftq import nf4_round_trip

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help=f"JSON to write (default: {OUTPUT})")
    add_smoke_flag(parser)
    args = parse_with_smoke(parser)
    have_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    if not have_bitsandbytes and not args.smoke:
        raise SystemExit("bitsandbytes is not installed: pip install bitsandbytes==0.50.2 into a "
                         "scratch environment to run this comparison.")  # fmt: skip
    torch.manual_seed(0)
    shapes = [(64, 64), (33, 77)] if args.smoke else [(64, 64), (96, 200), (33, 77), (576, 1536)]
    matrices = {f"randn {r}x{c}": torch.randn(r, c) * 0.05 for r, c in shapes}
    weights = Path.home() / ".cache/peftkit/smollm2-135m-instruct/model.safetensors"
    with safe_open(str(weights), "pt") if not args.smoke else open(os.devnull) as f:
        for name in f.keys() if not args.smoke else []:
            if name.startswith(("model.layers.0.", "model.layers.1.")) and name.endswith(
                "proj.weight"
            ):
                matrices[name] = f.get_tensor(name).float()
    rows, results = [], {}
    for name, weight in matrices.items():
        ours = nf4_round_trip(weight)
        if not have_bitsandbytes:  # smoke only: peftkit's side ran, the reference is refused
            results[name] = {"shape": list(weight.shape), "nf4_levels": len(ours.unique())}
            continue
        theirs = bitsandbytes_round_trip(weight)
        equal = float((ours == theirs).float().mean())
        largest = float((ours - theirs).abs().max())
        results[name] = {"shape": list(weight.shape), "identical_share": equal,
                         "max_abs_difference": largest}  # fmt: skip
        rows.append([name, "x".join(map(str, weight.shape)), f"{equal:.6f}", f"{largest:.3g}"])
    refused = None if have_bitsandbytes else "bitsandbytes is not installed: not compared"
    if refused:
        print(refused)
    else:
        print(markdown_table(["matrix", "shape", "identical values", "largest difference"], rows))
    output = Path(args.output) if args.output else OUTPUT
    version = None
    if have_bitsandbytes:
        import bitsandbytes

        version = bitsandbytes.__version__
    output.write_text(json.dumps({
        "command": "python benchmarks/nf4_reference.py" + (" --smoke" if args.smoke else ""),
        "bitsandbytes": version, "torch": torch.__version__, "machine": machine(),
        "refused": refused, "results": results,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
