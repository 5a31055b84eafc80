"""One causal LM kept in step with another model's decoding: its own prompt, mask, positions, cache.

A logits processor sees only the base model's tokens and scores. To add a second model's opinion at
each step without recomputing the whole prefix, that model is fed its own prompt once (the prefill),
then exactly the token the base chose, with its own key/value cache. Masks and position ids follow
the rules `generate` itself uses (transformers 5.24, generation/utils.py): positions are the running
count of real tokens, left padding sits at position 0 and is masked out, and every new token gets a
mask of 1 and the next position, including tokens appended to rows that have already finished."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0, 1, 2... over real tokens, 0 on padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def unwrapped(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or under peftkit's WithoutAdapter view)."""
    while hasattr(model, "get_base_model"):
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


def model_device(model: Any) -> torch.device:
    """Where a model's weights live."""
    return next(unwrapped(model).parameters()).device


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model can skip the LM head on all but the last position (a prefill saving)."""
    return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters


class ModelStream:
    """A causal LM fed a prompt once, then one token per step; returns next-token logits."""

    def __init__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> None:
        self.model = model
        self.device = model_device(model)
        self.input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(self.input_ids)
        self.attention_mask = attention_mask.to(self.device)
        self.use_cache = use_cache
        self.cache: Any = None
        self.next_position: torch.Tensor | None = None
        self.extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    @property
    def batch_size(self) -> int:
        """Rows in this stream's batch."""
        return self.input_ids.shape[0]

    def start(self) -> torch.Tensor:
        """Run the whole prompt; logits (float32) for the first new token, shape (batch, vocab)."""
        return self._run_full()

    def step(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; logits (float32) for the token after it."""
        new_tokens = new_tokens.reshape(-1, 1).to(self.device)
        self.input_ids = torch.cat([self.input_ids, new_tokens], dim=-1)
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((self.batch_size, 1))], dim=-1
        )
        if not self.use_cache:
            return self._run_full()  # the reference path: recompute everything, no cache
        outputs = self.model(
            input_ids=new_tokens,
            attention_mask=self.attention_mask,
            position_ids=self.next_position,
            cache=self.cache,
            use_cache=True,
            **self.extra,
        )
        self.cache = outputs.cache
        self.next_position = self.next_position + 1
        return outputs.logits[:, -1].float()

    def _run_full(self) -> torch.Tensor:
        """Forward the whole sequence so far (the prefill, or every step when caching is off)."""
        positions = positions_from_mask(self.attention_mask)
        outputs = self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            use_cache=self.use_cache,
            **self.extra,
        )
        self.cache = outputs.cache if self.use_cache else None
        self.next_position = positions[:, -1:] + 1
        return outputs.logits[:, -1].float()
