"""Where a prefix lives in a model: its layout in PEFT's terms (layers, key/value heads, head
size, encoder-decoder halves) and the trainable PrefixEncoder that produces every layer's keys and
values in PEFT's stored layout, so files agree with PEFT's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.errors import TargetError
from peftkit.methods.virtual_tokens import shared as vt


@dataclass(frozen=True)
class Layout:
    """How the prefix maps onto a model's attention, in PEFT's terms."""

    num_layers: int  # layers the stored prefix covers (PEFT's num_layers)
    num_heads: int  # key/value heads (PEFT's num_attention_heads after its GQA fix)
    head_dim: int
    submodules: int  # 2 for encoder-decoders (PEFT's num_transformer_submodules)
    cache_layers: int  # attention layers that take a prefix from the cache

    @property
    def token_dim(self) -> int:
        """PEFT's token_dim: the key/value width of one layer."""
        return self.num_heads * self.head_dim

    @property
    def width(self) -> int:
        """Width of one stored prefix row: keys and values of every layer."""
        return self.num_layers * 2 * self.token_dim


def _get(config: Any, *names: str) -> Any:
    """The first of several attribute names the config has (families name things differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def layout(model: nn.Module) -> Layout:
    """The prefix layout of a model, or a TargetError naming why its attention cannot take one."""
    config = vt.text_config(model)
    name = type(model).__name__
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    heads = _get(config, "num_attention_heads", "n_head", "num_heads")
    if not (layers and hidden and heads):
        raise TargetError(
            f"Cannot read the attention layout of {name} (number of layers, hidden size, heads): "
            "prefix tuning needs a transformers model whose config names them."
        )
    grouped = getattr(config, "num_key_value_heads", None) is not None
    kv_heads = config.num_key_value_heads if grouped else heads
    head_dim = _get(config, "head_dim", "d_kv") or hidden // heads
    # PEFT's layout: token_dim is the hidden size split into the query heads, or for configs with
    # num_key_value_heads (grouped-query attention) kv_heads * head_dim split into kv_heads.
    peft_heads = kv_heads if grouped else heads
    peft_token_dim = head_dim * kv_heads if grouped else hidden
    if peft_heads != kv_heads or peft_token_dim != kv_heads * head_dim:
        raise TargetError(
            f"{name}'s attention has {kv_heads} key/value heads of size {head_dim}, which PEFT's "
            f"prefix layout (token_dim {peft_token_dim} split into {peft_heads} heads) cannot "
            "represent; prefix tuning cannot serve this model."
        )
    odd = sorted({t for t in getattr(config, "layer_types", None) or [] if t != "full_attention"})
    if odd:
        raise TargetError(
            f"{name} has {', '.join(odd)} layers: their cache drops old positions, and the prefix "
            "with them. Prefix tuning serves models whose layers all use full attention."
        )
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    cache_layers = (
        (getattr(config, "num_decoder_layers", None) or layers) if encoder_decoder else layers
    )
    if cache_layers != layers:
        raise TargetError(
            f"{name} has {layers} encoder and {cache_layers} decoder layers; PEFT's prefix layout "
            "for encoder-decoders needs equal counts."
        )
    return Layout(layers, kv_heads, head_dim, 2 if encoder_decoder else 1, cache_layers)


class PrefixEncoder(nn.Module):
    """The trainable prefix: rows of every layer's keys and values, direct or through an MLP."""

    def __init__(self, count: int, shape: Layout, encoder_hidden_size: int | None) -> None:
        super().__init__()
        self.layout = shape
        if encoder_hidden_size is None:
            self.embedding = nn.Embedding(count, shape.width)
            self.transform: nn.Module | None = None
        else:
            self.embedding = nn.Embedding(count, shape.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(shape.token_dim, encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, shape.width),
            )

    def forward(self) -> torch.Tensor:
        """The prefix as stored on disk: (P, num_layers * 2 * token_dim)."""
        rows = self.embedding.weight
        return self.transform(rows) if self.transform is not None else rows

    def fold(self) -> None:
        """Replace the MLP by the prefix it produces (training after this trains it directly)."""
        with torch.no_grad():
            rows = self().detach().clone()
        self.embedding = nn.Embedding(*rows.shape).to(rows.device)
        with torch.no_grad():
            self.embedding.weight.copy_(rows)
        self.transform = None

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per cache layer, each (batch, heads, P, head_dim), in PEFT's layout."""
        shape = self.layout
        rows = self().to(dtype)
        count = rows.shape[0]
        # The same view, duplication and permutation as PEFT's get_prompt, so files agree.
        states = rows.view(1, count, shape.num_layers * 2, shape.num_heads, shape.head_dim)
        states = states.expand(batch, -1, -1, -1, -1)
        if shape.submodules == 2:
            states = torch.cat([states, states], dim=2)
        chunks = states.permute(2, 0, 3, 1, 4).split(shape.submodules * 2)
        return [(chunk[0], chunk[1]) for chunk in chunks[: shape.cache_layers]]
