"""The base model's storage precision: dtype names, how a loaded model's weights are stored, and
float32 master weights for whatever trains on a half-precision base.

peftkit chooses every dtype itself: a checkpoint loads in the recipe's `base.dtype` (float32
unless asked), never in whatever dtype it was saved in. On a half-precision base the frozen
weights stay half, and every trainable parameter (an adapter, a head, a bias, a prompt) is kept
in float32, the master copy the optimizer updates; where the module it belongs to computes in
half precision, the module sees a half-precision copy cast from the master on every call (as
mixed-precision training does), so its gradient reaches the master in float32 and small updates
are not rounded away."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.config import nearest
from peftkit.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
QUANTIZED = ("nf4", "fp4", "int8")
# Where keep_float32_masters leaves the function that undoes it.
_MASTERS = "_peftkit_float32_masters"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a base dtype name (fp32, bf16, fp16), or a ConfigError naming them."""
    if name not in DTYPES:
        guess = nearest(str(name), list(DTYPES))
        hint = f" Did you mean '{guess}'?" if guess else ""
        raise ConfigError(f"Unknown base dtype {name!r}.{hint} Use one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16 or fp16 for a torch dtype (its own name for any other)."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def quantized_kind(parameter: torch.Tensor) -> str | None:
    """nf4 / fp4 / int8 for a bitsandbytes parameter, None for an ordinary tensor."""
    kind = type(parameter).__name__
    if kind == "Params4bit":
        return str(getattr(parameter, "quant_type", "nf4"))
    return "int8" if kind == "Int8Params" else None


def base_storage(model: nn.Module) -> str | None:
    """How a model's weights are stored: 'nf4', 'fp4' or 'int8' when its linear layers are
    quantised, else 'bf16' or 'fp16' when any floating weight is half precision, else 'fp32'.
    None for a model on the meta device (the memory estimator's, which holds no storage)."""
    parameters = list(model.parameters())
    if parameters and all(p.is_meta for p in parameters):
        return None
    for parameter in parameters:
        kind = quantized_kind(parameter)
        if kind is not None:
            return kind
    for parameter in parameters:
        if parameter.dtype in HALF:
            return dtype_name(parameter.dtype)
    return "fp32"


def is_quantized(storage: str | None) -> bool:
    """True for a base whose linear layers bitsandbytes stores in 4 or 8 bits."""
    return storage in QUANTIZED


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's (first) floating-point weight that is not quantised."""
    for parameter in model.parameters():
        if quantized_kind(parameter) is None and parameter.dtype.is_floating_point:
            return parameter.dtype
    return torch.float32


def is_low_bit(storage: str | None) -> bool:
    """True for a base whose weights cannot take small updates: half precision or quantised."""
    return storage is not None and storage != "fp32"


def weight_count(parameter: torch.Tensor) -> int:
    """How many weights a parameter holds: a packed 4-bit tensor stores two per byte, its
    original shape in its quant_state."""
    state = getattr(parameter, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's weights and buffers take, quantisation constants included (each
    shared tensor once)."""
    seen: set[int] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
        state = getattr(tensor, "quant_state", None)  # NF4: block scales (and their own scales)
        while state is not None:
            for value in vars(state).values():
                add(value)
            state = getattr(state, "state2", None)
        add(getattr(tensor, "SCB", None))  # int8: one scale per output row
    return total


def _cast_in(name: str, master: nn.Parameter, dtype: torch.dtype) -> Callable:
    """A forward pre-hook that puts a `dtype` copy of the master in the module's place."""

    def hook(module: nn.Module, args: Any) -> None:
        module._parameters[name] = master.to(dtype)  # differentiable: the gradient reaches master

    return hook


def _restore(name: str, master: nn.Parameter) -> Callable:
    """A forward hook that puts the master back once the call is over (also after an error)."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        module._parameters[name] = master

    return hook


def keep_float32_masters(model: nn.Module) -> Callable[[], None]:
    """Make every trainable half-precision parameter a float32 master, its module computing
    with a half copy cast from it on each call; returns the function that undoes it."""
    changed: list[tuple[nn.Parameter, torch.dtype]] = []
    handles: list[Any] = []
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not parameter.requires_grad or parameter.dtype not in HALF:
                continue
            dtype = parameter.dtype
            if all(parameter is not done for done, _ in changed):
                changed.append((parameter, dtype))
            handles.append(module.register_forward_pre_hook(_cast_in(name, parameter, dtype)))
            handles.append(
                module.register_forward_hook(_restore(name, parameter), always_call=True)
            )
    for parameter, _ in changed:
        parameter.data = parameter.data.float()

    def undo() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        for parameter, dtype in changed:
            parameter.data = parameter.data.to(dtype)
        changed.clear()

    object.__setattr__(model, _MASTERS, undo)
    return undo


def release_float32_masters(model: nn.Module) -> None:
    """Undo keep_float32_masters (a merge folds trained values into the base's own dtype)."""
    undo = getattr(model, _MASTERS, None)
    if undo is not None:
        undo()
        object.__delattr__(model, _MASTERS)
