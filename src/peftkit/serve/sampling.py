"""Choosing each row's next token with that request's own settings, and turning its tokens into
text that can be sent as it grows (stop strings honoured, never half a character).

Temperature 0 is greedy (the arg max, as `generate` without sampling), and so is any temperature
below GREEDY_BELOW (vLLM's rule: dividing by 1e-37 overflows the logits to infinity, and the
distribution it stands for is the arg max anyway); otherwise the logits are divided by the
temperature, cut to the smallest set of tokens whose probability reaches top_p
(nucleus sampling), and sampled with the request's own generator, so a request's seed fixes its
text whatever else shares the batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings (validated by the protocol layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # decode max_tokens whatever comes (load tests, as in vLLM)
    proxy_alpha: float | None = None  # Proxy-Tuning strength; None: no Proxy-Tuning

    @property
    def greedy(self) -> bool:
        """Whether the row takes the arg max (temperature 0 or too small to divide by)."""
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream (None when decoding greedily)."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()  # a fresh nondeterministic seed
        else:
            generator.manual_seed(self.seed)
        return generator


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the smallest set reaching probability top_p at -inf."""
    if top_p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, descending=True)
    probabilities = ordered.softmax(-1)
    # A token stays if the mass before it is below top_p: the first token always stays.
    before = probabilities.cumsum(-1) - probabilities
    ordered = ordered.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: Any) -> int:
    """One row's next token from its (vocab,) float logits."""
    if sampling.greedy:
        return int(logits.argmax())
    scaled = nucleus(logits / sampling.temperature, sampling.top_p)
    probabilities = scaled.softmax(-1)
    if not torch.isfinite(probabilities).all():
        if torch.isnan(logits).any():
            raise ValueError("the model's logits for this row hold NaN")
        return int(logits.argmax())  # logits that overflowed when divided: the limit is the arg max
    return int(torch.multinomial(probabilities, 1, generator=generator))


@dataclass
class TextStream:
    """A row's generated text, released as it becomes final.

    The whole continuation is decoded again at each token (the tokenizer then joins pieces and
    spaces exactly as it does for the finished text), and what is released stops short of a
    possible start of a stop string and of a trailing replacement character (the first bytes of
    a character whose last byte has not come yet)."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters already released
    stopped: bool = False  # a stop string ended the text

    def add(self, token: int) -> str:
        """Take one more token; the text that is now final (may be empty)."""
        self.token_ids.append(token)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut])
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip
        end = len(text) - held
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        return self._release(text[:end])

    def finish(self) -> str:
        """Everything not yet released (the row is done)."""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return "" if self.stopped else self._release(text)

    def _release(self, final: str) -> str:
        """The part of `final` past what was already sent."""
        delta = final[self.sent :]
        self.sent = max(self.sent, len(final))
        return delta
