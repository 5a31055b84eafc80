"""The public API: apply, summary, save, load, merge. Generic code: never asks which method."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit import io, registry
from peftkit.config import from_dict
from peftkit.errors import AdapterError, ConfigError
from peftkit.method import Applied, Method, adapter_files, applied, mark_applied
from peftkit.models.precision import (
    base_storage,
    float_dtype,
    is_low_bit,
    is_quantized,
    keep_float32_masters,
    release_float32_masters,
    torch_dtype,
    weight_count,
)

__all__ = [
    "Applied", "Summary", "applied", "apply", "config_for", "load", "merge", "read_info", "save",
    "summary",
]  # fmt: skip


def config_for(name: str, **options: Any) -> Any:
    """A method's config from its name and keyword options (as in a YAML recipe)."""
    method = registry.get_method(name)
    return from_dict(method.config_cls, options, where=f"method '{name}'")


def refuse_low_bit_base(method: Method, storage: str | None) -> None:
    """Refuse a half-precision or quantised base (storage: bf16, fp16, nf4, int8) for a method
    that changes the base's own weights; its record says why."""
    if is_quantized(storage) and method.no_quantized_base:
        adapting = [
            m.name for m in registry.METHODS if not m.no_quantized_base and not m.needs_float32_base
        ]
        raise ConfigError(
            f"Method '{method.name}' cannot train on a base quantised to {storage}: "
            f"{method.no_quantized_base}. Load the base unquantised (no base.quantize; "
            "base.dtype: bf16 halves it), or use a method that adapts quantised layers: "
            f"{', '.join(adapting)}."
        )
    if not is_low_bit(storage) or not method.needs_float32_base:
        return
    what = "cannot be updated in place" if is_quantized(storage) else "rounds small updates away"
    frozen = [m.name for m in registry.METHODS if not m.needs_float32_base]
    raise ConfigError(
        f"Method '{method.name}' cannot train on a base stored in {storage}: "
        f"{method.needs_float32_base}, and a {storage} weight {what}. Load the base in float32 "
        "(recipe: base.dtype: fp32 and no base.quantize; training.precision: bf16 still "
        f"computes in bf16), or use a method that keeps the base frozen: {', '.join(frozen)}."
    )


def refuse_unshardable(method: Method, sharding: str) -> None:
    """Refuse sharding (training.sharding: fsdp) for a method that cannot be sharded; its
    record's `shardable` says why."""
    if sharding == "none" or not method.shardable:
        return
    others = [m.name for m in registry.METHODS if not m.shardable]
    raise ConfigError(
        f"Method '{method.name}' cannot train sharded ({sharding}): {method.shardable}, and "
        "FSDP keeps only a shard of each weight and gradient on a process. Train it with "
        f"sharding: none (DDP: each process holds the whole model), or use one of: "
        f"{', '.join(others)}."
    )


def check_base(method: Method, model: nn.Module) -> str | None:
    """Refuse the model's base for the method if it must (refuse_low_bit_base); returns the
    base's storage (None on the meta device)."""
    storage = base_storage(model)
    refuse_low_bit_base(method, storage)
    return storage


def apply(model: nn.Module, config: Any, **options: Any) -> nn.Module:
    """Prepare `model` for PEFT with `config` (a config object, or a method name plus options).
    On a half-precision or quantised base, what trains is kept in float32 (models/precision.py)."""
    if isinstance(config, str):
        config = config_for(config, **options)
    elif options:
        raise ConfigError("Pass options either inside the config object or with a method name.")
    method = registry.method_for_config(config)
    storage = check_base(method, model)
    tuned = method.prepare(model, config)
    if is_low_bit(storage):
        keep_float32_masters(tuned)
    mark_applied(tuned, method, config)
    return tuned


@dataclass
class Summary:
    """Trainable and total parameter counts, with trainable counts per module group."""

    trainable: int
    total: int
    groups: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [
            f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"
        ]
        width = max((len(g) for g in self.groups), default=0)
        lines += [f"  {group:<{width}}  {count:>12,}" for group, count in self.groups.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain data for JSON."""
        return {
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "trainable_percent": self.percent,
            "trainable_groups": self.groups,
        }


def parameter_group(name: str) -> str:
    """A parameter name with layer numbers folded to '*' and wrapper prefixes dropped."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.(default|modules_to_save)(?=\.)", "", name)
    return re.sub(r"\.\d+(?=\.)", ".*", name)


def summary(model: nn.Module) -> Summary:
    """Count trainable and total parameters (each shared tensor once), grouped by module."""
    seen: set[int] = set()
    trainable = total = 0
    groups: dict[str, int] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += weight_count(parameter)
        if parameter.requires_grad:
            trainable += parameter.numel()
            group = parameter_group(name)
            groups[group] = groups.get(group, 0) + parameter.numel()
    return Summary(trainable, total, groups)


def save(model: nn.Module, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the adapter (only what the method trained) to `folder`, atomically."""
    files = adapter_files(model)
    refuse_non_finite(files[io.WEIGHTS_NAME], folder)
    if info is not None:
        files[io.PEFTKIT_INFO_NAME] = info
    return io.write_folder_atomically(folder, files)


def refuse_non_finite(tensors: dict[str, Any], folder: str | Path) -> None:
    """Refuse to save weights holding nan or inf, naming the first such tensor (nothing is
    written): an adapter that computes nothing but nan must not look like a result."""
    bad = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            count = int((~torch.isfinite(tensor.detach())).sum())
            if count:
                bad[name] = (count, tensor.numel())
    if bad:
        name, (count, total) = next(iter(bad.items()))
        others = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise AdapterError(
            f"Not saving the adapter to {folder}: tensor '{name}' holds {count} non-finite "
            f"values (nan or inf) of {total}{others}. Training diverged: lower "
            "training.learning_rate or max_grad_norm, or use fp32. Nothing was written."
        )


def read_info(folder: str | Path) -> dict[str, Any]:
    """The peftkit.json beside an adapter (base model, task, labels), or {} if absent."""
    path = Path(folder) / io.PEFTKIT_INFO_NAME
    return io.read_json(path, io.PEFTKIT_INFO_NAME) if path.is_file() else {}


def _check_fits(
    method: Method,
    model: nn.Module,
    tensors: dict[str, Any],
    folder: Path,
    expected: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Refuse tensors whose names or shapes do not fit the model (or the `expected` shapes),
    naming the first mismatches."""
    if expected is None:
        expected = {k: tuple(v.shape) for k, v in method.state_dict(model).items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = [
        f"'{k}': adapter {found[k]} vs model {expected[k]}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    problems += [f"'{k}' is missing from the adapter" for k in expected if k not in found]
    problems += [f"'{k}' has no place in the model" for k in found if k not in expected]
    if problems:
        raise AdapterError(
            f"The adapter in {folder} does not fit this base model ({len(problems)} problems): "
            + "; ".join(problems[:5])
            + ". Load it onto the base model it was trained on."
        )


def _check_fits_on_meta(
    method: Method,
    config: Any,
    base_model: nn.Module,
    tensors: dict[str, Any],
    folder: Path,
    saved: dict[str, Any],
) -> None:
    """Compare the weight file with the shapes the config asks for before anything real is
    built: the method is applied to a copy of the base's module tree on the meta device (no
    memory), so a doctored config (r: 1000000000) is refused instead of allocated. Where the
    method cannot be built on the meta device, the check after the real build still applies."""
    memo: dict[int, Any] = {}
    for tensor in [*base_model.parameters(), *base_model.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = empty
    try:
        with torch.device("meta"):  # what the method creates is shapes only, too
            skeleton = method.apply(copy.deepcopy(base_model, memo), config)
            shapes = {k: tuple(v.shape) for k, v in method.state_dict(skeleton).items()}
    except Exception:  # noqa: BLE001 - a method that needs real data: checked after the build
        return
    try:
        _check_fits(method, skeleton, tensors, folder, shapes)
    except AdapterError:
        # Where a saved field the method does not honour explains the mismatch, name the field.
        if method.check_loaded is not None:
            method.check_loaded(skeleton, saved)
        raise


def load(base_model: nn.Module, folder: str | Path, allow_pickle: bool = False) -> nn.Module:
    """Apply the adapter saved in `folder` to `base_model`; on any error the base is unchanged."""
    folder = Path(folder)
    saved = io.read_json(folder / io.CONFIG_NAME, io.CONFIG_NAME)
    method = registry.method_for_saved(saved)
    try:
        config = method.read_config(saved)
    except AdapterError:
        raise
    except (TypeError, ValueError) as error:  # a doctored value: r: 0, a negative dropout
        raise AdapterError(
            f"{folder / io.CONFIG_NAME} does not describe a valid {method.name} adapter: {error}"
        ) from None
    tensors = io.read_tensors(folder, allow_pickle=allow_pickle)
    storage = check_base(method, base_model)
    if not is_low_bit(storage):
        _check_fits_on_meta(method, config, base_model, tensors, folder, saved)
    model = method.prepare(base_model, config)
    # float32 masters before the saved tensors are copied in, so they are not rounded to half
    undo = keep_float32_masters(model) if is_low_bit(storage) else lambda: None
    try:
        if method.check_loaded is not None:
            method.check_loaded(model, saved)
        _check_fits(method, model, tensors, folder)
        method.load_state_dict(model, tensors)
    except Exception:
        undo()
        if method.remove is not None:
            method.take_out(model)
        raise
    mark_applied(model, method, config)
    return model


def merge(model: nn.Module, dtype: str | None = None) -> nn.Module:
    """Fold the adapter into the base weights; returns a plain transformers model (in `dtype`:
    fp32, bf16 or fp16, if given). On a quantised base the update is folded into dequant(W), the
    weights the quantised model computed with, never into the original weights."""
    state = applied(model)
    if state.method.merge is None:
        raise AdapterError(
            f"Method '{state.method.name}' adds computation that cannot be folded into the base "
            "weights; save the adapter instead."
        )
    target = torch_dtype(dtype) if dtype is not None else None
    if is_quantized(base_storage(model)):
        merged = _merge_onto_dequantized(model, state, target)
    else:
        release_float32_masters(model)
        merged = state.method.merge(model)
    return merged.to(target) if target is not None else merged


def _merge_onto_dequantized(model: nn.Module, state: Applied, dtype: Any) -> nn.Module:
    """Take the adapter off, replace the quantised layers by plain ones holding dequant(W), put
    the adapter back and merge it there: an exact fold of what the quantised model computed."""
    from peftkit.models.quantize import dequantize

    method = state.method
    if method.remove is None:
        raise AdapterError(
            f"Method '{method.name}' cannot be merged onto a quantised base: it cannot take its "
            "update off the base to dequantise it first. Save the adapter instead, or train on "
            "an unquantised base (no base.quantize)."
        )
    tensors = {name: tensor.detach().clone() for name, tensor in method.state_dict(model).items()}
    base = method.take_out(model)
    release_float32_masters(model)
    dequantize(base, dtype or float_dtype(base))
    tuned = method.prepare(base, state.config)
    method.load_state_dict(tuned, tensors)
    return method.merge(tuned)


def check_convertible(folder: str | Path) -> Method:
    """The method of the adapter in `folder`, refusing one that needs no conversion (before any
    model loads)."""
    saved = io.read_json(Path(folder) / io.CONFIG_NAME, io.CONFIG_NAME)
    method = registry.method_for_saved(saved)
    if method.conversion is None or not method.conversion.needed(saved):
        raise AdapterError(
            f"{folder} holds a {method.name} adapter that loads on its base as it is: only "
            "PiSSA/OLoRA-initialised adapters need converting. Save or merge it instead."
        )
    return method


def convert(base_model: nn.Module, folder: str | Path, output: str | Path) -> Path:
    """Rewrite the adapter in `folder` for the unchanged `base_model` (left as it is) into
    `output`, through its method's conversion (PiSSA/OLoRA: a plain LoRA of rank 2r)."""
    import copy

    method = check_convertible(folder)
    loaded = load(copy.deepcopy(base_model), folder)  # records the initial factors
    return method.conversion.write(loaded, output, read_info(folder) or None)
