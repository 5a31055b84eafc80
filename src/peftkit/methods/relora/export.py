"""ReLoRA's exports: the whole trained update as a merged model, or as a PEFT LoRA adapter.

After training, a ReLoRA model's update is the sum of every merged restart plus the live B A
(`accumulated_update`). `save_merged` folds it into the base and writes a plain transformers model;
`save_as_lora` writes a PEFT LoRA adapter of a chosen rank by truncated SVD of each matrix's whole
update (exact when the rank reaches restarts x r + r) and returns the relative approximation
error per matrix."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
from torch import nn

from peftkit import io
from peftkit.errors import ConfigError
from peftkit.methods import lora
from peftkit.methods.relora import lora_layers, state


def accumulated_update(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per module, everything training added to W: merged deltas plus the current B A."""
    relora = state(model)
    with torch.no_grad():
        return {
            name: relora.merged[name] + layer.get_delta_weight("default").float()
            for name, layer in lora_layers(model).items()
        }


def save_merged(model: peft.PeftModel, folder: str | Path) -> Path:
    """The whole accumulated update folded into the base, written with save_pretrained."""
    merged = copy.deepcopy(model).merge_and_unload()
    with io.atomic_folder(folder) as staging:
        merged.save_pretrained(str(staging))
    return Path(folder)


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD: B (out x r), A (r x in), B A closest to delta; relative Frobenius error."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b = u[:, :rank] * s[:rank]
    a = vh[:rank]
    error = torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta).clamp_min(
        1e-30
    )
    return b, a, float(error)


def save_as_lora(model: peft.PeftModel, folder: str | Path, rank: int) -> dict[str, float]:
    """A PEFT LoRA adapter of `rank` approximating the whole update; relative error per module."""
    if rank < 1:
        raise ConfigError(f"The exported LoRA rank must be at least 1, got {rank}.")
    saved = lora.adapter_config(model, state(model).config)
    saved.update(r=rank, lora_alpha=float(rank), use_rslora=False)  # scale 1: B A is the update
    tensors = dict(lora.state_dict(model))  # keeps a trained task head (modules_to_save)
    errors = {}
    layers = lora_layers(model)
    for name, delta in accumulated_update(model).items():
        transposed = getattr(layers[name], "fan_in_fan_out", False)
        b, a, errors[name] = low_rank_factors(delta.T if transposed else delta, rank)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    io.write_folder_atomically(folder, {io.CONFIG_NAME: saved, io.WEIGHTS_NAME: tensors})
    return errors
