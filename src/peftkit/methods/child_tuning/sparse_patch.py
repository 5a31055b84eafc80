"""Saving the changed entries of dense tensors: one sparse patch per changed tensor.

Any method that trains some entries of the model's own tensors (Child-Tuning F and D) saves, per
changed tensor, the new values of the changed entries and their positions, not a full copy:

- `<name>.values` (the entries' new values, not differences, so loading is bit for bit) with
  `<name>.indices` (int32 positions, int64 past 2^31 entries) or `<name>.bitmask` (1 bit per
  entry, packed little-endian), whichever is smaller;
- `<name>` itself, the whole tensor, where the patch would be no smaller than the tensor.

The count of changed entries per tensor (`saved_count`) decides the encoding, so a loader that
knows the counts (an adapter_config's layout) knows every key and shape before reading."""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices where they fit (half the bytes of int64)."""
    return torch.int32 if numel < 2**31 else torch.int64


def patch_bytes(count: int, numel: int) -> int:
    """Bytes on disk of a sparse patch of `count` float32 values in a tensor of `numel`."""
    return count * 4 + min(count * 4, (numel + 7) // 8)


def saved_count(changed: int, numel: int) -> int:
    """The count a tensor with `changed` of `numel` entries changed is saved under: `changed`, or
    `numel` (saved whole) where a sparse patch would be no smaller than the tensor."""
    return numel if patch_bytes(changed, numel) >= 4 * numel else changed


def encoding(count: int, numel: int) -> str:
    """How a tensor saved with `count` of `numel` entries is stored: 'dense' (the tensor),
    'indices' (positions) or 'bitmask' (1 bit per entry), whichever is smallest."""
    if count == numel:
        return "dense"
    return "bitmask" if count * 4 > (numel + 7) // 8 else "indices"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool mask as uint8 bytes, 8 entries per byte (little-endian bit order)."""
    flat = mask.flatten().cpu()
    padded = torch.zeros((flat.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat bool mask pack_bits encoded."""
    bits = packed.view(-1, 1).bitwise_and(_BIT_WEIGHTS) != 0
    return bits.flatten()[:numel]


def encode(
    name: str, tensor: torch.Tensor, count: int, indices: torch.Tensor, values: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The saved tensors of `tensor` (as trained) under `name`. count: its saved_count;
    indices and values: its changed entries (read only when it is not saved whole)."""
    numel = tensor.numel()
    kind = encoding(count, numel)
    if kind == "dense":
        return {name: tensor}
    if kind == "indices":
        return {f"{name}.values": values, f"{name}.indices": indices.to(index_dtype(numel))}
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[indices.long().cpu()] = True
    return {f"{name}.values": values, f"{name}.bitmask": pack_bits(mask)}


def decode(
    tensors: dict[str, torch.Tensor], name: str, count: int, numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions as int64, flat new values) of the tensor encode saved under `name`."""
    kind = encoding(count, numel)
    if kind == "dense":
        return torch.arange(numel), tensors[name].flatten()
    values = tensors[f"{name}.values"]
    if kind == "indices":
        return tensors[f"{name}.indices"].long(), values
    return unpack_bits(tensors[f"{name}.bitmask"], numel).nonzero().squeeze(1), values
