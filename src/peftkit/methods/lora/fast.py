"""A faster forward for PEFT's LoRA Linear layers; PEFT's module tree, parameters and files stay.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` layer by layer: a fresh Bernoulli
mask per layer (saved as a float tensor, with the dropped copy of the input beside it), then two
passes over the output for the scale and the add. benchmarks/lora_vs_full.py's profile put those
at a fifth of a SmolLM2 LoRA step on a CPU. This forward, for a layer in the plain case:

- runs the A projections of sibling layers that read the same input tensor (q/k/v; gate/up) as one
  multiply over their concatenated A matrices, and draws one dropout mask for that input;
- draws the mask as 16-bit lanes of 64-bit random words (a quarter of the generator calls), keeps it
  as bools and recomputes the dropped input in backward instead of saving it;
- accumulates `scale * h B^T` into the base layer's output in one addmm (no scale or add pass);
- with dropout 0 (or in eval mode) draws and copies nothing.

DoRA takes the same path when no dropout is in effect: its output is `(m / ||W + s BA||_c) * (x W^T
+ s h B^T) + bias`, PEFT's formula rearranged, with the norm detached as in PEFT and the paper.
With dropout in training, each DoRA layer runs PEFT's formula as one autograd function with its own
bool mask (dora.py). Either way the norm is computed once per layer until W, A or B change (once
per optimizer step), not on every call. Everything else runs PEFT's own forward: merged or
disabled adapters, several active adapters, per-row `adapter_names`, other LoRA variants, DoRA
with dropout under autocast or on a quantised base, a LoRA bias, base layers other than
nn.Linear, GPT-2's Conv1D and bitsandbytes' NF4 and LLM.int8 layers (which compute through their
own forward), an input in another dtype than the base's without autocast. On a half-precision or
quantised base the branch computes in float32 as PEFT's does (its adapters are float32), but keeps
no float32 copy of each layer's input for backward: it recasts the input.

Siblings are found on the model's first forward (layers under one parent module that received the
very same tensor objects) and share from the second on; a member uses the shared result only when
its input is that tensor object at that version, so a model that calls its layers differently
stays correct (each layer then computes its own).

Under torch.compile the same path traces as one graph (no break; tests/test_lora_fast_compile.py):
masks are drawn outside the autograd functions, with `randint` at the same odds (dynamo traces no
`random_`; a compiled run draws from inductor's generator anyway), a member's share is matched by
its input's identity alone (dynamo reads no tensor version), and DoRA's norm is computed in the
graph instead of cached. The first two forwards still break at the discovery hooks, once."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import bnb as peft_bnb
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import AdapterError
from peftkit.method import MethodOption
from peftkit.methods.lora import dora as lora_fast_dora
from peftkit.methods.lora import down as lora_fast_down

# PEFT's LoRA layers over bitsandbytes' NF4 and LLM.int8 layers (a quantised base, lowbit.md):
# the base computes through its own forward, in the input's dtype.
QUANTIZED_LORA = tuple(
    getattr(peft_bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(peft_bnb, name)
)

_SIBLINGS = "_peftkit_siblings"  # a layer's Siblings record (absent: it runs alone)
_DISCOVERY = "_peftkit_discovery"  # the first-forward recorder, while it runs


@dataclass(eq=False)
class Siblings:
    """LoRA layers under one parent reading the same input tensor, and what was computed for it."""

    members: list[nn.Module]
    source: torch.Tensor | None = None  # the input the pending results belong to
    version: int = -1
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # id(member) -> its x A^T

    def take(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """This member's share when it was computed for this very input, else None."""
        if self.source is not x or _version(x) != self.version:
            return None
        found = self.pending.pop(id(layer), None)
        if not self.pending:
            self.source = None  # release the input once every member has taken its share
        return found

    def keep(self, x: torch.Tensor, shares: dict[int, torch.Tensor]) -> None:
        """Hold the other members' shares for this input."""
        self.source, self.version, self.pending = (
            (x, _version(x), shares) if shares else (None, -1, {})
        )


def _version(x: torch.Tensor) -> int:
    """A tensor's in-place version (inference tensors have none: they cannot change outside
    inference mode, and a model does not rewrite its input between sibling layers)."""
    if torch.compiler.is_compiling():
        return -1  # dynamo reads no version (a data-dependent value): the check is by identity
    return -1 if x.is_inference() else x._version


def _dropout_p(layer: nn.Module, name: str) -> float:
    """The dropout probability in effect for this adapter now (0 in eval mode or without one)."""
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), whatever the layer stores."""
    base = layer.base_layer
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def fast_adapter(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The adapter this call computes on the fast path, or None when PEFT's forward must run."""
    if args or any(value is not None for value in kwargs.values()):
        return None  # per-row adapter_names, aLoRA offsets, extra base-layer arguments
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or layer.lora_B[name].bias is not None:
        return None
    variant = layer.lora_variant.get(name)
    dora = isinstance(variant, DoraLinearVariant)
    if variant is not None and not dora:
        return None
    if dora and _dropout_p(layer, name) > 0:
        if lora_fast_down.autocast_on(x) or layer.base_layer.weight.requires_grad:
            return None  # DoRA's dropped path under autocast or with a training base: PEFT's
    quantized = isinstance(layer, QUANTIZED_LORA)
    if quantized and variant is not None:
        return None  # DoRA needs the dequantised weight's norms: PEFT's
    base_dtype = x.dtype if quantized else layer.base_layer.weight.dtype
    dtypes = {x.dtype, base_dtype, layer.lora_A[name].weight.dtype}
    if len(dtypes) > 1 and dora:
        return None
    if len(dtypes) > 1 and not lora_fast_down.autocast_on(x):
        # A half-precision base with float32 LoRA weights (PEFT keeps adapters in float32): the
        # branch computes in float32 as PEFT's does, without keeping a float32 copy of the input
        # (Down recasts it in backward). Any other mix (an input in another dtype than the
        # base's) is PEFT's.
        if x.dtype != base_dtype:
            return None
    return name


def _down(layer: nn.Module, name: str, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """x A^T (dropout applied) for this layer, computed with its siblings' in one multiply."""
    siblings: Siblings | None = getattr(layer, _SIBLINGS, None)
    if siblings is not None:
        found = siblings.take(layer, x)
        if found is not None:
            return found
    p = _dropout_p(layer, name)
    members = [layer]
    if siblings is not None:
        members += [
            m
            for m in siblings.members
            if m is not layer
            and fast_adapter(m, x, (), {}) == name
            and _dropout_p(m, name) == p
            and not _dora_dropped(m, name)
        ]
    weights = [m.lora_A[name].weight for m in members]
    if p == 0 and (weights[0].dtype == flat.dtype or lora_fast_down.autocast_on(flat)):
        # Nothing to drop: torch's own linear (and cat) backward, no Python autograd node.
        h = F.linear(flat, weights[0] if len(weights) == 1 else torch.cat(weights))
    else:
        discovery = layer.__dict__.get(_DISCOVERY)
        if p == 0:
            keep = None
        elif siblings is None and discovery:
            keep = discovery.mask(layer, x, flat, p)
        else:  # drawn here, not inside the autograd function: its forward stays deterministic
            keep = lora_fast_down.keep_mask(flat.shape, p, flat.device)
        h = lora_fast_down.Down.apply(flat, p, keep, *weights)
    if len(members) == 1:
        return h
    shares = h.split([w.shape[0] for w in weights], dim=1)
    siblings.keep(x, {id(m): share for m, share in zip(members[1:], shares[1:], strict=True)})
    return shares[0]


def _dora_dropped(layer: nn.Module, name: str) -> bool:
    """Whether this layer computes DoRA with dropout (its own function, dora.py)."""
    return name in layer.lora_variant and _dropout_p(layer, name) > 0


def _accumulate(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float, in_place: bool = True
) -> torch.Tensor:
    """y + scale * h B^T in one addmm (in place when no autocast casts anything and the base
    output is ours to change: a bitsandbytes layer's is not, as PEFT's clone of it says)."""
    if lora_fast_down.autocast_on(y):
        return torch.addmm(y, h, b.t(), alpha=scale)
    if y.dtype == h.dtype == b.dtype:
        return (
            y.addmm_(h, b.t(), alpha=scale) if in_place else torch.addmm(y, h, b.t(), alpha=scale)
        )
    # A half-precision output, a float32 branch: scaled in float32, then rounded once, as PEFT's.
    update = h.mm(b.t()).mul_(scale).to(y.dtype)
    return y.add_(update) if in_place else y + update


def forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The LoRA layer's forward: the fast path when it applies, else PEFT's own."""
    discovery = getattr(layer, _DISCOVERY, None)
    if discovery is not None and discovery.recording:
        discovery.inputs[id(layer)].append(x)
    name = fast_adapter(layer, x, args, kwargs)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    b, scale = layer.lora_B[name].weight, layer.scaling[name]
    if _dora_dropped(layer, name):  # PEFT's DoRA training forward with dropout, in one function
        base, weight, a = layer.base_layer, _weight(layer), layer.lora_A[name].weight
        norm = lora_fast_dora.weight_norm(layer, name, weight, a, b, scale)
        magnitude = layer.lora_magnitude_vector[name].weight
        p = _dropout_p(layer, name)
        y = lora_fast_dora.DoraDropped.apply(
            flat, p, weight, base.bias, a, b, magnitude, norm, scale
        )
        return y.view(*x.shape[:-1], y.shape[-1])
    h = _down(layer, name, x, flat)
    if isinstance(layer, QUANTIZED_LORA):
        y = _accumulate(layer.base_layer(flat), h, b, scale, in_place=False)
        return y.view(*x.shape[:-1], y.shape[-1])
    base, weight = layer.base_layer, _weight(layer)
    if name in layer.lora_variant:  # DoRA: W' = m (W + s BA) / ||W + s BA||_c, norm detached
        norm = lora_fast_dora.weight_norm(layer, name, weight, layer.lora_A[name].weight, b, scale)
        rows = layer.lora_magnitude_vector[name].weight / norm
        y = _accumulate(F.linear(flat, weight), h, b, scale)
        y = torch.addcmul(base.bias, y, rows) if base.bias is not None else y * rows
    else:
        y = _accumulate(F.linear(flat, weight, base.bias), h, b, scale)
    return y.view(*x.shape[:-1], y.shape[-1])


class _Discovery:
    """Records, over the model's first forward, which tensor each LoRA layer reads; the layers
    under one parent that read the same tensors become Siblings at the start of the next forward
    (not at the end of this one: a gradient-checkpointed backward recomputes this forward, and
    must recompute the same operations), then it unhooks itself."""

    def __init__(self, parents: dict[int, tuple[nn.Module, int]]) -> None:
        self.parents = parents  # id(layer) -> (layer, id(parent module))
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.groups: list[list[nn.Module]] | None = None
        self.recording = False
        self.handles: list[Any] = []
        # parent -> (input, its version, p, mask): the last mask drawn under each parent
        self.masks: dict[int, tuple[torch.Tensor, int, float, torch.Tensor]] = {}

    def mask(self, layer: nn.Module, x: torch.Tensor, flat: torch.Tensor, p: float) -> torch.Tensor:
        """Until the groups exist, layers under one parent reading one tensor share its mask too,
        so that a forward draws the same masks (the same random numbers) before the groups are
        known as after: a run resumed from a checkpoint then draws what the uninterrupted one did,
        and a gradient-checkpointed recompute of the first forward draws what it drew."""
        parent = self.parents[id(layer)][1]
        held = self.masks.get(parent)
        if held is not None and held[0] is x and held[1] == _version(x) and held[2] == p:
            return held[3]
        keep = lora_fast_down.keep_mask(flat.shape, p, flat.device)
        self.masks[parent] = (x, _version(x), p, keep)
        return keep

    def start(self, *_: Any) -> None:
        """Forward pre-hook on the base model: group what the last forward found, or record."""
        if self.groups is None:
            self.inputs, self.recording = {key: [] for key in self.parents}, True
            return
        for members in self.groups:
            siblings = Siblings(members)
            for layer in members:
                setattr(layer, _SIBLINGS, siblings)
        self.stop()

    def finish(self, *_: Any) -> None:
        """Forward hook on the base model: which layers read the same tensors (by identity)."""
        by_reads: dict[tuple, list[nn.Module]] = {}
        for key, (layer, parent) in self.parents.items():
            reads = tuple(id(t) for t in self.inputs.get(key, []))  # alive until we return
            if reads:
                by_reads.setdefault((parent, reads), []).append(layer)
        self.groups = [members for members in by_reads.values() if len(members) > 1]
        self.inputs, self.recording = {}, False

    def stop(self) -> None:
        """Unhook and let the layers forget this recorder."""
        for layer, _ in self.parents.values():
            layer.__dict__.pop(_DISCOVERY, None)
        for handle in self.handles:
            handle.remove()
        self.inputs, self.recording, self.masks = {}, False, {}


def install(model: nn.Module) -> int:
    """Give every PEFT LoRA Linear layer of a model the fast forward; the number of layers."""
    parents: dict[int, tuple[nn.Module, int]] = {}
    modules = dict(model.named_modules())
    for name, layer in modules.items():
        plain = isinstance(layer, LoraLinear) and isinstance(layer.base_layer, nn.Linear | Conv1D)
        if plain or isinstance(layer, QUANTIZED_LORA):
            layer.forward = types.MethodType(forward, layer)
            parents[id(layer)] = (layer, id(modules[name.rpartition(".")[0]]))
    if parents:
        discovery = _Discovery(parents)
        for layer, _ in parents.values():
            setattr(layer, _DISCOVERY, discovery)
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        discovery.handles = [
            root.register_forward_pre_hook(discovery.start),
            root.register_forward_hook(discovery.finish),
        ]
    return len(parents)


def uninstall(model: nn.Module) -> None:
    """Give every LoRA layer PEFT's own forward back and forget the sibling groups."""
    for layer in model.modules():
        if isinstance(layer, (LoraLinear, *QUANTIZED_LORA)):
            discovery = layer.__dict__.get(_DISCOVERY)
            if discovery is not None:
                discovery.stop()
            for attribute in ("forward", _SIBLINGS):
                layer.__dict__.pop(attribute, None)
            lora_fast_dora.forget_norm(layer)


# The fast path as a method option: whether it runs is peftkit's own choice, which PEFT's
# adapter_config.json has no field for. It is written (under peftkit's own key, which PEFT ignores
# with a warning) only when the fast path is off, so that a checkpoint resumed, or an adapter
# loaded again, computes with the forward it was trained with (the two draw dropout masks
# differently); a file without the key is a fast-path adapter, as every PEFT-written one is.
FAST_PATH_KEY = "peftkit_fast_path"


def _saved(config: Any) -> dict[str, Any]:
    """The key, where the fast path is off."""
    return {} if config.fast_path else {FAST_PATH_KEY: False}


def _from_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """fast_path as a saved adapter_config.json records it (absent: on)."""
    value = saved.get(FAST_PATH_KEY, True)
    if not isinstance(value, bool):
        raise AdapterError(
            f"adapter_config.json's {FAST_PATH_KEY} must be true or false, got {value!r}; "
            "remove the key to load the adapter on peftkit's fast path."
        )
    return {"fast_path": value}


FAST_PATH = MethodOption(
    name="fast_path",
    description="peftkit's fast forward (fast_path: false runs PEFT's own; saved with the "
    "adapter when off, so a resumed run keeps it)",
    saved=_saved,
    from_saved=_from_saved,
)
