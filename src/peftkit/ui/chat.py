"""The chat playground without the page: one adapter of the workspace and its base, side by side,
on the serve engine (`peftkit serve`'s, run in this process): each message goes to the engine
as two rows of one batch, one through the adapter and one through the base (a row without an
adapter), checked, rendered through the chat template and sampled exactly as
/v1/chat/completions does, and their text comes back as it is decoded.

Each side keeps its own conversation: the base's earlier answers are the base's, the adapter's
the adapter's, as two chat windows would."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from peftkit.errors import ConfigError
from peftkit.ui.workspace import Workspace

BASE_NAME = "base"  # the engine's name for the base model
ADAPTER_NAME = "tuned"  # and for the adapter on it
SIDES = ("base", "tuned")
Turn = dict[str, str]


class ChatEngines:
    """The serve engine of the chosen base and adapter (started on first use, replaced when the
    choice changes, stopped with `close`)."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.key: tuple[str, str] | None = None
        self.service: Any = None
        self.lock = threading.Lock()

    def service_for(self, model: str, adapter: str | None) -> Any:
        """The running service holding `model` with the adapter of run `adapter` loaded."""
        from peftkit.serve.server import ServeOptions, build
        from peftkit.ui.playground import _task_of

        if not adapter:
            raise ConfigError("Choose an adapter (a finished run of the workspace).")
        with self.lock:
            if self.key == (model, adapter):
                return self.service
            folder = self.workspace.adapters().get(adapter)
            if folder is None:
                raise ConfigError(f"No finished run with an adapter named {adapter!r}.")
            _task_of({adapter: folder})  # one that generates text, or refused by name
            self._stop()
            service = build(ServeOptions(model=self.workspace.model(model), served_name=BASE_NAME))
            try:
                service.adapters.load(ADAPTER_NAME, folder).result()
            except Exception:
                service.engine.stop()
                raise
            self.key, self.service = (model, adapter), service
            return service

    def _stop(self) -> None:
        """Stop the engine held (if any)."""
        if self.service is not None:
            self.service.engine.stop()
        self.key, self.service = None, None

    def close(self) -> None:
        """Stop the engine's thread."""
        with self.lock:
            self._stop()


def chat_stream(
    service: Any,
    conversations: dict[str, list[Turn]],
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int | None = None,
) -> Iterator[dict[str, str]]:
    """Send each side's conversation (ending with the user's turn) to the engine together; yield
    both answers so far after each piece of text, until both are done. An error ends its side
    with the error's text."""
    from pydantic import ValidationError

    from peftkit.serve.handling import prepare
    from peftkit.serve.protocol import ChatRequest
    from peftkit.serve.rows import Row

    events: queue.Queue = queue.Queue()
    rows = []
    deadline = time.monotonic() + service.engine.limits.timeout
    for side in SIDES:
        model = BASE_NAME if side == "base" else f"{BASE_NAME}:{ADAPTER_NAME}"
        try:
            request = ChatRequest(
                model=model, messages=conversations[side], temperature=temperature,
                top_p=top_p, max_tokens=int(max_tokens), seed=seed,
            )  # fmt: skip
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise ConfigError(f"{where}: {problem['msg']}") from None
        prepared = prepare(service, request)

        def emit(kind: str, payload: Any, side: str = side) -> None:
            events.put((side, kind, payload))

        rows.append(Row(prepared.prompts[0], prepared.adapter, prepared.sampling, emit, deadline))
    service.engine.submit(rows)
    texts, running = dict.fromkeys(SIDES, ""), set(SIDES)
    try:
        while running:
            side, kind, payload = events.get()
            if kind == "text":
                texts[side] += payload
            else:
                running.discard(side)
                if kind == "error":
                    texts[side] += f"\n[peftkit: error: {payload}]"
            yield dict(texts)
    finally:  # the page went away mid-answer: the engine drops the rows
        for row in rows:
            row.cancelled = True
