"""Proxy-Tuning for one row of the running batch: the row's base logits come from the batch (with
the row's adapter, if any); the expert and anti-expert named at start follow the row with their
own caches (decoding/stream.py) and shift those logits by alpha * (expert - anti_expert)
(decoding/proxy.py). They run one row at a time, outside the batched forward: each proxy row adds
two small-model forwards per step, and rows without Proxy-Tuning pay nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftkit.decoding.proxy import proxy_logits
from peftkit.decoding.proxy_options import check_vocabularies
from peftkit.decoding.stream import ModelStream


@dataclass(frozen=True)
class ProxyPair:
    """The tuned small model and its untuned twin (WithoutAdapter for one set of weights)."""

    expert: Any
    anti_expert: Any

    def check(self, base: Any, tokenizer: Any) -> None:
        """All three models score the tokenizer's ids (one tokenizer is shared by construction)."""
        models = {"base": base, "expert": self.expert, "anti-expert": self.anti_expert}
        check_vocabularies(models, {"base": tokenizer})


class ProxyRow:
    """The expert and anti-expert kept in step with one row."""

    def __init__(self, pair: ProxyPair, prompt: list[int], alpha: float) -> None:
        ids = torch.tensor([prompt])
        self.streams = (ModelStream(pair.expert, ids), ModelStream(pair.anti_expert, ids))
        self.alpha = alpha

    def first(self, base_logits: torch.Tensor) -> torch.Tensor:
        """Proxy logits for the first new token (runs both prompts)."""
        expert, anti_expert = (stream.start() for stream in self.streams)
        return self._combine(base_logits, expert, anti_expert)

    def next(self, base_logits: torch.Tensor, token: int) -> torch.Tensor:
        """Proxy logits for the token after `token`."""
        new = torch.tensor([token])
        expert, anti_expert = (stream.step(new) for stream in self.streams)
        return self._combine(base_logits, expert, anti_expert)

    def _combine(
        self, base: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor
    ) -> torch.Tensor:
        """base + alpha * (expert - anti_expert) for a (vocab,) row."""
        return proxy_logits(base[None], expert.to(base.device), anti.to(base.device), self.alpha)[0]
