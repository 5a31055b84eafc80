"""One row of the running batch: a prompt continued for one request (a request with several
prompts has one row each), with its adapter, its sampling settings, its text and its outbox.

The scheduler thread calls `emit`, which must be thread-safe (the HTTP layer passes a function
that hands events to its event loop). Events, in order: ("text", delta)*, then one of
("done", finish_reason) or ("error", ServeError). A row that is cancelled (its client left)
gets no more events."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftkit.serve.errors import ServeError
from peftkit.serve.sampling import Sampling, TextStream

Emit = Callable[[str, Any], None]


@dataclass(eq=False)
class Row:
    """A prompt being continued, and where its text goes."""

    prompt: list[int]
    adapter: str | None  # None: the base model
    sampling: Sampling
    emit: Emit
    deadline: float = float("inf")  # time.monotonic() after which the row fails with a 504
    text: TextStream | None = None  # set when admitted
    generator: Any = None  # the row's torch.Generator (None: greedy)
    proxy: Any = None  # its ProxyRow when the request asked for Proxy-Tuning
    generated: int = 0  # tokens produced so far (a stop token included)
    last_token: int | None = None
    finished: bool = False
    cancelled: bool = False
    logprobs: list[Any] = field(default_factory=list)  # per generated token (sampling.logprobs)
    prompt_logprobs: list[Any] = field(default_factory=list)  # per prompt token (echo)
    submitted: float = field(default_factory=time.monotonic)

    def take(self, token: int, stops: set[int]) -> None:
        """Record the row's next token: send the text it completes; finish when it ends."""
        self.generated += 1
        self.last_token = token
        if token in stops and not self.sampling.ignore_eos:
            self.finish("stop")
            return
        delta = self.text.add(token)
        if delta:
            self.send("text", delta)
        if self.text.stopped:
            self.finish("stop")
        elif self.generated >= self.sampling.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the row normally: the text still held back, then the finish reason."""
        if self.finished:
            return
        rest = self.text.finish() if self.text else ""
        if rest:
            self.send("text", rest)
        self.finished = True
        self.send("done", reason)

    def fail(self, error: ServeError) -> None:
        """End the row with an error."""
        if not self.finished:
            self.finished = True
            self.send("error", error)

    def expire(self, now: float) -> bool:
        """Fail the row if its time is up; whether it is over (finished, failed or cancelled)."""
        if not self.finished and not self.cancelled and now > self.deadline:
            self.fail(
                ServeError(
                    f"The request ran past the server's time limit after {self.generated} "
                    "tokens; ask for fewer tokens (max_tokens) or retry when the server is less "
                    "busy.",
                    status=504,
                    code="timeout",
                )
            )
        return self.finished or self.cancelled

    def send(self, kind: str, payload: Any) -> None:
        """Hand an event to the request's client, unless it has gone."""
        if not self.cancelled:
            self.emit(kind, payload)
