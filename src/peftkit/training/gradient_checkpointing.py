"""Gradient (activation) checkpointing for any method: each transformer layer keeps only its input
during the forward pass and runs again in the backward pass, so saved activations shrink from
every layer's intermediates to one layer's at a time, for about a third more compute.

peftkit turns on transformers' own per-layer checkpointing on the base model before the method
is applied, non-reentrant: PyTorch's recommended form, which needs no input that requires a
gradient (a frozen embedding's output does not) and runs the layers' forward hooks again while
recomputing, so methods attached through hooks (bottleneck adapters, BitFit's float32 biases,
prefix tuning's per-layer prefixes) recompute exactly what the forward pass ran."""

from __future__ import annotations

from torch import nn

from peftkit.errors import ConfigError


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant gradient checkpointing in a transformers model's layers."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing (transformers "
            "offers none for it); set training.gradient_checkpointing: false."
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
