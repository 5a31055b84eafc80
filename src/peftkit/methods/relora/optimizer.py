"""What a ReLoRA restart does to the optimizer: reset the LoRA parameters' moment estimates (zero
them, or prune them by magnitude as the paper does), and the jagged learning-rate schedule that
re-warms from zero after each restart."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from peftkit.errors import ConfigError


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
