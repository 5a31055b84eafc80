"""The running batch's key/value cache as rows join and leave (transformers' DynamicCache).

Every layer holds keys and values of shape (rows, heads, length, head_dim). Rows are left-aligned
to the newest token: a row with fewer tokens has padding on the left, masked out by the batch's
attention mask, which grows with the cache. Joining concatenates on the row axis after padding
the shorter side on the left; leaving selects rows; columns that no remaining row uses (padding
everywhere) are cut from the left, so the cache stays as long as the longest live row."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peftkit.errors import ConfigError


def check_plain(cache: Any) -> None:
    """Refuse caches whose layers are not plain growing key/value tensors (sliding windows...)."""
    if not isinstance(cache, DynamicCache) or any(
        type(layer) is not DynamicLayer for layer in cache.layers
    ):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        raise ConfigError(
            f"The server batches models whose cache is a plain DynamicCache; this model's is "
            f"{type(cache).__name__} ({', '.join(kinds)}), e.g. sliding-window attention. Serve a "
            "model with full attention."
        )


def left_pad(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """`tensor` with `columns` zeros prepended along `dim`."""
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def join(
    cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor
) -> tuple[Any, torch.Tensor]:
    """The running rows followed by the new ones: one cache and one mask, aligned on the right."""
    length = max(mask.shape[1], new_mask.shape[1])
    for layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
        old_pad, new_pad = length - mask.shape[1], length - new_mask.shape[1]
        layer.keys = torch.cat(
            [left_pad(layer.keys, old_pad, 2), left_pad(new_layer.keys, new_pad, 2)]
        )
        layer.values = torch.cat(
            [left_pad(layer.values, old_pad, 2), left_pad(new_layer.values, new_pad, 2)]
        )
    mask = torch.cat(
        [
            left_pad(mask, length - mask.shape[1], 1),
            left_pad(new_mask, length - new_mask.shape[1], 1),
        ]
    )
    return cache, mask


def keep_rows(cache: Any, mask: torch.Tensor, rows: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Only `rows` (indices), with the columns no kept row uses cut from the left."""
    cache.batch_select_indices(rows)
    mask = mask.index_select(0, rows)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    if start:
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
        mask = mask[:, start:]
    return cache, mask
