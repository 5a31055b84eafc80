"""Child-Tuning F's AdamW, with the mask inside its step: draw the mask, mask the gradient, update
AdamW's moments, and move only the kept weights, in one pass over memory.

Masking around torch's AdamW (child_tuning_masks.mask_around) makes five passes over every weight
besides the optimizer's own: mask and copy before the step, restore after it; on CPU these passes
are bound by memory bandwidth and cost several times a fused AdamW step (SmolLM2-135M, 2 cores:
0.69 s against 0.09 s). Here, for CPU float32 weights, a compiled loop (child_tuning_kernel) does
everything in one pass; elsewhere (GPU, bf16) the same arithmetic runs as torch ops on cache-sized
chunks. Both draw the masks of child_tuning_masks' one random stream. The result is that of
masking around torch's AdamW: moments updated everywhere (masked gradients are zero, so outside
the mask they decay as in the reference), weights outside the mask unchanged exactly (each gets
x + 0), weight decay included. Kept entries get torch.optim.AdamW's update, rounded in a slightly
different order (within a few units in the last place).

The saved optimizer state is AdamW's (step, exp_avg, exp_avg_sq): checkpoints resume either way."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from peftkit.methods.child_tuning import kernel
from peftkit.methods.child_tuning.masks import (
    MaskRecord,
    chunks,
    effective_ratio,
    keep_mask,
    keep_threshold,
    step_seeds,
)


def replaceable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ChildTuningAdamW can take this optimizer's place: a plain torch AdamW (fused or
    not; no amsgrad, maximize, capturable or differentiable)."""
    return type(optimizer) is torch.optim.AdamW and not any(
        group.get(flag) for group in optimizer.param_groups
        for flag in ("amsgrad", "maximize", "capturable", "differentiable")
    )  # fmt: skip


def _settings(group: dict[str, Any], masking: dict[str, float]) -> dict[str, float]:
    """The masked step's settings for one parameter group (the kernel's `hyper` without step)."""
    beta1, beta2 = group["betas"]
    return {**masking, "lr": group["lr"], "eps": group["eps"],
            "weight_decay": group["weight_decay"], "beta1": beta1, "beta2": beta2}  # fmt: skip


class ChildTuningAdamW(torch.optim.AdamW):
    """AdamW whose step draws Child-Tuning F's Bernoulli(p) mask and updates only kept entries.
    record: where the masks and changed entries go; names: parameter id -> name."""

    def __init__(
        self, params: Any, record: MaskRecord, names: dict[int, str], **defaults: Any
    ) -> None:
        super().__init__(params, **defaults)
        self.record = record
        self.names = names

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One masked AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ratio = self.record.ratio
        masking = {"threshold": keep_threshold(ratio), "scale": 1.0 / effective_ratio(ratio)}
        stepped = [
            (group, p) for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        device = stepped[0][1].device if stepped else torch.device("cpu")
        seeds = step_seeds(len(stepped), device)
        settings = {id(group): _settings(group, masking) for group in self.param_groups}
        for (group, parameter), tensor_seeds in zip(stepped, seeds, strict=True):
            hyper = settings[id(group)]  # one dict per group, read by both update paths
            state = self.state[parameter]
            if not state:  # the layout torch.optim.AdamW uses, so state dicts interchange
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(parameter)
                state["exp_avg_sq"] = torch.zeros_like(parameter)
            state["step"] += 1
            hyper["step"] = float(state["step"])
            self.masked_update(parameter, state, tensor_seeds, hyper)
        return loss

    def masked_update(
        self,
        parameter: torch.Tensor,
        state: dict[str, Any],
        seeds: tuple[int, int],
        hyper: dict[str, float],
    ) -> None:
        """One parameter's masked AdamW step: the compiled one-pass loop where it applies, else
        torch ops on cache-sized chunks; the kept entries are added to the record."""
        if not parameter.grad.is_contiguous():
            parameter.grad = parameter.grad.contiguous()
        name = self.names[id(parameter)]
        keep = self.record.mask(name, parameter)
        grad, weight = parameter.grad.view(-1), parameter.detach().view(-1)
        exp_avg, exp_avg_sq = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        touched = self.record.tracked(name, parameter)
        if kernel.available(weight):
            kernel.masked_adamw_step(weight, grad, exp_avg, exp_avg_sq, keep, seeds, hyper)
            if touched is not None:  # counted as it goes: a sum over the mask costs more
                self.record.counted(name, kernel.track(keep, touched))
            return
        self.chunked_update(weight, grad, exp_avg, exp_avg_sq, keep, touched, seeds, hyper)
        if touched is not None:
            self.record.counted(name)

    def chunked_update(
        self,
        weight: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        keep_all: torch.Tensor,
        touched: torch.Tensor | None,
        seeds: tuple[int, int],
        hyper: dict[str, float],
    ) -> None:
        """The masked step as torch ops on cache-sized chunks (GPU, bf16); the gradient is left
        masked, as masking around torch's AdamW leaves it."""
        lr, beta1, beta2, step = hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["step"]
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        device, record = grad.device, self.record
        scratch = record.hash_scratch(device)
        keep_float = record.buffer(grad.dtype, device, 1)
        denom_buffer = record.buffer(weight.dtype, device, 4)
        delta_buffer = record.buffer(weight.dtype, device, 5)
        for start, stop in chunks(grad.numel()):
            size = stop - start
            keep = keep_mask(start, seeds, hyper["threshold"], keep_all[start:stop], scratch)
            kept = keep_float[:size].copy_(keep)  # 1.0 / 0.0: float x bool kernels run far slower
            g = grad[start:stop].mul_(kept).mul_(hyper["scale"])
            m = exp_avg[start:stop].lerp_(g, 1 - beta1)
            v = exp_avg_sq[start:stop].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            # m / (sqrt(v) / b2 + eps) = b2 * m / (sqrt(v) + eps * b2): one pass fewer.
            denom = torch.sqrt(v, out=denom_buffer[:size]).add_(
                hyper["eps"] * bias_correction2_sqrt
            )
            chunk = weight[start:stop]
            # AdamW's change (decoupled decay, then the Adam step), added only where kept: x + 0 * d
            # is x exactly for any finite d, and d is finite (denom >= eps > 0).
            delta = torch.mul(chunk, -lr * hyper["weight_decay"], out=delta_buffer[:size])
            delta.addcdiv_(m, denom, value=-step_size * bias_correction2_sqrt)
            chunk.addcmul_(delta, kept)
            if touched is not None:
                touched[start:stop] |= keep
