"""Child-Tuning D's child network: which entries (the top p of the layers' weights by Fisher
information, the mean squared gradient of the task loss), and how they train (a parametrization
that folds a trainable values tensor into the frozen weight).

The top k is exact over all tensors, found by a radix select over the float32 bit patterns, not by
concatenating every parameter into one array (as the reference code does for np.percentile)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftkit.errors import DataError
from peftkit.methods.child_tuning.sparse_patch import index_dtype
from peftkit.targeting import in_layer_stack


def layer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the numbered transformer layers: D's candidates."""
    return {n: p for n, p in model.named_parameters() if in_layer_stack(n)}


def _on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to the model's device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fisher_information(
    model: nn.Module,
    parameters: dict[str, nn.Parameter],
    batches: Iterable[dict[str, Any]],
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the task loss per entry (float32), over up to max_batches."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in parameters.items()}
    device = next(model.parameters()).device
    count = 0
    model.train()  # as the reference code: dropout on, like the training it prepares
    try:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            loss = model(**_on_device(batch, device)).loss
            if loss is None:
                raise DataError("The Fisher pass needs batches with labels (the loss was None).")
            loss.backward()
            for name, parameter in parameters.items():
                if parameter.grad is not None:
                    fisher[name].addcmul_(parameter.grad, parameter.grad)
                    parameter.grad = None
            count += 1
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
            parameter.grad = None
        model.train(was_training)
    if count == 0:
        raise DataError(
            "Child-Tuning D's Fisher pass received no batches: pass the training batches "
            "(an iterable of dicts model(**batch) accepts, labels included) to prepare()."
        )
    return {n: f.div_(count) for n, f in fisher.items()}


# Radix digits of a non-negative float32's 31 significant bits, high to low: (shift, width).
_DIGITS = ((23, 8), (15, 8), (7, 8), (0, 7))


def kth_largest_bits(bits: dict[str, torch.Tensor], k: int) -> tuple[int, int]:
    """The bit pattern t of the k-th largest entry over all tensors, and how many entries equal
    to t belong to the top k. A radix select: one bincount pass per 8-bit digit, no concat."""
    prefix, wanted, decided = 0, k, 0  # decided: bits of t fixed so far
    for shift, width in _DIGITS:
        counts = torch.zeros(1 << width, dtype=torch.int64)
        for pattern in bits.values():
            flat = pattern.flatten()
            if decided:  # only entries whose higher digits equal t's so far can still matter
                flat = flat[(flat >> (shift + width)) == prefix]
            digits = (flat >> shift) & ((1 << width) - 1)
            counts += torch.bincount(digits, minlength=1 << width)
        from_top = counts.flip(0).cumsum(0)
        position = int((from_top >= wanted).nonzero()[0])
        digit = (1 << width) - 1 - position
        wanted -= int(from_top[position] - counts[digit])  # higher digits are all in the top k
        prefix, decided = (prefix << width) | digit, decided + width
    return prefix, wanted


def top_k_masks(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly the k largest entries over all tensors, without concatenating them.

    Non-negative float32 values order like their int32 bit patterns, so a radix select over
    the bit patterns (kth_largest_bits) finds the k-th largest value exactly. Ties at that value
    are broken by position (earlier tensors, then earlier entries), so exactly k are kept."""
    bits = {n: s.contiguous().view(torch.int32) for n, s in scores.items()}
    threshold, ties_wanted = kth_largest_bits(bits, k)
    masks = {n: b > threshold for n, b in bits.items()}
    for name, pattern in bits.items():
        if ties_wanted <= 0:
            break
        ties = (pattern == threshold).flatten().nonzero().squeeze(1)[:ties_wanted]
        masks[name].view(-1)[ties] = True
        ties_wanted -= ties.numel()
    return masks


def subnetwork_indices(
    model: nn.Module, batches: Iterable[dict[str, Any]], ratio: float, max_batches: int | None
) -> dict[str, torch.Tensor]:
    """D's child network: the positions of the top `ratio` share of the layers' weights by Fisher
    information (int32 where they fit), per tensor that keeps any."""
    fisher = fisher_information(model, layer_parameters(model), batches, max_batches)
    keep = max(1, round(ratio * sum(f.numel() for f in fisher.values())))
    masks = top_k_masks(fisher, keep)
    del fisher
    chosen = {}
    for name, mask in masks.items():
        indices = mask.flatten().nonzero().squeeze(1)
        if indices.numel():
            chosen[name] = indices.to(index_dtype(mask.numel()))
    return chosen


def planned_indices(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """Indices of a subnetwork of the size subnetwork_indices keeps (max(1, round(p x the layer
    stack's weights)) entries), spread over the tensors in proportion to their sizes: which
    entries is what the data decides, so only the count is planned (the memory estimator)."""
    sizes = {name: p.numel() for name, p in layer_parameters(model).items()}
    total = sum(sizes.values())
    if not total:
        return {}
    keep = max(1, round(ratio * total))
    counts = {name: keep * size // total for name, size in sizes.items()}
    for name in list(counts)[: keep - sum(counts.values())]:  # the rounding remainder, one each
        counts[name] += 1
    return {
        name: torch.arange(count, dtype=index_dtype(sizes[name]),
                           device=model.get_parameter(name).device)
        for name, count in counts.items()
        if count
    }  # fmt: skip


class SubnetworkValues(nn.Module):
    """Parametrization: the frozen weight with the entries at `indices` replaced by `values`."""

    def __init__(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(values)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """W with the kept entries swapped in; the gradient flows to `values` only."""
        return weight.flatten().index_put((self.indices,), self.values).view_as(weight)


def install_values(model: nn.Module, name: str, indices: torch.Tensor) -> tuple[nn.Module, str]:
    """Fold a trainable values tensor for `indices` into parameter `name`, whose dense weight
    freezes; returns (owning module, attribute)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    weight = getattr(module, attribute)
    weight.requires_grad_(False)
    indices = indices.to(weight.device)
    values = weight.detach().flatten()[indices.long()].clone()
    parametrize.register_parametrization(module, attribute, SubnetworkValues(indices, values))
    return module, attribute
