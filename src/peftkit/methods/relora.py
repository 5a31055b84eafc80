"""ReLoRA (Lialin et al., 2023): LoRA merged into the base weights and restarted every N steps.

At each restart B A is added to W, A is re-drawn (Kaiming uniform, as LoRA starts) and B zeroed, and
the optimizer state of the LoRA parameters is reset (zeroed, or pruned by magnitude to a fraction);
the learning rate then re-warms for a few steps (a jagged schedule). The sum of many rank-r updates
can reach a high rank. Built on PEFT's LoRA layers (lora.py); peftkit adds the restarts.

The restart needs the optimizer, which training hooks are not given: a custom loop calls
`bind_optimizer(model, optimizer)` (or `restart(model, optimizer)` itself); in the peftkit pipeline
`begin_training` arms a one-shot torch optimizer pre-step hook that binds the first optimizer that
steps this model's LoRA parameters. The re-warm factor is applied around each optimizer step (on top
of whatever schedule the loop uses); `jagged_cosine_schedule` is a whole LambdaLR multiplier for
loops that build their own scheduler.

What it saves: `peftkit.save` writes the accumulated merged update (dense, per adapted matrix) plus
the current LoRA, so a reload is exact; `save_merged` writes the merged model with save_pretrained;
`save_as_lora` writes a PEFT LoRA adapter of a chosen rank by truncated SVD of the whole update and
returns its relative approximation error per matrix."""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from peftkit import io
from peftkit.errors import AdapterError, ConfigError
from peftkit.method import Method, TrainingHooks
from peftkit.methods import lora

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


@dataclass
class ReLoraState:
    """What ReLoRA keeps beside the PEFT model: the optimizer, restarts, accumulated update."""

    config: ReLoraConfig
    merged: dict[str, torch.Tensor]  # module name -> sum of merged deltas (base weight layout)
    optimizer: Any = None
    restarts: int = 0
    steps_seen: int = 0  # optimizer steps since binding (the re-warm clock)
    handles: list[Any] = field(default_factory=list)  # per-optimizer lr hooks
    pending: Any = None  # the global hook waiting to bind the pipeline's optimizer


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


def prune_by_magnitude(tensor: torch.Tensor, fraction: float) -> None:
    """Zero the `fraction` of entries smallest in magnitude, in place (ties may prune more)."""
    count = int(fraction * tensor.numel())
    if count <= 0:
        return
    if count >= tensor.numel():
        tensor.zero_()
        return
    threshold = tensor.abs().flatten().kthvalue(count).values
    tensor.masked_fill_(tensor.abs() <= threshold, 0.0)


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], mode: str, fraction: float
) -> None:
    """Reset the moment estimates of `parameters`: zero them, or prune them by magnitude."""
    for parameter in parameters:
        for key, value in optimizer.state.get(parameter, {}).items():
            if key == "step" or not torch.is_tensor(value) or not value.is_floating_point():
                continue  # the step count keeps Adam's bias correction continuous, as the paper
            if mode == "full":
                value.zero_()
            else:
                prune_by_magnitude(value, fraction)


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


def rewarm_factor(step: int, restart_every: int, restart_warmup_steps: int) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): ramps 0 -> 1 after a restart.

    Restarts happen after steps N-1, 2N-1, ...; step kN + j (k >= 1, j < warmup) gets j / warmup,
    as the reference code's schedule (the first step after a restart rebuilds Adam's moments)."""
    cycle, offset = divmod(step, restart_every)
    if cycle == 0 or offset >= restart_warmup_steps:
        return 1.0
    return offset / restart_warmup_steps


def jagged_cosine_schedule(
    total_steps: int,
    warmup_steps: int,
    restart_every: int,
    restart_warmup_steps: int,
    min_ratio: float = 0.1,
) -> Callable[[int], float]:
    """A LambdaLR multiplier: linear warm-up, cosine decay to min_ratio, re-warm after restarts."""
    if restart_every < 1:
        raise ConfigError(f"restart_every must be at least 1, got {restart_every}.")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        cosine = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return cosine * rewarm_factor(step, restart_every, restart_warmup_steps)

    return multiplier


def bind_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, rewarm: bool = True) -> None:
    """Let restarts reset this optimizer; with `rewarm`, scale its lr by the re-warm factor."""
    relora = state(model)
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


def bind_on_first_step(model: nn.Module) -> None:
    """Bind the first optimizer that steps this model's LoRA parameters (pipeline use)."""
    relora = state(model)
    if relora.optimizer is not None:
        return
    ours = {id(p) for p in lora_parameters(model)}
    model_ref = weakref.ref(model)

    def bind(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        tuned = model_ref()
        if tuned is None or relora.optimizer is not None:
            return  # removed after the step: torch is iterating over the global hooks now
        if any(id(p) in ours for group in optimizer.param_groups for p in group["params"]):
            bind_optimizer(tuned, optimizer)

    relora.pending = register_optimizer_step_pre_hook(bind)


def hooks(model: peft.PeftModel, config: ReLoraConfig) -> TrainingHooks:
    """Bind the optimizer when training starts; restart after every `restart_every` steps."""

    def after_step(tuned: nn.Module, step: int) -> None:
        relora = state(tuned)
        if relora.pending is not None and relora.optimizer is not None:
            relora.pending.remove()
            relora.pending = None
        relora.steps_seen = step + 1  # keep the re-warm clock on the loop's own step count
        if (step + 1) % config.restart_every == 0:
            restart(tuned)

    return TrainingHooks(
        begin_training=lambda tuned, total: bind_on_first_step(tuned),
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


def accumulated_update(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per module, everything training added to W: merged deltas plus the current B A."""
    relora = state(model)
    with torch.no_grad():
        return {
            name: relora.merged[name] + layer.get_delta_weight("default").float()
            for name, layer in lora_layers(model).items()
        }


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


def save_merged(model: peft.PeftModel, folder: str | Path) -> Path:
    """The whole accumulated update folded into the base, written with save_pretrained."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(str(folder))
    return Path(folder)


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD: B (out x r), A (r x in), B A closest to delta; relative Frobenius error."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b = u[:, :rank] * s[:rank]
    a = vh[:rank]
    error = torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta).clamp_min(
        1e-30
    )
    return b, a, float(error)


def save_as_lora(model: peft.PeftModel, folder: str | Path, rank: int) -> dict[str, float]:
    """A PEFT LoRA adapter of `rank` approximating the whole update; relative error per module."""
    if rank < 1:
        raise ConfigError(f"The exported LoRA rank must be at least 1, got {rank}.")
    saved = lora.adapter_config(model, state(model).config)
    saved.update(r=rank, lora_alpha=float(rank), use_rslora=False)  # scale 1: B A is the update
    tensors = dict(lora.state_dict(model))  # keeps a trained task head (modules_to_save)
    errors = {}
    for name, delta in accumulated_update(model).items():
        transposed = getattr(lora_layers(model)[name], "fan_in_fan_out", False)
        b, a, errors[name] = low_rank_factors(delta.T if transposed else delta, rank)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    io.write_folder_atomically(folder, {io.CONFIG_NAME: saved, io.WEIGHTS_NAME: tensors})
    return errors


def remove(model: peft.PeftModel) -> nn.Module:
    """Undo apply: take out any loaded merged update and the LoRA layers."""
    relora = state(model)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            weight = layer.get_base_layer().weight
            weight.sub_(relora.merged[name].to(weight.dtype))
    for handle in [*relora.handles, relora.pending]:
        if handle is not None:
            handle.remove()
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
)
