"""Bytes per parameter for the estimator: the training precision regimes (weights, gradients,
AdamW state), the base's storage dtype, and quantised linear layers (NF4, LLM.int8) counted as
bitsandbytes stores them, constants included."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter in one precision regime, and the dtype activations are kept in."""

    name: str
    frozen: float  # a weight that does not train: its storage only
    weight: float  # a trainable weight's working copy
    gradient: float
    optimizer: float  # AdamW m and v, plus an fp32 master copy in mixed precision
    activation_dtype: torch.dtype
    help: str


PRECISIONS = {
    p.name: p
    for p in [
        Precision("fp32", 4, 4, 4, 8, torch.float32, "fp32 weights, gradients, m and v"),
        Precision(
            "bf16-mixed", 2, 2, 2, 12, torch.bfloat16,
            "bf16 weights and gradients; fp32 master copy, m and v (ZeRO paper accounting)",
        ),
        Precision(
            "fp16-mixed", 2, 2, 2, 12, torch.float16,
            "fp16 weights and gradients; fp32 master copy, m and v (ZeRO paper accounting)",
        ),
        Precision("bf16", 2, 2, 2, 4, torch.bfloat16, "pure bf16: weights, gradients, m, v"),
    ]
}  # fmt: skip

# The base's storage dtype (recipe base.dtype): bytes of a frozen weight that is not quantised.
BASE_DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
BASE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# NF4 (Dettmers et al., 2023): 4 bits a weight; double quantisation brings the block constants to
# 8-bit absmax per 64 weights plus one fp32 constant per 256 blocks (per weight, for reading).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# LLM.int8 (Dettmers et al., 2022): one byte a weight plus an fp32 scale per output row.
QUANTIZATIONS = {"nf4": NF4_BYTES, "int8": 1.0}


def check(dtype: str, base_dtype: str | None, quantization: str | None) -> None:
    """Refuse a precision, base dtype or quantisation the estimator does not know."""
    known = [(dtype, PRECISIONS, "dtype"), (base_dtype, BASE_DTYPES, "base dtype"),
             (quantization, QUANTIZATIONS, "quantization")]  # fmt: skip
    for value, valid, what in known:
        if value is not None and value not in valid:
            none = "" if what == "dtype" else " (or none)"
            raise ConfigError(f"Unknown {what} {value!r}; use one of: {', '.join(valid)}{none}.")


def refuse_low_bit_base(method: Any, base_dtype: str | None, quantization: str | None) -> None:
    """A method that changes the base's own weights needs a float32 base (its record says why;
    the same refusal peftkit.apply makes)."""
    from peftkit.api import refuse_low_bit_base as refuse

    refuse(method, quantization or base_dtype)


def refuse_unshardable(method: Any, sharding: str) -> None:
    """A method whose hooks read or rewrite whole weights cannot be sharded (its record says
    why; the same refusal the plan makes for training.sharding)."""
    from peftkit.api import refuse_unshardable as refuse

    refuse(method, sharding)


def quantized_codes_bytes(layer: nn.Module, kind: str) -> float:
    """Bytes of one quantised weight's codes alone (4 or 8 bits a weight): what FSDP shards
    when they are stored in a float dtype (bitsandbytes' quant_storage)."""
    count = layer.weight.numel()
    return count if kind == "int8" else count / 2


def quantized_layer_bytes(layer: nn.Module, kind: str) -> float:
    """Bytes bitsandbytes stores for one layer's weight: NF4 with double-quantised block scales
    and its two code tables, or int8 with one fp32 scale per output row."""
    count = layer.weight.numel()
    if kind == "int8":
        rows = layer.weight.shape[1 if type(layer).__name__ == "Conv1D" else 0]
        return count + 4 * rows
    blocks = math.ceil(count / 64)
    # 4-bit codes; an 8-bit scale per block; an fp32 scale per 256 blocks; fp32 code tables and
    # the scales' mean (16 + 256 + 1 values)
    return count / 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


def quantized_weights(model: nn.Module) -> dict[int, nn.Module]:
    """The weights a quantised base stores in 4 or 8 bits, by id, with their layer: the layers
    peftkit's loader quantises (every linear layer but the output layer, a new task head and
    what the architecture keeps in float32, as transformers chooses)."""
    from peftkit.errors import TargetError
    from peftkit.models.quantize import quantizable_layers

    try:
        names = quantizable_layers(model)
    except TargetError:
        return {}
    layers = [model.get_submodule(name) for name in names]
    return {id(layer.weight): layer for layer in layers}
