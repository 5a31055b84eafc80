"""The A projection of the fast LoRA path (lora_fast.py) as one autograd function: sibling layers'
A matrices in one multiply, dropout as a bool mask drawn from 16-bit lanes of random words, the
dropped input recomputed in backward instead of saved."""

from __future__ import annotations

from typing import Any

import torch

LANES = 65536  # the dropout mask's resolution: p is rounded to a multiple of 1 / 65536


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (never on the meta device, which has no autocast:
    the estimator runs the applied model there)."""
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def drop_count(p: float) -> int:
    """How many of the 65,536 lane values drop an element: p rounded to the mask's resolution."""
    return round(p * LANES)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bools, True where an element is kept, each kept with probability 1 - drop_count(p) / 65536.

    Each 64-bit word from the generator gives four independent uniform 16-bit lanes, so the mask
    costs a quarter of the generator calls of a float draw per element."""
    if torch.compiler.is_compiling():  # dynamo traces no random_: the same odds from randint
        return torch.randint(0, LANES, shape, device=device, dtype=torch.int32) >= drop_count(p)
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    lanes = words.random_(-(2**63), None).view(torch.int16)[:count]
    return (lanes >= drop_count(p) - LANES // 2).view(shape)


class Down(torch.autograd.Function):
    """h = (x * mask / (1 - p)) [A_1; A_2; ...]^T for sibling layers' A matrices at once.

    Saves the A parameters themselves (the concatenation is rebuilt in backward, not kept) and,
    with dropout, the bool mask rather than the dropped copy of x. The caller draws the mask
    (`keep_mask`; None: no dropout), so the forward draws nothing and traces under torch.compile."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, p: float, keep: torch.Tensor | None, *weights: torch.Tensor
    ) -> torch.Tensor:
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        if autocast_on(x):  # compute as autocast would, in its dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        ctx.scale = LANES / (LANES - drop_count(p)) if p > 0 else 1.0
        # Each input's gradient needs the other one only: save what a gradient is wanted for.
        x_grad, weight_grad = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:])
        ctx.save_for_backward(x if weight_grad else None, keep, *(weights if x_grad else ()))
        ctx.rows = [w.shape[0] for w in weights]
        # A half input and float32 weights (a half base's adapters): compute in float32; the
        # half x is what is saved (a frozen base layer keeps none of its input), recast in backward.
        ctx.compute_dtype = weight.dtype
        x = x.to(weight.dtype)
        if keep is None:
            return x.mm(weight.t())
        return torch.where(keep, x, 0.0).mm(weight.t()).mul_(ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, *weights = ctx.saved_tensors
        if keep is not None:
            grad = grad * ctx.scale
        # (autograd casts each gradient to its input's dtype when autocast computed in another)
        grad_x = None
        if weights:
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            grad_x = grad.mm(weight.to(grad.dtype))
            grad_x = grad_x if keep is None else torch.where(keep, grad_x, 0.0)
        grad_weights: tuple[torch.Tensor | None, ...] = (None,) * len(ctx.rows)
        if x is not None:
            x = x.to(ctx.compute_dtype)
            dropped = x if keep is None else torch.where(keep, x, 0.0)
            grad_weights = grad.t().mm(dropped).split(ctx.rows)
        return grad_x, None, None, *grad_weights
