"""Several LoRA adapters on one base model: load many, switch the active one, combine some into a
new adapter, merge any one into the base, save any one in PEFT's format.

Combination reuses PEFT's `add_weighted_adapter`; what each method gives, per adapted matrix, with
delta_i = s_i B_i A_i (s_i the adapter's scale) and weights w_i:
- "cat": exactly sum_i w_i delta_i (A and B stacked; the rank is the sum of the ranks).
- "task_arithmetic" (Ilharco et al., 2023): the weighted sum of the task vectors, which for LoRA
  updates is exactly what "cat" builds; the name says which merge of the literature it is.
- "svd": the best rank-k approximation of sum_i w_i delta_i (k = svd_rank, default the largest
  rank); exact when k reaches the sum of the ranks.
- "linear": (sum_i sqrt(w_i s_i) B_i)(sum_i sign_i sqrt(w_i s_i) A_i): A and B are averaged
  separately, so cross terms B_i A_j appear; an approximation, exact only for one adapter.
- "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd": TIES (Yadav et al.,
  2023: keep each delta's top `density` share of entries by magnitude, elect each entry's sign by
  the sum of the kept values, average the kept values that agree with it), DARE (Yu et al.,
  2024: keep each entry with probability `density`, divide by `density`, then sum or TIES) on
  the full deltas, each weighted by w_i before the sum or the mean (signs are elected on the
  unweighted deltas), then truncated to rank `svd_rank` by SVD (exact when it reaches the
  merged delta's rank).
- "ties", "dare_linear", "dare_ties", "magnitude_prune": the same operations on the A and the B
  factors separately (PEFT's cheap forms; equal ranks needed); approximations.
PEFT 0.21.2 gives the new adapter rsLoRA's scale sqrt(r) when the first source used rsLoRA, though
every method above builds factors meant for scale 1 (measured: "cat" of rsLoRA adapters is off by
that factor); `combine` sets the new adapter's scale to 1."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from peftkit import io
from peftkit.errors import AdapterError, ConfigError
from peftkit.methods.lora.init import changes_base

BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches
COMBINATIONS = (
    "cat",
    "task_arithmetic",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_NEEDS_DENSITY = {c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude"))}
# Combinations of the A and B factors one by one: the factors must have the same shapes.
NEEDS_EQUAL_RANKS = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
# What PEFT's add_weighted_adapter calls each combination.
_PEFT_NAME = {"task_arithmetic": "cat"}


def _read_lora_config(folder: Path) -> dict[str, Any]:
    """An adapter folder's config, refusing anything that is not a LoRA adapter on the plain
    base (PiSSA/OLoRA/LoftQ adapters belong to the base their init rewrote)."""
    saved = io.read_json(folder / io.CONFIG_NAME, io.CONFIG_NAME)
    if saved.get("peft_type") != "LORA":
        raise AdapterError(
            f"{folder} holds a {saved.get('peft_type') or saved.get('peftkit_method')!r} adapter; "
            "composition works on LoRA adapters (lora, rslora, dora) only."
        )
    init = saved.get("init_lora_weights")
    if init == "loftq":
        raise AdapterError(
            f"{folder} was initialised with loftq, which rewrote its base: it belongs to its "
            "quantised base and does not combine with adapters of the full-precision base. "
            "Merge it on its own instead."
        )
    if changes_base(init):
        raise AdapterError(
            f"{folder} was initialised with {init}, which rewrote the base it trained on: "
            "loading it would change the base for every other adapter. Convert it first: "
            "peftkit.api.convert(base, folder, output) (peftkit combine "
            "does this itself for pissa and olora)."
        )
    return saved


def _recorded_base(folder: Path, saved: dict[str, Any]) -> str | None:
    """The base model an adapter says it was trained on (peftkit.json, else PEFT's field)."""
    info = folder / io.PEFTKIT_INFO_NAME
    if info.is_file():
        recorded = io.read_json(info, io.PEFTKIT_INFO_NAME).get("base_model")
        if recorded:
            return str(recorded)
    return saved.get("base_model_name_or_path") or None


def load_adapters(base_model: nn.Module, folders: dict[str, str | Path]) -> peft.PeftModel:
    """Load several LoRA adapters onto one base, by name; the first one is active."""
    if not folders:
        raise ConfigError("load_adapters needs at least one {name: folder} entry.")
    model = None
    for name, folder in folders.items():
        model = add_adapter(base_model if model is None else model, name, folder)
    model.set_adapter(next(iter(folders)), inference_mode=True)
    return model


def add_adapter(model: nn.Module, name: str, folder: str | Path) -> peft.PeftModel:
    """Load one more LoRA adapter under `name` (onto a base model or a multi-adapter model)."""
    folder = Path(folder)
    saved = _read_lora_config(folder)
    recorded = _recorded_base(folder, saved)
    if isinstance(model, peft.PeftModel):
        if name in model.peft_config:
            raise AdapterError(f"An adapter named '{name}' is already loaded; choose another name.")
        others = getattr(model, "_peftkit_bases", {})
        clash = {n: b for n, b in others.items() if recorded and b and b != recorded}
        if clash:
            raise AdapterError(
                f"Adapter '{name}' was trained on '{recorded}', but {sorted(clash)} on "
                f"'{next(iter(clash.values()))}': adapters combine only on the base they share."
            )
    try:
        if isinstance(model, peft.PeftModel):
            model.load_adapter(str(folder), adapter_name=name)
        else:
            model = peft.PeftModel.from_pretrained(model, str(folder), adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as error:
        raise AdapterError(
            f"Adapter '{name}' in {folder} does not fit this base model ({str(error)[:300]}). "
            "Load it onto the base model it was trained on."
        ) from None
    bases = dict(getattr(model, "_peftkit_bases", {}))
    bases[name] = recorded
    object.__setattr__(model, "_peftkit_bases", bases)
    return model


def adapter_names(model: peft.PeftModel) -> list[str]:
    """The names of the adapters loaded on a model, in load order."""
    return list(getattr(model, "peft_config", {}))


def check_loaded(model: nn.Module, names: list[str]) -> None:
    """Raise naming the loaded adapters if any of `names` is not loaded."""
    loaded = adapter_names(model)
    missing = [name for name in names if name not in loaded]
    if missing:
        raise AdapterError(
            f"Adapter(s) {missing} not loaded; loaded adapters: {loaded or 'none'}. "
            "Load them with peftkit.methods.lora.compose.add_adapter(model, name, folder)."
        )


def set_active(model: peft.PeftModel, name: str) -> None:
    """Make `name` the adapter every forward and generate call uses."""
    check_loaded(model, [name])
    model.set_adapter(name, inference_mode=True)  # switching serves; it does not unfreeze


def adapted_modules(model: nn.Module, name: str) -> set[str]:
    """Names of the modules an adapter changes."""
    return {
        module_name.removeprefix("base_model.model.")
        for module_name, module in model.named_modules()
        if isinstance(module, LoraLayer) and name in module.lora_A
    }


def delta_weights(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Per adapted module, the adapter's update s B A in the base weight's layout."""
    check_loaded(model, [name])
    with torch.no_grad():
        return {
            module_name.removeprefix("base_model.model."): module.get_delta_weight(name)
            for module_name, module in model.named_modules()
            if isinstance(module, LoraLayer) and name in module.lora_A
        }


def _check_combinable(model: nn.Module, names: list[str], weights: list[float], how: str) -> None:
    """Refuse unknown methods, mismatched weights, and adapters on different modules."""
    if how not in COMBINATIONS:
        raise ConfigError(f"Unknown combination '{how}'; use one of: {', '.join(COMBINATIONS)}.")
    if len(names) < 1 or len(names) != len(weights):
        raise ConfigError(
            f"Give one weight per adapter: {len(names)} names, {len(weights)} weights."
        )
    check_loaded(model, names)
    ranks = {name: model.peft_config[name].r for name in names}
    if how in NEEDS_EQUAL_RANKS and len(set(ranks.values())) > 1:
        raise AdapterError(
            f"Combination '{how}' merges the A and B factors one by one and needs equal ranks; "
            f"the ranks are {ranks}. Use cat, task_arithmetic, svd or an '_svd' form."
        )
    dora = [name for name in names if model.peft_config[name].use_dora]
    if dora:
        raise AdapterError(
            f"Adapter(s) {dora} use DoRA, whose magnitude vectors do not combine by weighted sums; "
            "combine plain LoRA or rsLoRA adapters, or merge DoRA adapters one at a time."
        )
    targets = {name: adapted_modules(model, name) for name in names}
    first = names[0]
    for name in names[1:]:
        if targets[name] != targets[first]:
            only = sorted(targets[name] ^ targets[first])[:3]
            raise AdapterError(
                f"Adapters '{first}' and '{name}' adapt different modules (e.g. {only}); "
                "combine adapters trained with the same target_modules."
            )
    bases = {getattr(model, "_peftkit_bases", {}).get(name) for name in names} - {None}
    if len(bases) > 1:
        raise AdapterError(f"Adapters {names} come from different base models: {sorted(bases)}.")


def check_density(how: str, density: float | None) -> None:
    """A pruning combination needs a density in (0, 1]; the others take none."""
    if how in _NEEDS_DENSITY:
        if density is None or not 0.0 < density <= 1.0:
            raise ConfigError(
                f"Combination '{how}' prunes: set density in (0, 1] (the share of each delta's "
                f"entries kept), got {density}."
            )
    elif density is not None:
        raise ConfigError(
            f"Combination '{how}' does not prune: density applies only to "
            f"{', '.join(sorted(_NEEDS_DENSITY))}."
        )


def combine(
    model: peft.PeftModel,
    names: list[str],
    weights: list[float],
    new_name: str,
    how: str = "cat",
    density: float | None = None,
    svd_rank: int | None = None,
) -> str:
    """Add adapter `new_name` combining `names` with `weights` (see the module docstring)."""
    _check_combinable(model, names, weights, how)
    if new_name in adapter_names(model):
        raise AdapterError(f"An adapter named '{new_name}' is already loaded; choose another name.")
    check_density(how, density)
    if svd_rank is not None and svd_rank < 1:
        raise ConfigError(f"svd_rank must be at least 1, got {svd_rank}.")
    model.add_weighted_adapter(
        adapters=names,
        weights=list(weights),
        adapter_name=new_name,
        combination_type=_PEFT_NAME.get(how, how),
        density=density,
        svd_rank=svd_rank,
    )
    # Every combination builds factors for scale 1; PEFT keeps rsLoRA's sqrt(r) (a PEFT bug).
    model.peft_config[new_name].use_rslora = False
    for module in model.modules():
        if isinstance(module, LoraLayer) and new_name in module.scaling:
            module.scaling[new_name] = 1.0
    return new_name


def save_adapter(model: peft.PeftModel, name: str, folder: str | Path) -> Path:
    """Write one loaded adapter as a PEFT LoRA folder (adapter_config.json + safetensors)."""
    check_loaded(model, [name])
    saved = model.peft_config[name].to_dict()
    saved = {k: sorted(v) if isinstance(v, set) else v for k, v in saved.items()}
    tensors = peft.get_peft_model_state_dict(model, adapter_name=name)
    return io.write_folder_atomically(folder, {io.CONFIG_NAME: saved, io.WEIGHTS_NAME: tensors})


def merge_adapter(model: peft.PeftModel, name: str) -> nn.Module:
    """A plain transformers model with adapter `name` folded in (on a copy: the input is kept)."""
    check_loaded(model, [name])
    duplicate = copy.deepcopy(model)
    duplicate.set_adapter(name)
    return duplicate.merge_and_unload(adapter_names=[name])
