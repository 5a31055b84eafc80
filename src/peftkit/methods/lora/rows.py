"""Many LoRA adapters on one base, a different adapter (or none) per batch row, at close to the
cost of the base alone: the gathered matmul of Punica and S-LoRA, for a server's decode steps.

PEFT's own mixed batches (`adapter_names=`, see lora_mixed_batch.py) loop, in every LoRA layer,
over the adapters present in the batch: an index, two small matmuls and a scatter per adapter, so
a step's cost grows with the number of distinct adapters (benchmarks/serve.py measures it). Here
each plain LoRA linear layer keeps every loaded adapter's A (in x r) and s * B (r x out) stacked
on a leading slot axis (slot 0 holds zeros: the base; smaller ranks are padded with zeros, which
adds nothing), and a forward hook adds bmm(bmm(x, A[slots]), B[slots]) for the rows' slots: four
operations per layer whatever the number of adapters. PEFT's own LoRA computation is switched off
on those layers, so outside `forward` the serving model computes the base alone.

Adapters the stack cannot express (LoRA on embeddings or convolutions, LoRA bias, modules_to_save)
put the whole model on PEFT's per-row path instead, which handles them. DoRA is refused: its
update depends on each row's whole weight, and PEFT's per-row path refuses it too."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora import Linear, LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from peftkit import io
from peftkit.errors import AdapterError
from peftkit.method import RowAdapters
from peftkit.methods.lora.compose import BASE, adapter_names, add_adapter, check_loaded

STACK_ATTRIBUTE = "_peftkit_row_stack"


@dataclass
class RowStack:
    """The stacked adapters of a serving model, and the slots of the forward under way."""

    slot_of: dict[str, int]  # adapter name -> its slot (0 is the base)
    handles: list[Any] = field(default_factory=list)
    slots: torch.Tensor | None = None  # one slot per row, set only during a forward


def stackable(model: Any) -> bool:
    """Whether every loaded adapter is plain LoRA on linear layers (else PEFT's per-row path)."""
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            return False
        if isinstance(module, LoraLayer):
            if type(module) is not Linear:  # embeddings, convolutions: PEFT's path
                return False
            if any(module.lora_bias.get(name, False) for name in module.lora_A):
                return False
    return True


def stacked_factors(layer: Linear, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (slots, in, r) and s * B (slots, r, out) of a layer; slot 0 and absent adapters: zeros."""
    present = [name for name in names if name in layer.lora_A]
    rank = max(layer.r[name] for name in present)
    weight = layer.lora_A[present[0]].weight
    a = weight.new_zeros(len(names) + 1, layer.in_features, rank)
    b = weight.new_zeros(len(names) + 1, rank, layer.out_features)
    with torch.no_grad():
        for slot, name in enumerate(names, start=1):
            if name in layer.lora_A:
                r = layer.r[name]
                a[slot, :, :r] = layer.lora_A[name].weight.T
                b[slot, :r, :] = layer.lora_B[name].weight.T * layer.scaling[name]
    return a, b


def row_update_hook(stack: RowStack, a: torch.Tensor, b: torch.Tensor) -> Any:
    """A forward hook adding each row's own adapter update to the layer's (base) output."""

    def add_row_updates(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        slots = stack.slots
        if slots is None:
            return output
        x = args[0]
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
        update = torch.bmm(torch.bmm(rows, a.index_select(0, slots)), b.index_select(0, slots))
        return output + update.reshape(output.shape).to(output.dtype)

    return add_row_updates


def restack(model: Any) -> None:
    """Rebuild the stacks after adapters came or went (or choose PEFT's path if they cannot)."""
    old = getattr(model, STACK_ATTRIBUTE, None)
    for handle in old.handles if old else []:
        handle.remove()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not stackable(model):
        for layer in layers:
            layer.enable_adapters(True)
        object.__setattr__(model, STACK_ATTRIBUTE, None)
        return
    names = adapter_names(model)
    stack = RowStack({name: slot for slot, name in enumerate(names, start=1)})
    for layer in layers:
        layer.enable_adapters(False)  # the hook adds the updates instead
        if any(name in layer.lora_A for name in names):
            hook = row_update_hook(stack, *stacked_factors(layer, names))
            stack.handles.append(layer.register_forward_hook(hook))
    object.__setattr__(model, STACK_ATTRIBUTE, stack)


def add(model: Any, name: str, folder: str | Path) -> peft.PeftModel:
    """Load one more LoRA adapter under `name` for per-row serving; the serving model."""
    saved = io.read_json(Path(folder) / io.CONFIG_NAME, io.CONFIG_NAME)
    if saved.get("use_dora"):
        raise AdapterError(
            f"Adapter '{name}' ({folder}) is a DoRA adapter: its update depends on each row's "
            "whole weight, so it cannot share a batch with other adapters. Merge it into the base "
            "(peftkit merge) and serve the merged model."
        )
    trainable = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        added = add_adapter(model, name, folder)
    except BaseException:
        roll_back(model, name, trainable)
        raise
    added.eval()
    restack(added)
    return added


def roll_back(model: Any, name: str, trainable: dict[torch.nn.Parameter, bool]) -> None:
    """Undo a failed load of adapter `name` (a shape mismatch: PEFT has injected its layers by
    then), so that `model` computes exactly what it did before the load began."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(model, peft.PeftModel):
            if name in model.peft_config:
                model.delete_adapter(name)
            restack(model)  # PEFT's layers back off, the hooks rebuilt for the adapters left
        else:  # PeftModel.from_pretrained wrapped the bare base's layers in place
            strip_peft_layers(model)
            if hasattr(model, "peft_config"):
                del model.peft_config
    for parameter, flag in trainable.items():
        parameter.requires_grad_(flag)


def strip_peft_layers(module: torch.nn.Module) -> None:
    """Replace every PEFT layer inside `module` by the layer it wraps (in place)."""
    for child_name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            child = child.get_base_layer()
            setattr(module, child_name, child)
        elif isinstance(child, AuxiliaryTrainingWrapper):
            child = child.original_module
            setattr(module, child_name, child)
        strip_peft_layers(child)


def remove(model: Any, name: str) -> Any:
    """Drop adapter `name`; the serving model without it (the plain base once none is left)."""
    check_loaded(model, [name])
    if adapter_names(model) == [name]:
        stack = getattr(model, STACK_ATTRIBUTE, None)
        for handle in stack.handles if stack else []:
            handle.remove()
        return model.unload()  # takes the LoRA layers out: the base model as it was
    with warnings.catch_warnings():  # "adapter was active": no adapter is active when serving
        warnings.filterwarnings("ignore", message=".*was active which is now deleted")
        model.delete_adapter(name)
    bases = dict(getattr(model, "_peftkit_bases", {}))
    bases.pop(name, None)
    object.__setattr__(model, "_peftkit_bases", bases)
    restack(model)
    return model


def forward(model: Any, names: Sequence[str | None], **inputs: Any) -> Any:
    """One forward in which row i goes through adapter names[i] (None: the base alone)."""
    rows = inputs["input_ids"].shape[0]
    if len(names) != rows:
        raise AdapterError(f"Give one adapter name (or None) per row: {rows} rows, {len(names)}.")
    if not isinstance(model, peft.PeftModel):
        if any(name is not None for name in names):
            raise AdapterError(
                f"No adapter is loaded, but rows ask for {sorted(set(names) - {None})}."
            )
        return model(**inputs)
    if model.training:
        raise AdapterError("Per-row adapters are for inference: call model.eval() first.")
    stack = getattr(model, STACK_ATTRIBUTE, None)
    if stack is None:  # PEFT's own per-row path
        check_loaded(model, sorted({name for name in names if name is not None}))
        return model(**inputs, adapter_names=[BASE if n is None else n for n in names])
    unknown = sorted({name for name in names if name is not None and name not in stack.slot_of})
    if unknown:
        check_loaded(model, unknown)  # raises, naming what is loaded
    slots = [0 if name is None else stack.slot_of[name] for name in names]
    device = inputs["input_ids"].device
    stack.slots = torch.tensor(slots, device=device) if any(slots) else None
    try:
        return model(**inputs)
    finally:
        stack.slots = None


ROW_ADAPTERS = RowAdapters(add=add, remove=remove, forward=forward)
