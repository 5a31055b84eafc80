"""Mixed-adapter batches: one forward or generate call in which each row uses its own LoRA adapter
(or none), for serving several task adapters at once.

PEFT's LoRA layers take `adapter_names=[...]`, one name per row, and compute each adapter's update
on its own rows only; "__base__" means no adapter. Checked on transformers 5.24 / PEFT 0.21.2 for
forward and generate (greedy and beam search: PEFT repeats the names per beam), for every family
peftkit tests (tests/test_mixed_batch.py). These functions add the checks PEFT leaves out: one name
per row, names that are loaded, eval mode, no merged adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterError, DataError
from peftkit.methods.lora.compose import BASE, check_loaded


def row_adapter_names(model: nn.Module, adapters: Sequence[str | None], rows: int) -> list[str]:
    """PEFT's per-row names: None becomes "__base__"; every name must be loaded."""
    if len(adapters) != rows:
        raise DataError(f"Give one adapter name (or None) per row: {rows} rows, {len(adapters)}.")
    named = [name for name in adapters if name is not None]
    check_loaded(model, sorted(set(named), key=named.index))
    if model.training:
        raise AdapterError("Mixed-adapter batches are for inference: call model.eval() first.")
    merged = [name for module in model.modules() for name in getattr(module, "merged_adapters", [])]
    if merged:
        raise AdapterError(f"Adapter(s) {merged} are merged into the weights; unmerge them first.")
    return [BASE if name is None else name for name in adapters]


def _rows(inputs: dict[str, Any]) -> int:
    """The batch size of a dict of model inputs."""
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        if key in inputs and inputs[key] is not None:
            return int(inputs[key].shape[0])
    raise DataError("Mixed batches need input_ids, inputs_embeds or attention_mask.")


def mixed_forward(model: nn.Module, adapters: Sequence[str | None], **inputs: Any) -> Any:
    """One forward pass in which row i uses adapter adapters[i] (None: the base model)."""
    names = row_adapter_names(model, adapters, _rows(inputs))
    with torch.no_grad():
        return model(**inputs, adapter_names=names)


def mixed_generate(model: nn.Module, adapters: Sequence[str | None], **inputs: Any) -> Any:
    """One generate call in which row i decodes with adapter adapters[i] (None: the base)."""
    names = row_adapter_names(model, adapters, _rows(inputs))
    return model.generate(**inputs, adapter_names=names)
