"""A method no peftkit module knows, registered only inside a test: generic code (estimate,
recommend) must take it from the registry like any other."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from torch import nn

from peftkit import registry
from peftkit.method import Method


@dataclass(frozen=True)
class NormsOnlyConfig:
    """Train only the normalisation layers (their weights and biases)."""

    include_final: bool = field(default=True, metadata={"help": "also the final norm"})


def _apply(model: nn.Module, config: NormsOnlyConfig) -> nn.Module:
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and (config.include_final or ".layers." in name):
            module.requires_grad_(True)
    return model


NORMS_ONLY = Method(
    name="norms_only",
    config_cls=NormsOnlyConfig,
    apply=_apply,
    state_dict=lambda model: {n: p for n, p in model.named_parameters() if p.requires_grad},
    load_state_dict=lambda model, tensors: None,
    description="a test method: the normalisation layers train",
)


def register(monkeypatch: pytest.MonkeyPatch) -> None:
    """Add the made-up method to the registry's list for one test."""
    monkeypatch.setattr(registry, "METHODS", [*registry.METHODS, NORMS_ONLY])
