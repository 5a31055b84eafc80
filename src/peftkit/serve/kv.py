"""The running batch's key/value cache as rows join and leave (transformers' DynamicCache).

Every layer holds keys and values of shape (rows, heads, length, head_dim). Rows are left-aligned
to the newest token: a row with fewer tokens has padding on the left, masked out by the batch's
attention mask, which grows with the cache. Joining places both sides, the shorter padded on the
left, in one new buffer; leaving selects rows; columns that no remaining row uses (padding
everywhere) are cut from the left, so the cache stays as long as the longest live row.

The layers are GrowingLayers: a step writes its new column into a buffer with room to spare
instead of concatenating the whole cache (transformers' DynamicLayer copies every cached key and
value each step, which made a decode step next to a 3,000-token row cost 4-5 plain steps)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peftkit.errors import ConfigError


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose appends write in place into buffers with room to spare (a quarter
    more, at least 16 columns), copying only when the buffers are full. `keys` and `values` are
    views of the buffers' first columns; whatever replaces them (selecting rows, cutting columns)
    makes the next append copy them into new buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True
        self.keys, self.values = keys, values
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new columns; the whole keys and values so far."""
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._appendable(length + new):
            self.place([self.keys], [self.values], length, spare=new)
        keys, values = self.buffers
        keys[:, :, length : length + new] = key_states
        values[:, :, length : length + new] = value_states
        self.keys, self.values = keys[:, :, : length + new], values[:, :, : length + new]
        return self.keys, self.values

    def _appendable(self, needed: int) -> bool:
        """Whether keys and values are still the buffers' first columns, with `needed` room."""
        if self.buffers is None:
            return False
        return all(
            view.data_ptr() == buffer.data_ptr()
            and view.shape[:2] == buffer.shape[:2]
            and view.stride() == buffer.stride()
            and needed <= buffer.shape[2]
            for view, buffer in zip((self.keys, self.values), self.buffers, strict=True)
        )

    def place(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int, spare: int = 0
    ) -> None:
        """New buffers holding `keys`/`values` (parts stacked on the row axis), each part aligned
        to the right of `length` columns with zeros on its left, and room to grow after."""
        rows = sum(part.shape[0] for part in keys)
        capacity = length + spare + max(16, (length + spare) // 4)
        buffers = []
        for parts in (keys, values):
            first = parts[0]
            buffer = first.new_empty((rows, first.shape[1], capacity, first.shape[3]))
            row = 0
            for part in parts:
                pad = length - part.shape[2]
                buffer[row : row + part.shape[0], :, :pad] = 0  # masked, but must be finite
                buffer[row : row + part.shape[0], :, pad:length] = part
                row += part.shape[0]
            buffers.append(buffer)
        self.buffers = (buffers[0], buffers[1])
        self.keys, self.values = buffers[0][:, :, :length], buffers[1][:, :, :length]


def check_plain(cache: Any) -> None:
    """Refuse caches whose layers are not plain growing key/value tensors (sliding windows...)."""
    if not isinstance(cache, DynamicCache) or any(
        type(layer) not in (DynamicLayer, GrowingLayer) for layer in cache.layers
    ):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        raise ConfigError(
            f"The server batches models whose cache is a plain DynamicCache; this model's is "
            f"{type(cache).__name__} ({', '.join(kinds)}), e.g. sliding-window attention. Serve a "
            "model with full attention."
        )


def growing(cache: Any) -> Any:
    """`cache` (checked plain) with its DynamicLayers turned into GrowingLayers (no copy yet)."""
    check_plain(cache)
    cache.layers = [
        layer if isinstance(layer, GrowingLayer) else GrowingLayer(layer.keys, layer.values)
        for layer in cache.layers
    ]
    return cache


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
    """The running rows followed by the new ones: one cache and one mask, aligned on the right
    (each layer copied once, into buffers with room for the next steps)."""
    length = max(mask.shape[1], new_mask.shape[1])
    cache = growing(cache)
    for layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
        layer.place([layer.keys, new_layer.keys], [layer.values, new_layer.values], length)
    mask = torch.cat(
        [
            left_pad(mask, length - mask.shape[1], 1),
            left_pad(new_mask, length - new_mask.shape[1], 1),
        ]
    )
    return cache, mask


def keep_rows(cache: Any, mask: torch.Tensor, rows: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Only `rows` (indices), with the columns no kept row uses cut from the left."""
    mask = mask.index_select(0, rows)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, start:].index_select(0, rows)
        layer.values = layer.values[:, :, start:].index_select(0, rows)
    return cache, mask[:, start:]
