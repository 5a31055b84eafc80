"""Child-Tuning (Xu et al., EMNLP 2021): update only a child network of the model's weights.

Mode F (task-free): all weights train, but each optimizer step keeps a fresh Bernoulli(p) share of
every gradient, scaled by 1/p; entries outside the step's mask do not move at all (the reference
optimizer lets Adam's momentum and weight decay move them). The masking lives in the optimizer
that `hooks().replace_optimizer` gives: ChildTuningAdamW in place of a plain AdamW
(child_tuning_adamw.py), any other optimizer masked around its step (child_tuning_masks.py).

Mode D (task-driven): before training, the Fisher information ranks every weight of the
transformer layers (child_tuning_subnetwork.py); the top p fraction is the child network, fixed for
the run. Each weight keeps its chosen entries as a trainable 1-D `values` tensor with fixed
`indices`, folded in by a parametrization; the dense weight stays frozen, so optimizer state
scales with p (the reference code keeps full Adam state).

Both save a sparse patch of each changed tensor (sparse_patch.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftkit.config import to_dict
from peftkit.errors import AdapterError, ConfigError
from peftkit.method import Method, TrainingHooks
from peftkit.methods.child_tuning import sparse_patch
from peftkit.methods.child_tuning.adamw import ChildTuningAdamW, replaceable
from peftkit.methods.child_tuning.config import ChildTuningConfig
from peftkit.methods.child_tuning.masks import MaskRecord, mask_around, record_changes
from peftkit.methods.child_tuning.sparse_patch import index_dtype
from peftkit.methods.child_tuning.subnetwork import (
    SubnetworkValues,
    install_values,
    planned_indices,
    subnetwork_indices,
)
from peftkit.targeting import task_head_modules

_STATE = "_peftkit_child_tuning"


@dataclass
class ChildState:
    """What apply leaves on the model."""

    config: ChildTuningConfig
    original_requires_grad: dict[str, bool]
    masking: MaskRecord  # F: this step's masks and the entries changed so far
    patched: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)  # D: name -> owner
    pending: dict[str, int] = field(default_factory=dict)  # F, loading: the saved layout


def _state(model: nn.Module) -> ChildState:
    """The Child-Tuning state apply left on the model."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ConfigError("This model has no Child-Tuning applied: call peftkit.apply first.")
    return state


def apply(model: nn.Module, config: ChildTuningConfig) -> nn.Module:
    """F: every weight trains (masked per step). D: freeze all but the task head until prepare
    chooses the subnetwork (or, when loading, build the saved layout's shapes)."""
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    state = ChildState(config, original, MaskRecord(ratio=config.reserve_ratio))
    object.__setattr__(model, _STATE, state)
    if config.mode == "F":
        model.requires_grad_(True)
        state.pending = dict(config.saved_layout or {})
        return model
    model.requires_grad_(False)
    for name in task_head_modules(model):
        model.get_submodule(name).requires_grad_(True)
    parameters = dict(model.named_parameters())
    saved = config.saved_layout or {}
    for name in saved:
        if name not in parameters:
            raise AdapterError(f"The saved Child-Tuning layout names '{name}', not in this model.")
    # Patch in the model's parameter order, as prepare does (the saved layout is sorted by name):
    # a resumed optimizer matches its saved state to the parameters by position.
    ordered = [name for name in parameters if name in saved]
    _install(state, model, {n: torch.zeros(saved[n], dtype=index_dtype(parameters[n].numel()))
                            for n in ordered})  # fmt: skip
    return model


def choose_subnetwork(model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
    """D's prepare hook: Fisher pass, keep the top p of the layers' weights, patch them in.
    A model that already has its subnetwork (loaded from an adapter, or resumed) keeps it."""
    state = _state(model)
    if not state.patched:
        ratio, count = state.config.reserve_ratio, state.config.fisher_batches
        _install(state, model, subnetwork_indices(model, batches, ratio, count))


def _install(state: ChildState, model: nn.Module, chosen: dict[str, torch.Tensor]) -> None:
    """Fold a trainable values tensor for each tensor's chosen entries into the model."""
    for name, indices in chosen.items():
        state.patched[name] = install_values(model, name, indices)


def replace_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, one_pass: bool = True
) -> torch.optim.Optimizer:
    """F's optimizer: a plain AdamW is replaced by ChildTuningAdamW over the same parameter groups
    (one_pass=False keeps it, masked around its step, as any other optimizer is); at p = 1
    (nothing to mask) the optimizer is kept and records what it changes. D keeps it as it is."""
    state = _state(model)
    if state.config.mode == "D":
        return optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    if state.config.reserve_ratio == 1.0:
        return record_changes(optimizer, state.masking, names)
    if one_pass and replaceable(optimizer):
        groups = [dict(group) for group in optimizer.param_groups]
        return ChildTuningAdamW(groups, state.masking, names)
    return mask_around(optimizer, state.masking, names)


def hooks(model: nn.Module, config: ChildTuningConfig) -> TrainingHooks:
    """D chooses its subnetwork in prepare; F masks inside the optimizer replace_optimizer gives."""
    if config.mode == "D":
        return TrainingHooks(prepare=choose_subnetwork)
    return TrainingHooks(replace_optimizer=replace_optimizer)


def layout(model: nn.Module) -> dict[str, int]:
    """The saved count of changed entries per tensor (its size: saved whole)."""
    state = _state(model)
    if state.pending:
        return dict(state.pending)
    if state.config.mode == "D":
        return {name: _subnetwork(state, name).values.numel() for name in state.patched}
    found = {}
    for name, touched in state.masking.touched.items():
        count = int(touched.sum())
        if count:
            found[name] = sparse_patch.saved_count(count, touched.numel())
    return found


def _subnetwork(state: ChildState, name: str) -> SubnetworkValues:
    """D's parametrization of tensor `name`."""
    module, attribute = state.patched[name]
    return module.parametrizations[attribute][0]


def _current(model: nn.Module, name: str) -> torch.Tensor:
    """A tensor by its original name, as the model now computes it (D's values included)."""
    module_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attribute)


def _changed_entries(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of a changed tensor, whichever mode changed it."""
    state = _state(model)
    if name in state.patched:
        patch = _subnetwork(state, name)
        return patch.indices, patch.values.detach()
    parameter = _current(model, name)
    if name in state.pending:  # loading: shapes only, filled by load_state_dict
        count = state.pending[name]
        return torch.zeros(count, dtype=index_dtype(parameter.numel())), torch.zeros(count)
    indices = state.masking.touched[name].flatten().nonzero().squeeze(1)
    return indices, parameter.detach().flatten()[indices]


def _dense_trainables(model: nn.Module) -> dict[str, torch.Tensor]:
    """D: the densely trained tensors (the task head), under their own names."""
    return {
        n: p.detach()
        for n, p in model.named_parameters()
        if p.requires_grad and ".parametrizations." not in n
    }


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sparse patch of every changed tensor (sparse_patch.encode), plus D's task head."""
    state = _state(model)
    tensors = _dense_trainables(model) if state.config.mode == "D" else {}
    for name, count in layout(model).items():
        tensor = _current(model, name).detach()
        if sparse_patch.encoding(count, tensor.numel()) == "dense":
            tensors[name] = tensor  # no need to list its entries
        else:
            tensors.update(sparse_patch.encode(name, tensor, count, *_changed_entries(model, name)))
    return tensors


def load_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write a saved patch: D into its values tensors, F into the weights themselves."""
    state = _state(model)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, count in layout(model).items():
            numel = _current(model, name).numel()
            indices, values = sparse_patch.decode(tensors, name, count, numel)
            if name in state.patched:
                patch = _subnetwork(state, name)
                patch.indices.copy_(indices)
                patch.values.copy_(values)
                continue
            parameters[name].view(-1)[indices] = values.to(parameters[name].dtype)
            touched = torch.zeros(parameters[name].shape, dtype=torch.bool)
            touched.view(-1)[indices] = True
            state.masking.touched[name] = touched
            state.masking.touched_count.pop(name, None)  # recounted from the new mask
        for name in _dense_trainables(model) if state.config.mode == "D" else {}:
            parameters[name].copy_(tensors[name])
    state.pending.clear()


def adapter_config(model: nn.Module, config: ChildTuningConfig) -> dict[str, Any]:
    """adapter_config.json: the config plus the layout load needs to rebuild the shapes."""
    saved = to_dict(config)
    saved["saved_layout"] = layout(model)
    return {"peftkit_method": "child_tuning", **saved}


def _drop_patches(state: ChildState, keep_values: bool) -> None:
    """Take D's parametrizations out, with their values folded into the weights or not."""
    for module, attribute in state.patched.values():
        parametrize.remove_parametrizations(module, attribute, leave_parametrized=keep_values)
    state.patched.clear()


def merge(model: nn.Module) -> nn.Module:
    """Child-Tuning changes the model's own weights: fold D's patches in, return the plain model."""
    _drop_patches(_state(model), keep_values=True)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo apply: drop D's patches unapplied, restore requires_grad."""
    state = _state(model)
    _drop_patches(state, keep_values=False)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(state.original_requires_grad.get(name, True))
    return model


def planned_subnetwork(model: nn.Module, config: ChildTuningConfig) -> None:
    """D without its Fisher pass, for the memory estimator: a subnetwork of the size prepare
    keeps, on a meta-device model where only the shapes matter. F trains every weight: nothing."""
    state = _state(model)
    if config.mode == "D" and not state.patched:
        _install(state, model, planned_indices(model, config.reserve_ratio))


CHILD_TUNING = Method(
    name="child_tuning",
    config_cls=ChildTuningConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    hooks=hooks,
    merge=merge,
    remove=remove,
    adapter_config=adapter_config,
    description="update a child network: random per step (F) or Fisher-chosen (D)",
    prepare_without_data=planned_subnetwork,
    needs_float32_base="it updates the base's own weights (a child network of them)",
    shardable="its masks and Fisher pass read whole weights and gradients between the backward "
    "pass and the update (F masks each step's gradients; D chooses its subnetwork from whole "
    "gradients and patches each weight)",
)
