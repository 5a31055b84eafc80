"""What the LoRA family's options (`init`, `loftq_iterations`, `loraplus_lr_ratio`) add around
lora.py's functions. `lora_method` builds every LoRA-family record (lora, rslora, dora) with
apply, remove and adapter_config wrapped by these, and with `hooks` from here; plain LoRA with the
defaults passes through them unchanged and has no hooks."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from peftkit.method import TrainingHooks
from peftkit.methods.lora_init import check_init_fits, eva_prepare, initialise, restore_base
from peftkit.methods.lora_plus import split_b_groups

# adapter_config.json key for the LoRA+ ratio: a training option PEFT has no field for, kept so
# that a run resumed from a checkpoint rebuilds the same optimizer groups. PEFT ignores the key
# (with a warning) when it loads the adapter.
LORAPLUS_KEY = "loraplus_lr_ratio"


def initialising(apply: Callable[[nn.Module, Any], Any]) -> Callable[[nn.Module, Any], Any]:
    """apply, refusing an init the model cannot take before anything changes, then running it."""

    def apply_with_init(model: nn.Module, config: Any) -> Any:
        check_init_fits(model, config)
        tuned = apply(model, config)
        initialise(tuned, config)
        return tuned

    return apply_with_init


def restoring(remove: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
    """remove, then the base weights a base-changing init rewrote put back."""

    def remove_and_restore(model: Any) -> nn.Module:
        plain = remove(model)
        restore_base(model, plain)
        return plain

    return remove_and_restore


def recording(
    adapter_config: Callable[[Any, Any], dict[str, Any]],
) -> Callable[[Any, Any], dict[str, Any]]:
    """adapter_config, plus the LoRA+ ratio where one is set."""

    def with_options(model: Any, config: Any) -> dict[str, Any]:
        saved = adapter_config(model, config)
        if config.loraplus_lr_ratio is not None:
            saved[LORAPLUS_KEY] = config.loraplus_lr_ratio
        return saved

    return with_options


def hooks(model: nn.Module, config: Any) -> TrainingHooks:
    """EVA's data pass before training; LoRA+'s optimizer groups once the optimizer exists."""
    ratio = config.loraplus_lr_ratio
    return TrainingHooks(
        prepare=eva_prepare if config.init == "eva" else None,
        replace_optimizer=partial(split_b_groups, ratio=ratio) if ratio is not None else None,
    )
