"""Child-Tuning F's random masks, and the record of what they let change.

One random stream. In each optimizer step, entry i of a tensor is kept when the top 16 bits of
lowbias32(((i ^ seed_hi) + seed_lo) mod 2^32) fall below p * 65536, with the two 32-bit seeds
drawn from torch's generator once per tensor and step. The compiled CPU step
(child_tuning_kernel) hashes inside its loop; `keep_mask` computes the same bits with int64 torch
ops for every other path (GPU, bf16, optimizers other than AdamW), so all paths draw the same
masks from the same seeds. Runs repeat under torch.manual_seed, a resumed run continues the
stream from the checkpoint's random state, and in a distributed run every process uses rank 0's
seeds, so the replicas stay equal.

`mask_around` binds F to any optimizer instance through its step pre- and post-hooks: mask the
gradients before its step, put every entry outside the mask back exactly after it. AdamW itself
gets the one-pass ChildTuningAdamW instead (child_tuning_adamw.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.methods.child_tuning.sparse_patch import saved_count

_LANES = 65536  # each keep decision reads 16 random bits: p is used in steps of 1/65536
_LOW_32 = 0xFFFFFFFF
# lowbias32's multipliers. The second exceeds 2^31; taken minus 2^32 (the same value mod 2^32),
# no int64 product of a 32-bit value overflows, and the low 32 bits come out the same.
_MULTIPLY_1 = 0x7FEB352D
_MULTIPLY_2 = 0x846CA68B - (1 << 32)
# The torch paths work through each tensor in chunks of this many entries: the hash, the mask and
# the per-entry factors then stay in the CPU's cache between the passes over a chunk (over whole
# tensors the same operations ran at about half the speed).
CHUNK = 1 << 18
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_threshold(ratio: float) -> int:
    """Entries whose 16 random bits are below this are kept (1..65536; never probability 0)."""
    return max(1, round(ratio * _LANES))


def effective_ratio(ratio: float) -> float:
    """The keep probability the masks really use (the 1/p scale uses it, so the expected gradient
    is exactly the true one): ratio rounded to a multiple of 1/65536."""
    return keep_threshold(ratio) / _LANES


def step_seeds(count: int, device: torch.device) -> list[tuple[int, int]]:
    """Two 32-bit seeds per tensor for this step, from torch's generator; in a distributed run,
    the main process's (a replica whose dropout drew more numbers would otherwise diverge)."""
    seeds = torch.randint(0, 2**32, (count, 2), dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        on = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        seeds = seeds.to(on)
        torch.distributed.broadcast(seeds, src=0)
    return [tuple(pair) for pair in seeds.tolist()]


def keep_mask(
    start: int, seeds: tuple[int, int], threshold: int, out: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """out[j] = whether entry start + j is kept: the compiled kernel's hash in int64 torch ops.
    scratch: an int64 tensor of at least 2 * out.numel() entries on out's device."""
    size = out.numel()
    x, shifted = scratch[:size], scratch[size : 2 * size]
    torch.arange(start, start + size, out=x)
    x.bitwise_xor_(seeds[0]).add_(seeds[1]).bitwise_and_(_LOW_32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted))
    x.mul_(_MULTIPLY_1).bitwise_and_(_LOW_32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=shifted))
    x.mul_(_MULTIPLY_2).bitwise_and_(_LOW_32)
    # lowbias32 ends with x ^= x >> 16, which leaves the top 16 bits, the ones used, as they are.
    return torch.lt(x, threshold << 16, out=out)


def chunks(numel: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of a flat tensor of `numel` entries."""
    for start in range(0, numel, CHUNK):
        yield start, min(start + CHUNK, numel)


@dataclass
class MaskRecord:
    """F's masks: this step's, per tensor, and every entry any step has kept (what save writes)."""

    ratio: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # reused every step
    # Entries changed so far; an all-True view once a tensor will be saved whole.
    touched: dict[str, torch.Tensor] = field(default_factory=dict)
    touched_count: dict[str, int] = field(default_factory=dict)
    saved_whole: set[str] = field(default_factory=set)
    # Chunk-sized work tensors by (dtype, device, slot), reused every step.
    buffers: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    def mask(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        """The flat buffer that holds this step's mask of `parameter`."""
        if name not in self.masks:
            self.masks[name] = torch.empty_like(parameter, dtype=torch.bool)
        return self.masks[name].view(-1)

    def buffer(self, dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
        """A reusable work tensor of CHUNK entries."""
        key = (dtype, device, slot)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(CHUNK, dtype=dtype, device=device)
        return self.buffers[key]

    def hash_scratch(self, device: torch.device) -> torch.Tensor:
        """keep_mask's reusable int64 scratch (two chunks)."""
        key = ("hash", device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(2 * CHUNK, dtype=torch.int64, device=device)
        return self.buffers[key]

    def tracked(self, name: str, parameter: torch.Tensor) -> torch.Tensor | None:
        """The flat touched mask to add this step's kept entries to (None: saved whole)."""
        if name in self.saved_whole:
            return None
        if name not in self.touched:
            self.touched[name] = torch.zeros_like(parameter, dtype=torch.bool)
        return self.touched[name].view(-1)

    def counted(self, name: str, newly_set: int | None = None) -> None:
        """Update the count of touched entries (by newly_set, or recounted) and, once a sparse
        patch would be no smaller than the tensor, save it whole: within about ten steps at
        p = 0.3, after which tracking it would cost a pass over it every step for nothing."""
        touched = self.touched[name]
        if newly_set is None or name not in self.touched_count:
            self.touched_count[name] = int(touched.sum())
        else:
            self.touched_count[name] += newly_set
        if saved_count(self.touched_count[name], touched.numel()) == touched.numel():
            self.save_whole(name, touched)

    def save_whole(self, name: str, like: torch.Tensor) -> None:
        """Record every entry of tensor `name` as changed, at no cost per step from now on."""
        all_true = torch.ones(1, dtype=torch.bool, device=like.device)
        self.touched[name] = all_true.expand(like.shape)
        self.touched_count[name] = like.numel()
        self.saved_whole.add(name)


def mask_around(
    optimizer: torch.optim.Optimizer, record: MaskRecord, names: dict[int, str]
) -> torch.optim.Optimizer:
    """Child-Tuning F around any optimizer, bound to this instance: before its step, keep a fresh
    mask of each gradient (times 1/p) and copy the weights; after it, put every entry outside the
    mask back exactly. Costs a copy of the weights and about five passes over them per step.
    names: parameter id -> name. Returns the same optimizer."""
    copies: dict[str, torch.Tensor] = {}
    masked: list[tuple[str, torch.Tensor]] = []
    threshold, scale = keep_threshold(record.ratio), 1.0 / effective_ratio(record.ratio)

    @torch.no_grad()
    def mask_gradients(opt: Any, args: Any, kwargs: Any) -> None:
        with_grad = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        device = with_grad[0].device if with_grad else torch.device("cpu")
        for parameter, seeds in zip(with_grad, step_seeds(len(with_grad), device), strict=True):
            name = names[id(parameter)]
            if not parameter.grad.is_contiguous():
                parameter.grad = parameter.grad.contiguous()
            if name not in copies:
                copies[name] = torch.empty_like(parameter)
            keep, grad = record.mask(name, parameter), parameter.grad.view(-1)
            weight, copy = parameter.detach().view(-1), copies[name].view(-1)
            scratch = record.hash_scratch(grad.device)
            factor = record.buffer(grad.dtype, grad.device, 1)
            for start, stop in chunks(grad.numel()):
                chunk_keep = keep_mask(start, seeds, threshold, keep[start:stop], scratch)
                # A float factor (0 or 1/p): float x bool multiplies run far slower.
                chunk_factor = factor[: stop - start].copy_(chunk_keep).mul_(scale)
                grad[start:stop].mul_(chunk_factor)
                copy[start:stop].copy_(weight[start:stop])
            masked.append((name, parameter))

    @torch.no_grad()
    def restore_outside_mask(opt: Any, args: Any, kwargs: Any) -> None:
        # Bit for bit: as integers, the kept entries' bits from the new value, the rest from
        # the old one.
        for name, parameter in masked:
            as_int = _SAME_SIZE_INT[parameter.element_size()]
            weight = parameter.detach().view(-1).view(as_int)
            copy = copies[name].view(-1).view(as_int)
            keep = record.masks[name].view(-1)
            kept_bits = record.buffer(as_int, parameter.device, 2)
            other_bits = record.buffer(as_int, parameter.device, 3)
            for start, stop in chunks(weight.numel()):
                kept = kept_bits[: stop - start].copy_(keep[start:stop]).neg_()  # all ones if kept
                other = torch.bitwise_not(kept, out=other_bits[: stop - start])
                old = copy[start:stop].bitwise_and_(other)
                weight[start:stop].bitwise_and_(kept).bitwise_or_(old)
            touched = record.tracked(name, parameter)
            if touched is not None:
                touched |= keep
                record.counted(name)
        masked.clear()

    optimizer.register_step_pre_hook(mask_gradients)
    optimizer.register_step_post_hook(restore_outside_mask)
    return optimizer


def record_changes(
    optimizer: torch.optim.Optimizer, record: MaskRecord, names: dict[int, str]
) -> torch.optim.Optimizer:
    """p = 1 (every entry kept: plain fine-tuning): the same optimizer, recording after each step
    that every tensor it stepped changed whole."""

    def record_stepped(opt: Any, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            for parameter in group["params"]:
                name = names[id(parameter)]
                if parameter.grad is not None and name not in record.saved_whole:
                    record.save_whole(name, parameter)

    optimizer.register_step_post_hook(record_stepped)
    return optimizer
