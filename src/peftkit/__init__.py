"""peftkit: parameter-efficient fine-tuning, every method behind one API, every run measured.

    import peftkit
    model = peftkit.apply(model, peftkit.LoraConfig(rank=8))
    print(peftkit.summary(model))
    peftkit.save(model, "adapter/")
    tuned = peftkit.load(base_model, "adapter/")

Names are imported lazily so that `peftkit --help` does not pay for torch."""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# bitsandbytes warns, when it is first imported (by PEFT or transformers as often as by peftkit),
# that an optional CPU inference kernel fetched from the hub by the `kernels` package is absent;
# peftkit does not use that path (models/quantize.py finish_quantized). Set before any import.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "apply": "peftkit.api",
    "save": "peftkit.api",
    "load": "peftkit.api",
    "merge": "peftkit.api",
    "summary": "peftkit.api",
    "config_for": "peftkit.api",
    "load_model": "peftkit.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The public functions, and every registered method's config class (peftkit.LoraConfig):
    imported on first use, so `peftkit --help` does not pay for torch."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name.endswith("Config") and not name.startswith("_"):
        from peftkit.registry import METHODS

        for method in METHODS:
            if method.config_cls.__name__ == name:
                return method.config_cls
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
