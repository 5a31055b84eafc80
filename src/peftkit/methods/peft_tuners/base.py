"""Glue shared by methods that are one HF PEFT tuner each ((IA)^3, LoHa, LoKr, VeRA, OFT).

Each such method file holds its config dataclass, the function that turns it into PEFT's config
for a model, and the inverse for PEFT's adapter_config.json; `peft_method` builds the record
around them. What the record does is what LoRA's does: apply through `peft.get_peft_model`, save
and load PEFT's own tensors and config (so `peft.PeftModel.from_pretrained` reads the folder),
merge through `merge_and_unload`, remove through `unload`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import peft
from torch import nn

from peftkit.errors import AdapterError, ConfigError, TargetError
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


def peft_spec(model: nn.Module, spec: TargetSpec) -> TargetSpec:
    """The target spec to hand PEFT: as written (suffixes, a regex or 'all-linear'; default: the
    architecture's), not the full names it resolves to, so that PEFT's layers_to_transform and
    layers_pattern still apply (PEFT takes a listed full name as chosen outright)."""
    return spec if spec is not None else default_targets(model)


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


# The field every such method's config has for PEFT's fields it does not name itself.
PEFT_FIELDS_HELP = (
    "further fields of PEFT's config, as PEFT saves them in adapter_config.json (alpha_pattern, "
    "rank_pattern, layers_to_transform, exclude_modules, bias, modules_to_save, "
    "trainable_token_indices, ...), passed to PEFT as they are; loading a PEFT adapter sets them"
)

# adapter_config.json keys that record where an adapter came from, not what it computes.
BOOKKEEPING = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
     "revision", "inference_mode", "runtime_config"}
)  # fmt: skip


def plain(value: Any) -> Any:
    """A config value in the form JSON gives it back (sets and tuples as sorted lists, enums as
    their values), so a saved value and a built one compare equal when they mean the same."""
    value = getattr(value, "value", value)  # PEFT's enums
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(plain(v) for v in value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value


def peft_defaults(peft_cls: type) -> dict[str, Any]:
    """Every field of a PEFT config class with its default value."""
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(peft_cls)
    }


def saved_peft_fields(
    saved: dict[str, Any], peft_cls: type, represented: frozenset[str]
) -> dict[str, Any] | None:
    """The fields of a saved PEFT adapter_config.json that the method's own config does not
    name (`represented`) and that differ from PEFT's defaults: what must reach PEFT as they are
    for the adapter to compute what it computed. A key PEFT's config class does not have is
    refused by name: no one here knows what it would change."""
    defaults = peft_defaults(peft_cls)
    extra = {}
    for key, value in saved.items():
        if key in represented or key in BOOKKEEPING:
            continue
        if key not in defaults:
            raise AdapterError(
                f"adapter_config.json has the field {key!r} = {value!r}, which PEFT "
                f"{peft.__version__}'s {peft_cls.__name__} does not know, so peftkit cannot "
                "honour it; load it with the PEFT version that wrote it."
            )
        if plain(value) != plain(defaults[key]):
            extra[key] = value
    return extra or None


def build_peft_config(peft_cls: type, options: dict[str, Any], config: Any) -> Any:
    """PEFT's config from peftkit's options plus the config's `peft_fields` (PEFT's own fields
    it does not name, such as a loaded adapter's alpha_pattern); modules_to_save from both."""
    extra = dict(getattr(config, "peft_fields", None) or {})
    named = sorted(set(extra) & (set(options) - {"modules_to_save", "fan_in_fan_out"}))
    if named:
        raise ConfigError(
            f"peft_fields sets {', '.join(named)}, which this method's own options set; "
            "use those options instead."
        )
    unknown = sorted(set(extra) - set(peft_defaults(peft_cls)))
    if unknown:
        raise ConfigError(
            f"peft_fields names {', '.join(unknown)}, not fields of PEFT's {peft_cls.__name__}."
        )
    heads = list(options.get("modules_to_save") or [])
    saved_heads = list(extra.pop("modules_to_save", None) or [])
    kept = heads + [name for name in saved_heads if name not in heads]
    return peft_cls(**{**options, **extra, "modules_to_save": kept or None})


def check_saved_fields(
    model: peft.PeftModel, saved: dict[str, Any], own: frozenset[str] = frozenset()
) -> None:
    """After a load's apply: refuse, naming the field, any field of the saved adapter_config.json
    that the PEFT config the model was built with does not carry (`own`: keys peftkit adds and
    reads itself). target_modules is checked by the tensors themselves (a module adapted on one
    side only is a missing or extra tensor); modules_to_save may hold more (the task head
    peftkit adds)."""
    built = plain(model.peft_config["default"].to_dict())
    for key, value in saved.items():
        if key in BOOKKEEPING or key in own or key == "target_modules":
            continue
        want, have = plain(value), built.get(key)
        if key == "modules_to_save":
            missing = [name for name in want or [] if name not in (have or [])]
            if missing:
                raise AdapterError(
                    f"adapter_config.json's modules_to_save {value!r} is not honoured: "
                    f"{missing} would not be loaded."
                )
            continue
        if want != have:
            raise AdapterError(
                f"adapter_config.json's field {key!r} = {value!r} is not honoured by peftkit's "
                f"load of this {saved.get('peft_type', '')} adapter (it would build {have!r}); "
                "load it with peft.PeftModel.from_pretrained instead."
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
    check_loaded: Callable[[Any, dict[str, Any]], None] = check_saved_fields,
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
        check_loaded=check_loaded,
    )
