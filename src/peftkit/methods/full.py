"""Full fine-tuning: every weight trains. Not parameter-efficient: the baseline every PEFT method is
measured against (memory, speed, quality), so it goes through the same pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit.errors import AdapterError
from peftkit.method import Method


@dataclass(frozen=True)
class FullConfig:
    """Train all parameters (no options)."""


def apply(model: nn.Module, config: FullConfig) -> nn.Module:
    """Make every parameter trainable."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def state_dict(model: nn.Module) -> dict[str, Any]:
    """Every parameter once (tied weights appear under their first name only)."""
    return dict(model.named_parameters())


def load_state_dict(model: nn.Module, tensors: dict[str, Any]) -> None:
    """Copy saved weights into the model."""
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise AdapterError(f"Weights with no place in this model: {result.unexpected_keys[:5]}.")


def merge(model: nn.Module) -> nn.Module:
    """The model is already its own merged form."""
    return model


FULL = Method(
    name="full",
    config_cls=FullConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    merge=merge,
    description="full fine-tuning: every weight trains (the baseline)",
    needs_float32_base="every weight of the base trains",
)
