"""Method names -> Method records: an explicit list, no import side effects, no plugins."""

from __future__ import annotations

from typing import Any

from peftkit.config import nearest
from peftkit.errors import AdapterError, ConfigError
from peftkit.method import Method
from peftkit.methods.adalora import ADALORA
from peftkit.methods.bitfit import BITFIT
from peftkit.methods.bottleneck import BOTTLENECK
from peftkit.methods.child_tuning import CHILD_TUNING
from peftkit.methods.full import FULL
from peftkit.methods.lora import DORA, LORA, RSLORA
from peftkit.methods.peft_tuners import IA3, LOHA, LOKR, OFT, VERA
from peftkit.methods.relora import RELORA
from peftkit.methods.virtual_tokens import PREFIX_TUNING, PROMPT_TUNING

METHODS: list[Method] = [
    LORA,
    RSLORA,
    DORA,
    ADALORA,
    RELORA,
    BOTTLENECK,
    BITFIT,
    CHILD_TUNING,
    PROMPT_TUNING,
    PREFIX_TUNING,
    IA3,
    LOHA,
    LOKR,
    VERA,
    OFT,
    FULL,
]


# What a recipe trains when it names no method: the field's most used PEFT method.
DEFAULT_METHOD = LORA.name


def method_names() -> list[str]:
    """Every registered method's name, in registry order."""
    return [method.name for method in METHODS]


def get_method(name: str) -> Method:
    """The method called `name`, or an error suggesting the nearest name."""
    for method in METHODS:
        if method.name == name:
            return method
    guess = nearest(name, method_names())
    hint = f" Did you mean '{guess}'?" if guess else ""
    raise ConfigError(f"Unknown method '{name}'.{hint} Known methods: {', '.join(method_names())}.")


def method_for_config(config: Any) -> Method:
    """The method whose config class this config object is."""
    for method in METHODS:
        if type(config) is method.config_cls:
            return method
    raise ConfigError(
        f"{type(config).__name__} is not the config of any registered method; "
        f"use one of: {', '.join(m.config_cls.__name__ for m in METHODS)}."
    )


def method_for_saved(saved: dict[str, Any]) -> Method:
    """The method that wrote an adapter_config.json: peftkit's key first, then PEFT's type."""
    if "peftkit_method" in saved:
        return get_method(saved["peftkit_method"])
    peft_type = saved.get("peft_type")
    for method in METHODS:
        if peft_type is not None and method.peft_type == peft_type:
            return method
    raise AdapterError(
        f"adapter_config.json names neither a peftkit method nor a PEFT type peftkit reads "
        f"(peft_type={peft_type!r}); peftkit reads: {', '.join(method_names())}."
    )
