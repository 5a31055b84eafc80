"""Decoding methods that steer a model at generation time without changing its weights.

Names are imported lazily so that importing peftkit.decoding does not pay for torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "proxy_generate": "peftkit.decoding.proxy",
    "proxy_generate_ids": "peftkit.decoding.proxy",
    "proxy_logits": "peftkit.decoding.proxy",
    "ProxyLogitsProcessor": "peftkit.decoding.proxy",
    "ProxyDecodingConfig": "peftkit.decoding.proxy_options",
    "WithoutAdapter": "peftkit.decoding.proxy",
    "VocabularyError": "peftkit.decoding.proxy_options",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'peftkit.decoding' has no attribute {name!r}")
