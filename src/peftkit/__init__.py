"""peftkit: parameter-efficient fine-tuning, every method behind one API, every run measured.

    import peftkit
    model = peftkit.apply(model, peftkit.LoraConfig(rank=8))
    print(peftkit.summary(model))
    peftkit.save(model, "adapter/")
    tuned = peftkit.load(base_model, "adapter/")

Names are imported lazily so that `peftkit --help` does not pay for torch."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply": "peftkit.api",
    "save": "peftkit.api",
    "load": "peftkit.api",
    "merge": "peftkit.api",
    "summary": "peftkit.api",
    "config_for": "peftkit.api",
    "load_model": "peftkit.models",
    "LoraConfig": "peftkit.methods.lora",
    "RsLoraConfig": "peftkit.methods.rslora",
    "DoraConfig": "peftkit.methods.dora",
    "BottleneckConfig": "peftkit.methods.bottleneck",
    "BitFitConfig": "peftkit.methods.bitfit",
    "ChildTuningConfig": "peftkit.methods.child_tuning",
    "PromptTuningConfig": "peftkit.methods.prompt_tuning",
    "PrefixTuningConfig": "peftkit.methods.prefix_tuning",
    "FullConfig": "peftkit.methods.full",
    "AdaLoraConfig": "peftkit.methods.adalora",
    "ReLoraConfig": "peftkit.methods.relora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
