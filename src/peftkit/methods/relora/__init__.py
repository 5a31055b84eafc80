"""ReLoRA (Lialin et al., 2023): LoRA merged into the base weights and restarted every N steps.

At each restart B A is added to W, A is re-drawn (Kaiming uniform, as LoRA starts) and B zeroed, and
the optimizer state of the LoRA parameters is reset (zeroed, or pruned by magnitude to a fraction);
the learning rate then re-warms for a few steps (a jagged schedule). The sum of many rank-r updates
can reach a high rank. Built on PEFT's LoRA layers (lora.py); peftkit adds the restarts.

The restart resets the optimizer, so ReLoRA binds it: the pipeline hands it over through
`TrainingHooks.replace_optimizer` (which returns it unchanged); a custom loop calls
`bind_optimizer(model, optimizer)` (or `restart(model, optimizer)` itself). Binding also applies
the re-warm factor around each step of that optimizer (on top of whatever schedule the loop uses);
relora_optimizer.py holds the reset, the re-warm factor and `jagged_cosine_schedule`, a whole
LambdaLR multiplier for loops that build their own scheduler.

`peftkit.save` writes the accumulated merged update (dense, per adapted matrix) plus the current
LoRA, so a reload is exact. Exports (the merged model, a LoRA of chosen rank by SVD) are in
relora_export.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from peftkit.errors import AdapterError, ConfigError
from peftkit.method import Method, TrainingHooks
from peftkit.methods import lora
from peftkit.methods.relora.optimizer import reset_optimizer_state, rewarm_factor

RESET_MODES = ("full", "prune")
DELTA_SUFFIX = ".relora_delta"  # on-disk key suffix of a module's accumulated merged update


@dataclass(frozen=True)
class ReLoraConfig(lora.LoraConfig):
    """LoRA restarted every `restart_every` steps: merged, re-initialised, optimizer reset."""

    restart_every: int = field(default=200, metadata={"help": "optimizer steps between restarts"})
    optimizer_reset: str = field(
        default="prune",
        metadata={
            "help": "LoRA optimizer state at a restart: full (zeroed) | prune (by magnitude)"
        },
    )
    prune_fraction: float = field(
        default=0.99, metadata={"help": "prune: fraction of each state tensor set to zero"}
    )
    restart_warmup_steps: int = field(
        default=10, metadata={"help": "steps over which the learning rate re-warms after a restart"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restart_every < 1:
            raise ConfigError(
                f"ReLoRA's restart_every must be at least 1 optimizer step, got "
                f"{self.restart_every}; for LoRA without restarts use method 'lora'."
            )
        if self.optimizer_reset not in RESET_MODES:
            raise ConfigError(
                f"optimizer_reset must be one of {', '.join(RESET_MODES)}, "
                f"got '{self.optimizer_reset}'."
            )
        if not 0.0 <= self.prune_fraction <= 1.0:
            raise ConfigError(f"prune_fraction must be in [0, 1], got {self.prune_fraction}.")
        if not 0 <= self.restart_warmup_steps < self.restart_every:
            raise ConfigError(
                f"restart_warmup_steps ({self.restart_warmup_steps}) must be >= 0 and below "
                f"restart_every ({self.restart_every})."
            )
        if self.use_dora:
            raise ConfigError("ReLoRA merges B A into W; DoRA's magnitude split is not supported.")
        if self.init != "kaiming" or self.loraplus_lr_ratio is not None:
            raise ConfigError(
                "ReLoRA re-initialises A and B at every restart and binds its own optimizer: "
                "LoRA's init and loraplus_lr_ratio options are not supported with it."
            )


@dataclass
class ReLoraState:
    """What ReLoRA keeps beside the PEFT model: the optimizer, restarts, accumulated update."""

    config: ReLoraConfig
    merged: dict[str, torch.Tensor]  # module name -> sum of merged deltas (base weight layout)
    optimizer: Any = None
    restarts: int = 0
    steps_seen: int = 0  # optimizer steps taken (the re-warm clock)
    handles: list[Any] = field(default_factory=list)  # the bound optimizer's lr hooks


_STATE = "_peftkit_relora"


def state(model: nn.Module) -> ReLoraState:
    """The ReLoRA state apply() attached to a model."""
    found = getattr(model, _STATE, None)
    if found is None:
        raise ConfigError(
            "This model has no ReLoRA applied: call peftkit.apply(model, ReLoraConfig())."
        )
    return found


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every PEFT LoRA layer by module name (names as in the base model)."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B parameters (not the task head): the state that restarts reset."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def apply(model: nn.Module, config: ReLoraConfig) -> peft.PeftModel:
    """A PEFT LoRA model with ReLoRA's state: accumulated deltas start at zero."""
    tuned = lora.apply(model, config)
    merged = {
        name: torch.zeros_like(layer.get_base_layer().weight, dtype=torch.float32)
        for name, layer in lora_layers(tuned).items()
    }
    object.__setattr__(tuned, _STATE, ReLoraState(config=config, merged=merged))
    return tuned


@torch.no_grad()
def merge_and_reinit(model: nn.Module) -> dict[str, torch.Tensor]:
    """W += B A * scale for every LoRA layer, then A re-drawn and B zeroed; returns the deltas."""
    relora = state(model)
    deltas = {}
    for name, layer in lora_layers(model).items():
        delta = layer.get_delta_weight("default")  # already in the base weight's layout
        weight = layer.get_base_layer().weight
        weight.add_(delta.to(weight.dtype))
        relora.merged[name] += delta.float()
        layer.reset_lora_parameters("default", True)  # Kaiming-uniform A, zero B
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each process drew its own A; data-parallel replicas must stay identical.
            torch.distributed.broadcast(layer.lora_A["default"].weight.data, src=0)
        deltas[name] = delta
    return deltas


def restart(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """One ReLoRA restart: merge, re-initialise, reset the LoRA optimizer state."""
    relora = state(model)
    optimizer = optimizer if optimizer is not None else relora.optimizer
    if optimizer is None:
        raise ConfigError(
            "ReLoRA restarted with no optimizer to reset: call "
            "peftkit.methods.relora.bind_optimizer(model, optimizer) before training, or pass "
            "the optimizer to restart()."
        )
    merge_and_reinit(model)
    config = relora.config
    reset_optimizer_state(
        optimizer, lora_parameters(model), config.optimizer_reset, config.prune_fraction
    )
    relora.restarts += 1


def bind_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, rewarm: bool = True) -> None:
    """Let restarts reset this optimizer; with `rewarm`, scale its lr by the re-warm factor
    around each of its steps. Binding another optimizer unbinds the previous one."""
    relora = state(model)
    _unbind(relora)
    relora.optimizer = optimizer
    if not rewarm:
        return
    saved: list[float] = []

    def scale(opt: Any, args: Any, kwargs: Any) -> None:
        config = relora.config
        factor = rewarm_factor(relora.steps_seen, config.restart_every, config.restart_warmup_steps)
        saved[:] = [group["lr"] for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"] = group["lr"] * factor

    def restore(opt: Any, args: Any, kwargs: Any) -> None:
        for group, lr in zip(opt.param_groups, saved, strict=False):
            group["lr"] = lr  # the loop's own scheduler keeps owning the lr
        saved.clear()  # nothing to restore if a step ever ran without the pre-hook
        relora.steps_seen += 1

    relora.handles += [
        optimizer.register_step_pre_hook(scale),
        optimizer.register_step_post_hook(restore),
    ]


def _unbind(relora: ReLoraState) -> None:
    """Take the re-warm hooks off the bound optimizer."""
    for handle in relora.handles:
        handle.remove()
    relora.handles.clear()
    relora.optimizer = None


def bind_and_keep(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The pipeline's replace_optimizer: bind its optimizer (re-warm on) and train with it."""
    bind_optimizer(model, optimizer)
    return optimizer


def hooks(model: peft.PeftModel, config: ReLoraConfig) -> TrainingHooks:
    """Bind the pipeline's optimizer when it is built; restart after every `restart_every` steps."""

    def after_step(tuned: nn.Module, step: int) -> None:
        state(tuned).steps_seen = step + 1  # keep the re-warm clock on the loop's own step count
        if (step + 1) % config.restart_every == 0:
            restart(tuned)

    return TrainingHooks(
        replace_optimizer=bind_and_keep,
        after_optimizer_step=after_step,
        state=training_state,
        load_state=load_training_state,
    )


def training_state(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs beyond the adapter (which holds the merged update): the clocks."""
    relora = state(model)
    return {"restarts": relora.restarts, "steps_seen": relora.steps_seen}


def load_training_state(model: nn.Module, saved: dict[str, Any]) -> None:
    """Restore training_state() on resume, so the re-warm continues where it stopped."""
    relora = state(model)
    relora.restarts = int(saved["restarts"])
    relora.steps_seen = int(saved["steps_seen"])


def state_dict(model: peft.PeftModel) -> dict[str, Any]:
    """The current LoRA (PEFT key names) plus each module's merged update, so reloads are exact."""
    tensors = dict(lora.state_dict(model))
    for name, delta in state(model).merged.items():
        tensors[f"base_model.model.{name}{DELTA_SUFFIX}"] = delta
    return tensors


@torch.no_grad()
def load_state_dict(model: peft.PeftModel, tensors: dict[str, Any]) -> None:
    """Add the saved merged updates to the base weights, then load the current LoRA."""
    relora = state(model)
    layers = lora_layers(model)
    rest = {}
    for key, value in tensors.items():
        if not key.endswith(DELTA_SUFFIX):
            rest[key] = value
            continue
        name = key.removeprefix("base_model.model.").removesuffix(DELTA_SUFFIX)
        if name not in layers:
            raise AdapterError(f"ReLoRA update for '{name}', which this model does not adapt.")
        weight = layers[name].get_base_layer().weight
        weight.add_((value - relora.merged[name]).to(weight.dtype))
        relora.merged[name] = value.float().clone()
    lora.load_state_dict(model, rest)


def remove(model: peft.PeftModel) -> nn.Module:
    """Undo apply: take out any loaded merged update and the LoRA layers."""
    relora = state(model)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            weight = layer.get_base_layer().weight
            weight.sub_(relora.merged[name].to(weight.dtype))
    _unbind(relora)
    return lora.remove(model)


RELORA = Method(
    name="relora",
    config_cls=ReLoraConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    hooks=hooks,
    merge=lora.merge,
    remove=remove,
    description="LoRA merged into the base and restarted every N steps, optimizer reset (peftkit)",
    needs_float32_base="it merges its update into the base's weights at every restart",
    shardable="it merges its adapters into the whole base weights and resets the optimizer "
    "at every restart",
)
