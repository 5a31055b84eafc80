"""Glue shared by methods that are one HF PEFT tuner each ((IA)^3, LoHa, LoKr, VeRA, OFT).

Each such method file holds its config dataclass, the function that turns it into PEFT's config
for a model, and the inverse for PEFT's adapter_config.json; `peft_method` builds the record
around them. What the record does is what LoRA's does: apply through `peft.get_peft_model`, save
and load PEFT's own tensors and config (so `peft.PeftModel.from_pretrained` reads the folder),
merge through `merge_and_unload`, remove through `unload`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import peft
from torch import nn

from peftkit.errors import AdapterError, TargetError
from peftkit.method import Method
from peftkit.targeting import (
    TargetSpec,
    default_targets,
    resolve_targets,
    task_head_modules,
    task_type,
)

# The dataclass field every such method's config repeats, with the same help.
TARGET_HELP = (
    "module names (suffix match), a regex (full match), or 'all-linear'; "
    "default: the architecture's query and value projections"
)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers Conv1D: a linear layer whose weight is stored transposed."""
    return type(module).__name__ == "Conv1D"


def targets(model: nn.Module, spec: TargetSpec) -> tuple[list[str], bool]:
    """The full names a spec selects (default: query and value projections), checked to exist,
    and whether any of them is a Conv1D (PEFT must then be told `fan_in_fan_out`)."""
    matched = resolve_targets(model, spec if spec is not None else default_targets(model))
    modules = dict(model.named_modules())
    return matched, any(is_conv1d(modules[name]) for name in matched)


def refuse_conv1d(model: nn.Module, matched: list[str], method: str, others: str) -> None:
    """Refuse targets PEFT's layers for `method` cannot wrap (transformers Conv1D, GPT-2's)."""
    modules = dict(model.named_modules())
    conv = [name for name in matched if is_conv1d(modules[name])]
    if conv:
        raise TargetError(
            f"{method} in HF PEFT adapts torch.nn.Linear layers only; {len(conv)} targeted "
            f"layers here are transformers Conv1D (GPT-2's), such as {conv[0]}. Choose Linear "
            f"layers in target_modules, or a method that adapts Conv1D ({others})."
        )


def common_options(model: nn.Module) -> dict[str, Any]:
    """PEFT config arguments every tuner takes: the task type and the new head that must train."""
    return {"task_type": task_type(model), "modules_to_save": task_head_modules(model) or None}


def apply_with(to_peft: Callable[[nn.Module, Any], Any]) -> Callable[[nn.Module, Any], Any]:
    """apply(model, config): wrap the model in the PEFT tuner `to_peft` describes."""

    def apply(model: nn.Module, config: Any) -> peft.PeftModel:
        return peft.get_peft_model(model, to_peft(model, config))

    return apply


def state_dict(model: peft.PeftModel) -> dict[str, Any]:
    """PEFT's own adapter tensors, under the key names PEFT writes to disk."""
    return peft.get_peft_model_state_dict(model)


def load_state_dict(model: peft.PeftModel, tensors: dict[str, Any]) -> None:
    """Load adapter tensors written by state_dict (or by PEFT itself)."""
    result = peft.set_peft_model_state_dict(model, tensors)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise AdapterError(f"Adapter tensors this model has no place for: {unexpected[:5]}.")


def merge(model: peft.PeftModel) -> nn.Module:
    """Fold the update into the base weights and return the plain transformers model."""
    return model.merge_and_unload()


def remove(model: peft.PeftModel) -> nn.Module:
    """Take the tuner's layers out again, restoring the base model unchanged."""
    base = model.base_model.model
    # PEFT's (IA)3 refuses to unload from a quantised base, as it refuses to merge into one, but
    # unloading merges nothing: lift the marks for the call (merging onto a quantised base
    # unloads, dequantises, then merges into plain layers).
    flags = {
        f: getattr(base, f)
        for f in ("is_loaded_in_4bit", "is_loaded_in_8bit")
        if getattr(base, f, False)
    }
    for flag in flags:
        setattr(base, flag, False)
    try:
        return model.unload()
    finally:
        for flag, value in flags.items():
            setattr(base, flag, value)


def adapter_config(model: peft.PeftModel, config: Any) -> dict[str, Any]:
    """PEFT's own adapter_config.json contents (sets as sorted lists, for JSON)."""
    saved = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in saved.items()}


def switch_off(peft_model: Any) -> Callable[[], AbstractContextManager[None]]:
    """The Method.switch_off capability for PEFT-backed methods: inside `with off():` the model
    computes as its plain base (the task head's saved copy switched off too), then switches back
    on exactly the layers that were on. The layers are found once here: PEFT's own
    disable_adapter() walks the whole model on every entry, milliseconds per decoding step."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    layers = [module for module in peft_model.modules() if isinstance(module, kinds)]

    @contextlib.contextmanager
    def off() -> Iterator[None]:
        switched = [layer for layer in layers if not layer.disable_adapters]
        try:
            for layer in switched:
                layer.enable_adapters(False)
            yield
        finally:
            for layer in switched:
                layer.enable_adapters(True)

    return off


def peft_method(
    name: str,
    config_cls: type,
    peft_type: str,
    to_peft: Callable[[nn.Module, Any], Any],
    from_saved: Callable[[dict[str, Any]], Any],
    description: str,
    no_quantized_base: str = "",
) -> Method:
    """The Method record of a method that is one PEFT tuner, mergeable through PEFT."""
    return Method(
        name=name,
        config_cls=config_cls,
        apply=apply_with(to_peft),
        state_dict=state_dict,
        load_state_dict=load_state_dict,
        merge=merge,
        remove=remove,
        peft_type=peft_type,
        adapter_config=adapter_config,
        config_from_adapter=from_saved,
        description=description,
        no_quantized_base=no_quantized_base,
        switch_off=switch_off,
    )
