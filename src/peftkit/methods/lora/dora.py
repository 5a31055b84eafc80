"""DoRA on the fast LoRA path (fast.py): the weight norm once per layer per step, and the training
forward with dropout as one autograd function.

PEFT's DoRA layer in training with dropout computes, for x_d = dropout(x) and r = m / ||W + s BA||_c
(the norm detached, as in the paper's section 4.3),

    y = (x W^T + b) + (r - 1) * (x_d W^T) + r * s * (x_d A^T) B^T,

rebuilding s BA through an identity-matrix forward and the norm on every call, drawing a float
dropout mask and keeping the dropped copy of x, the base result and the branch's result for
backward. `DoraDropped` computes the same expression with the norm taken from `weight_norm`'s cache,
a bool mask (16-bit lanes, down.py), and for backward only the input, the mask, x_d A^T and the
one [tokens, out] product the magnitude's gradient needs (x_d W^T + s x_d A^T B^T); x_d is rebuilt
in backward. The two multiplies by W (of x and of x_d) are PEFT's formula's own: with dropout the
base sees the undropped input and the magnitude's correction the dropped one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.methods.lora import down as lora_fast_down

_NORM = "_peftkit_dora_norm"  # a layer's cached (key, norm)


def weight_norm(
    layer: nn.Module, name: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float
) -> torch.Tensor:
    """||W + s B A|| per output row, detached; computed again only when W, A or B changed (an
    optimizer step, a load) since the last call, so a step's forward, a gradient-checkpointed
    recompute and the evaluation after it share one. Under torch.compile it is computed on every
    call (dynamo compares no data pointers; the compiled graph fuses the norm into its step)."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return torch.linalg.norm(torch.addmm(weight, b, a, alpha=s), dim=1)
    key = (name, s) + tuple((t.data_ptr(), t._version, t.shape) for t in (weight, a, b))
    held = layer.__dict__.get(_NORM)
    if held is not None and held[0] == key:
        return held[1]
    with torch.no_grad():
        norm = torch.linalg.norm(torch.addmm(weight, b, a, alpha=s), dim=1)
    layer.__dict__[_NORM] = (key, norm)
    return norm


def forget_norm(layer: nn.Module) -> None:
    """Drop a layer's cached norm (when the fast path is uninstalled)."""
    layer.__dict__.pop(_NORM, None)


class DoraDropped(torch.autograd.Function):
    """PEFT's DoRA training forward with dropout, for a 2-D input (rows = tokens)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        p: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        magnitude: torch.Tensor,
        norm: torch.Tensor,
        s: float,
    ) -> torch.Tensor:
        keep = lora_fast_down.keep_mask(x.shape, p, x.device)
        scale = lora_fast_down.LANES / (lora_fast_down.LANES - lora_fast_down.drop_count(p))
        dropped = torch.where(keep, x, 0.0).mul_(scale)
        r = magnitude / norm
        y = torch.nn.functional.linear(x, weight, bias)
        y_dropped = dropped.mm(weight.t())
        h = dropped.mm(a.t())
        del dropped
        branch = h.mm(b.t())
        # PEFT's order: result + ((r - 1) * x_d W^T + r * branch * s)
        y.add_((r - 1) * y_dropped + r * branch * s)
        product = y_dropped.add_(branch, alpha=s) if ctx.needs_input_grad[6] else None
        ctx.save_for_backward(x, keep, weight, a, b, h, r, norm, product)
        ctx.scale, ctx.s = scale, s
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, weight, a, b, h, r, norm, product = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_bias = grad_a = grad_b = grad_m = None
        grad_branch = grad * (r * ctx.s)  # d y / d (x_d A^T B^T)
        grad_h = grad_branch.mm(b)
        if needs[5]:
            grad_b = grad_branch.t().mm(h)
        if needs[4]:
            dropped = torch.where(keep, x, 0.0).mul_(ctx.scale)
            grad_a = grad_h.t().mm(dropped)
        if needs[6]:
            grad_m = (grad * product).sum(0) / norm
        if needs[3]:
            grad_bias = grad.sum(0)
        if needs[0]:
            through_dropped = (grad * (r - 1)).mm(weight).add_(grad_h.mm(a))
            grad_x = grad.mm(weight).add_(torch.where(keep, through_dropped, 0.0), alpha=ctx.scale)
        return grad_x, None, None, grad_bias, grad_a, grad_b, grad_m, None, None
