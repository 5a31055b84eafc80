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
    logprobs: int | None = None  # top alternatives to report per token; None: no log-probs
    echo: bool = False  # also report the prompt's tokens' log-probs (with logprobs)

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


Logprob = tuple[int, float | None, list[tuple[int, float]]]  # token, its log-prob, top others


def logprob_entries(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[Logprob]:
    """Each position's token with its log-probability under `logits` (positions, vocab) and the
    `top` most likely tokens (the model's own distribution: no temperature or top_p)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    best = logprobs.topk(top, dim=-1) if top > 0 else None
    entries = []
    for index, token in enumerate(tokens.tolist()):
        others = []
        if best is not None:
            others = list(
                zip(best.indices[index].tolist(), best.values[index].tolist(), strict=True)
            )
        entries.append((token, chosen[index], others))
    return entries


def prefix_table(stop: str) -> list[int]:
    """Knuth-Morris-Pratt's table: for each i, the longest proper prefix of stop[: i + 1] that
    is also its suffix."""
    table, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


@dataclass
class TextStream:
    """A row's generated text, released as it becomes final.

    The whole continuation is decoded again at each token (the tokenizer then joins pieces and
    spaces exactly as it does for the finished text), and what is released stops short of a
    possible start of a stop string and of a trailing replacement character (the first bytes of
    a character whose last byte has not come yet).

    Stop strings are matched by one Knuth-Morris-Pratt automaton each, fed every character once
    as it becomes final: the work per token is the new characters times the stop strings, not the
    text's or the stop strings' length (a 400 KB stop string once cost seconds a token)."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters already released
    stopped: bool = False  # a stop string ended the text
    scanned: str = ""  # the text the automata have read
    states: list[int] = field(default_factory=list)  # per stop: how much of it the text ends with
    tables: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tables = [prefix_table(stop) for stop in self.stop]
        self.states = [0] * len(self.stop)

    def add(self, token: int) -> str:
        """Take one more token; the text that is now final (may be empty)."""
        self.token_ids.append(token)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        final = text[:end]
        if not final.startswith(self.scanned):  # the tokenizer rewrote earlier text: read anew
            self.scanned, self.states = "", [0] * len(self.stop)
        cut = self._scan(final)
        if cut >= 0:
            self.stopped = True
            return self._release(final[:cut])
        return self._release(final[: len(final) - max(self.states, default=0)])

    def _scan(self, final: str) -> int:
        """Feed the automata the characters of `final` past those already read; where the first
        stop string found starts (-1: none yet)."""
        found = []
        for position in range(len(self.scanned), len(final)):
            char = final[position]
            for index, stop in enumerate(self.stop):
                k, table = self.states[index], self.tables[index]
                while k and stop[k] != char:
                    k = table[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):  # a whole stop string ends here
                    found.append(position + 1 - k)
                    k = table[k - 1]
                self.states[index] = k
        self.scanned = final
        return min(found, default=-1)

    def finish(self) -> str:
        """Everything not yet released (the row is done)."""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return "" if self.stopped else self._release(text)

    def _release(self, final: str) -> str:
        """The part of `final` past what was already sent."""
        delta = final[self.sent :]
        self.sent = max(self.sent, len(final))
        return delta
