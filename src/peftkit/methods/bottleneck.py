"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020): a down-projection,
nonlinearity and zero-initialised up-projection added with a residual: the model starts unchanged.

Placements, per the papers and the AdapterHub reference configurations:
- houlsby: after the attention sublayer and after the feed-forward sublayer of every layer, on the
  sublayer's own output (after its output projection and dropout), before the skip connection;
  layer norms train too.
- pfeiffer: one adapter after the feed-forward block, reading the residual stream. In post-norm
  models (BERT) it sits inside the block's final layer norm: LN(z + A(LN(z))); in pre-norm models
  the stream after the block is y and the adapter gives y + A(y).

Adapters are child modules of the model's own modules, run by forward hooks; no forward is copied.
They add sequential computation and cannot be merged into the base weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.config import nearest
from peftkit.errors import AdapterError, ConfigError, TargetError
from peftkit.method import Method
from peftkit.targeting import (
    BLOCK_OUTPUTS,
    SUBLAYER_OUTPUTS,
    is_norm,
    layer_index,
    matches,
    model_type,
    module_listing,
    task_head_modules,
)

PLACEMENTS = ("houlsby", "pfeiffer")
NONLINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
# The AdapterHub reference configurations: Houlsby with swish, Pfeiffer with ReLU.
DEFAULT_NONLINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}
# Houlsby et al. train the layer norms; Pfeiffer et al. do not.
DEFAULT_TRAIN_LAYER_NORMS = {"houlsby": True, "pfeiffer": False}

# The child-module name an adapter gets under the module it follows.
ADAPTER_NAME = "bottleneck_adapter"
# Where apply() records what it did, for state_dict, load and remove.
_STATE = "_peftkit_bottleneck"

# Where each placement puts its adapters: the modules it follows, by role (targeting.py's
# per-family tables). Houlsby: on each sublayer's update before the skip connection (after
# attention and after the feed-forward network); Pfeiffer: on each feed-forward block's output.
PLACEMENT_SITES = {"houlsby": SUBLAYER_OUTPUTS, "pfeiffer": BLOCK_OUTPUTS}


@dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck adapters in the Houlsby or Pfeiffer placement."""

    placement: str = field(
        default="houlsby",
        metadata={"help": "houlsby (after attention and feed-forward) or pfeiffer (after FFN)"},
    )
    bottleneck_size: int | None = field(
        default=None, metadata={"help": "adapter width; default hidden size / reduction_factor"}
    )
    reduction_factor: float = field(
        default=16.0, metadata={"help": "hidden size / bottleneck size, if bottleneck_size unset"}
    )
    nonlinearity: str | None = field(
        default=None,
        metadata={"help": "relu, gelu, swish (= silu) or tanh; default swish (houlsby), relu"},
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "layer indices that get adapters; default all"}
    )
    train_layer_norms: bool | None = field(
        default=None,
        metadata={"help": "train the layer norms of adapted layers; default: houlsby yes"},
    )
    modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "modules adapters follow: names (suffix match) or a regex (full match); "
            "default: the placement's sites for this architecture"
        },
    )

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}."
            )
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ConfigError(f"bottleneck_size must be at least 1, got {self.bottleneck_size}.")
        if self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor must be positive, got {self.reduction_factor}.")
        if self.nonlinearity is not None and self.nonlinearity not in NONLINEARITIES:
            guess = nearest(self.nonlinearity, NONLINEARITIES)
            hint = f" Did you mean '{guess}'?" if guess else ""
            raise ConfigError(
                f"Unknown nonlinearity {self.nonlinearity!r}.{hint} "
                f"Choose one of: {', '.join(NONLINEARITIES)}."
            )


class BottleneckAdapter(nn.Module):
    """down-projection, nonlinearity, up-projection; returns the update, the caller adds it."""

    def __init__(self, width: int, size: int, nonlinearity: str) -> None:
        super().__init__()
        self.down = nn.Linear(width, size)
        self.act = NONLINEARITIES[nonlinearity]()
        self.up = nn.Linear(size, width)
        # A zero up-projection makes the update zero: the model is unchanged at initialisation.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(hidden)))


@dataclass
class _Placed:
    """What apply() did: the hook handles, what to save, and the flags to restore on remove."""

    sites: list[str]
    handles: list[Any]
    saved: list[str]
    requires_grad_before: dict[str, bool]


def _add_adapter(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook: add the adapter's update to the module's output (see the module docstring)."""
    adapter = getattr(module, ADAPTER_NAME)
    if is_norm(module):
        # Inside a post-norm block's norm: normalise the stream plus the update, as Pfeiffer.
        return module.forward(args[0] + adapter(output))
    if isinstance(output, tuple):
        return (output[0] + adapter(output[0]), *output[1:])
    return output + adapter(output)


def resolve_sites(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Full names of the modules that get an adapter; a clear error when there are none."""
    spec = config.modules
    kind = model_type(model)
    if spec is None:
        sites = PLACEMENT_SITES[config.placement]
        if kind not in sites:
            raise TargetError(
                f"No default bottleneck placement for model type '{kind or type(model).__name__}'."
                " Set `modules` to the module names (or a regex) the adapters should follow. "
                f"Modules here: {module_listing(model)}."
            )
        spec = sites[kind]
    found = [n for n, _ in model.named_modules() if n and matches(n, spec)]
    if not found:
        raise TargetError(
            f"The {config.placement} placement {spec!r} matched no module of this "
            f"{kind or type(model).__name__} model. Set `modules` to names or a regex from "
            f"what exists: {module_listing(model)}."
        )
    if config.layers is None:
        return found
    present = sorted({i for i in map(layer_index, found) if i is not None})
    missing = sorted(set(config.layers) - set(present))
    if missing:
        raise ConfigError(
            f"layers {missing} do not exist here; this model's adapted layers are {present}."
        )
    return [n for n in found if layer_index(n) in set(config.layers)]


def bottleneck_width(config: BottleneckConfig, hidden: int) -> int:
    """The adapter's inner width, from bottleneck_size or hidden / reduction_factor."""
    if config.bottleneck_size is not None:
        return config.bottleneck_size
    size = int(hidden // config.reduction_factor)
    if size < 1:
        raise ConfigError(
            f"reduction_factor {config.reduction_factor} gives a bottleneck of {size} for hidden "
            f"size {hidden}; use a reduction_factor of at most {hidden} or set bottleneck_size."
        )
    return size


def output_width(module: nn.Module, hidden: int) -> int:
    """The width of a module's output: a linear layer's or norm's own, else the hidden size."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.shape[1]  # GPT-2's Conv1D stores (in, out)
    if is_norm(module) and weight is not None:
        return weight.shape[-1]
    return hidden


def _norms_in_layers(model: nn.Module, layers: set[int | None]) -> list[nn.Module]:
    """The layer norms inside the adapted layers (not embedding or final norms)."""
    return [
        module
        for name, module in model.named_modules()
        if is_norm(module) and layer_index(name) is not None and layer_index(name) in layers
    ]


def apply(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Add adapters after the chosen modules and freeze the rest; returns the same model."""
    if hasattr(model, _STATE):
        raise AdapterError("This model already has bottleneck adapters; apply to a fresh model.")
    sites = resolve_sites(model, config)
    hidden = model.config.hidden_size
    size = bottleneck_width(config, hidden)
    nonlinearity = config.nonlinearity or DEFAULT_NONLINEARITY[config.placement]
    reference = next(model.parameters())
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    handles = []
    for name in sites:
        adapter = BottleneckAdapter(output_width(modules[name], hidden), size, nonlinearity)
        modules[name].add_module(ADAPTER_NAME, adapter.to(reference.device, reference.dtype))
        # Prepend: transformers' own output-capturing hooks must see the adapted output.
        handles.append(modules[name].register_forward_hook(_add_adapter, prepend=True))
    train_norms = config.train_layer_norms
    if train_norms is None:
        train_norms = DEFAULT_TRAIN_LAYER_NORMS[config.placement]
    if train_norms:
        for norm in _norms_in_layers(model, {layer_index(n) for n in sites}):
            norm.requires_grad_(True)
    for head in task_head_modules(model):
        modules[head].requires_grad_(True)  # a new classifier starts untrained
    saved = [n for n, p in model.named_parameters() if p.requires_grad]
    object.__setattr__(model, _STATE, _Placed(sites, handles, saved, before))
    return model


def _placed(model: nn.Module) -> _Placed:
    """The record apply() left, or an error if the model has no bottleneck adapters."""
    if not hasattr(model, _STATE):
        raise AdapterError("This model has no bottleneck adapters: call peftkit.apply first.")
    return getattr(model, _STATE)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters, any trained layer norms and the task head, under the model's own names."""
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach() for name in _placed(model).saved}


def load_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the adapted model."""
    parameters = dict(model.named_parameters())
    unknown = [k for k in tensors if k not in parameters]
    if unknown:
        raise AdapterError(f"Adapter tensors this model has no place for: {unknown[:5]}.")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def remove(model: nn.Module) -> nn.Module:
    """Take the adapters out and restore the trainable flags: the base model, unchanged."""
    placed = _placed(model)
    modules = dict(model.named_modules())
    for name, handle in zip(placed.sites, placed.handles, strict=True):
        handle.remove()
        delattr(modules[name], ADAPTER_NAME)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(placed.requires_grad_before.get(name, True))
    object.__delattr__(model, _STATE)
    return model


BOTTLENECK = Method(
    name="bottleneck",
    config_cls=BottleneckConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    remove=remove,
    merge=None,  # adapters add sequential layers; they cannot be folded into the base weights
    description="bottleneck adapters, Houlsby or Pfeiffer placement (peftkit)",
)
