"""Continuous batching: one thread decodes every running request together, one token per step,
whatever adapter each uses; requests join and leave the batch between steps.

Each turn of the loop: run queued commands (adapter loads and unloads: the model is only ever
touched by this thread), fail rows whose time is up and drop those whose client left, admit
waiting rows up to the batch limit (their prompts run together, left-padded, each row through
its own adapter, in chunks of at most max_prefill_tokens tokens, one chunk a turn; once done
their caches join the batch's: kv.py), then run one decode step:
the last token of every row in one forward (row i through its adapter, with its own attention
mask and position), one sample per row with that request's settings (sampling.py), and finished
rows leave. A request therefore never waits for another to finish, only for a free row.

torch releases the GIL inside its kernels, so the HTTP event loop keeps answering while a step
runs."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.decoding.generate import stop_token_ids
from peftkit.decoding.prompts import left_padded, pad_id
from peftkit.decoding.stream import accepts_logits_to_keep, model_device, positions_from_mask
from peftkit.serve import kv
from peftkit.serve.errors import ServeError
from peftkit.serve.proxy_rows import ProxyPair, ProxyRow
from peftkit.serve.rows import Row
from peftkit.serve.sampling import TextStream, logprob_entries, next_token


@dataclass(frozen=True)
class Limits:
    """How much the server takes on at once."""

    max_batch: int = 16  # rows decoded together
    max_queue: int = 64  # rows waiting for a place in the batch; more: 429
    timeout: float = 300.0  # seconds a request may take from arrival to its last token
    max_prefill_tokens: int = 512  # prompt tokens (padding included) run per turn; the rest wait


@dataclass
class Stats:
    """What the loop has done (for tests, the benchmark and /health)."""

    steps: int = 0  # decode steps
    prefills: int = 0  # admissions (rows whose prompts finished together)
    prefill_chunks: int = 0  # prompt forwards (an admission takes one or more)
    tokens: int = 0  # tokens sampled
    peak_rows: int = 0  # most rows in one decode step
    mixed_steps: int = 0  # decode steps whose rows used two or more adapters (or base + one)


@dataclass
class Prefill:
    """Rows admitted together whose prompts run in chunks, one chunk a turn, between the running
    batch's decode steps (chunked prefill, as vLLM and SGLang do): a long prompt delays each
    running stream by one chunk's forward a step, not by its whole prompt."""

    rows: list[Row]
    input_ids: torch.Tensor  # (rows, length), left-padded
    mask: torch.Tensor
    positions: torch.Tensor
    done: int = 0  # columns already run
    cache: Any = None


@dataclass
class Command:
    """Work for the loop thread; it runs once `ready()` holds (an unload waits for its rows)."""

    run: Callable[[], Any]
    future: Future = field(default_factory=Future)
    ready: Callable[[], bool] = lambda: True


class Engine:
    """The scheduler: rows in, text events out; it owns the model."""

    def __init__(
        self, model: Any, tokenizer: Any, limits: Limits, proxy: ProxyPair | None = None
    ) -> None:
        self.model, self.tokenizer, self.limits, self.proxy = model, tokenizer, limits, proxy
        self.row_adapters: Any = None  # the adapters' method record (RowAdapters), once loaded
        self.adapters: set[str] = set()  # the adapters loaded on the model
        self.device = model_device(model)
        self.stops = stop_token_ids(model, tokenizer, None)
        self.pad = pad_id(tokenizer)
        self.prefill_options = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        self.stats = Stats()
        self.waiting: deque[Row] = deque()
        self.commands: list[Command] = []
        self.wake = threading.Condition()
        self.rows: list[Row] = []  # the running batch, in cache order
        self.prefill: Prefill | None = None  # rows whose prompts are part-way through
        self.cache: Any = None
        self.mask = self.positions = self.tokens = torch.empty(0)
        self.thread: threading.Thread | None = None
        self.stopping = False

    # --- called from other threads -------------------------------------------------------
    def submit(self, rows: list[Row]) -> None:
        """Queue a request's rows; 429 when the queue cannot take them all now, 400 when it
        never could (more prompts in one request than --max-queue)."""
        if len(rows) > self.limits.max_queue:
            raise ServeError(
                f"This request holds {len(rows)} prompts, more than this server queues at once "
                f"({self.limits.max_queue}, --max-queue): it can never be taken. Send at most "
                f"{self.limits.max_queue} prompts per request.",
                param="prompt",
                code="too_many_prompts",
            )
        with self.wake:
            if len(self.waiting) + len(rows) > self.limits.max_queue:
                raise ServeError(
                    f"The server's queue is full ({self.limits.max_queue} waiting); retry later.",
                    status=429,
                    code="queue_full",
                )
            self.waiting.extend(rows)
            self.wake.notify()

    def call(self, run: Callable[[], Any], ready: Callable[[], bool] = lambda: True) -> Future:
        """Run `run` on the loop thread between steps, once `ready()`; its result's future."""
        command = Command(run, ready=ready)
        with self.wake:
            self.commands.append(command)
            self.wake.notify()
        return command.future

    def uses(self, adapter: str) -> bool:
        """Whether a waiting or running row asks for `adapter`."""
        with self.wake:
            waiting = list(self.waiting)
        prefilling = self.prefill.rows if self.prefill else []
        return any(row.adapter == adapter for row in [*waiting, *prefilling, *self.rows])

    def start(self) -> None:
        """Start the loop thread."""
        self.thread = threading.Thread(target=self._loop, name="peftkit-serve-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the loop thread (rows still running get no further tokens)."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    # --- the loop thread ------------------------------------------------------------------
    def _loop(self) -> None:
        """Wait for work; run commands, then one turn of admission and decoding."""
        while True:
            with self.wake:
                while not (
                    self.stopping or self.waiting or self.rows or self.prefill or self._runnable()
                ):
                    self.wake.wait()
                if self.stopping:
                    return
            self.run_commands()
            try:
                self.run_once()
            except Exception as error:  # noqa: BLE001 - one failed step must not stop the server
                self._fail_running(error)

    def _runnable(self) -> bool:
        """Whether a queued command can run now."""
        return any(command.ready() for command in self.commands)

    def run_commands(self) -> None:
        """Run every queued command whose condition holds, each settling its future."""
        with self.wake:
            due = [command for command in self.commands if command.ready()]
            self.commands = [command for command in self.commands if command not in due]
        for command in due:
            try:
                command.future.set_result(command.run())
            except Exception as error:  # noqa: BLE001 - handed to the caller through the future
                command.future.set_exception(error)

    def run_once(self) -> None:
        """One turn: expire and drop rows, admit waiting ones, one decode step."""
        now = time.monotonic()
        with self.wake:
            self.waiting = deque(row for row in self.waiting if not row.expire(now))
        for row in [*(self.prefill.rows if self.prefill else []), *self.rows]:
            row.expire(now)
        self._retire()
        self._admit()
        if self.rows:
            self._step()

    def _forward(self, rows: list[Row], **inputs: Any) -> Any:
        """One forward of the model in which each row goes through its own adapter."""
        with torch.no_grad():
            if self.row_adapters is None:
                return self.model(**inputs)
            return self.row_adapters.forward(self.model, [row.adapter for row in rows], **inputs)

    def _admit(self) -> None:
        """Take waiting rows (as many as the batch has room for) into a prefill, run its next
        chunk of at most max_prefill_tokens tokens, and join the rows to the batch once their
        prompts are done."""
        if self.prefill is None:
            self.prefill = self._start_prefill()
        if self.prefill is not None:
            self._prefill_chunk(self.prefill)

    def _start_prefill(self) -> Prefill | None:
        """A prefill of the waiting rows that fit (None: no row to admit)."""
        with self.wake:
            room = min(self.limits.max_batch - len(self.rows), len(self.waiting))
            new = [self.waiting.popleft() for _ in range(room)]
        for row in new:
            if row.adapter is not None and row.adapter not in self.adapters:
                row.fail(
                    ServeError(f"Adapter '{row.adapter}' was unloaded.", 404, "model_not_found")
                )
        new = [row for row in new if not row.finished]
        if not new:
            return None
        try:
            inputs = left_padded([row.prompt for row in new], self.pad, self.device)
        except Exception as error:  # noqa: BLE001 - these rows fail; the running batch is intact
            for row in new:
                row.fail(failure(error))
            return None
        mask = inputs["attention_mask"]
        return Prefill(new, inputs["input_ids"], mask, positions_from_mask(mask))

    def _prefill_chunk(self, prefill: Prefill) -> None:
        """Run the prefill's next chunk; after the last, sample each row's first token and join
        the rows to the running batch."""
        new, length = prefill.rows, prefill.input_ids.shape[1]
        if all(row.finished or row.cancelled for row in new):  # all failed, timed out or left
            self.prefill = None
            return
        end = min(length, prefill.done + max(1, self.limits.max_prefill_tokens // len(new)))
        cache = {} if prefill.cache is None else {"cache": prefill.cache}
        echo = [row.sampling.echo and row.sampling.logprobs is not None for row in new]
        try:
            output = self._forward(
                new, input_ids=prefill.input_ids[:, prefill.done : end],
                attention_mask=prefill.mask[:, :end],
                position_ids=prefill.positions[:, prefill.done : end], use_cache=True,
                **cache, **({} if any(echo) else self.prefill_options),
            )  # fmt: skip
            kv.growing(output.cache)
            logits = output.logits[:, -1].float()
            if any(echo):
                self._prompt_logprobs(prefill, output.logits, end, echo)
        except Exception as error:  # noqa: BLE001 - these rows fail; the running batch is intact
            for row in new:
                row.fail(failure(error))
            self.prefill = None
            return
        prefill.cache, prefill.done = output.cache, end
        self.stats.prefill_chunks += 1
        if end < length:
            return
        self.prefill = None
        for row in new:
            row.text = TextStream(self.tokenizer, row.sampling.stop)
            row.generator = row.sampling.generator(self.device)
        tokens = self._choose(new, logits, first=True)
        self.stats.prefills += 1
        self._take(new, tokens)
        # a row that ends at its first token (max_tokens 1, a stop token; lm-eval's scoring
        # requests) never joins: joining pads every running row's cache to the new rows' length
        live = [i for i, row in enumerate(new) if not (row.finished or row.cancelled)]
        if not live:
            return
        cache, mask, positions = output.cache, prefill.mask, prefill.positions[:, -1] + 1
        if len(live) < len(new):
            index = torch.tensor(live, device=self.device)
            cache, mask = kv.keep_rows(cache, mask, index)
            positions = positions.index_select(0, index)
        if self.rows:
            self.cache, self.mask = kv.join(self.cache, self.mask, cache, mask)
            self.positions = torch.cat([self.positions, positions])
        else:
            self.cache, self.mask, self.positions = cache, mask, positions
        self.rows += [new[i] for i in live]

    def _step(self) -> None:
        """One decode step of every running row."""
        rows = self.rows
        mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        tokens = torch.tensor([row.last_token for row in rows], device=self.device)
        output = self._forward(
            rows,
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.cache, self.mask = output.cache, mask
        self.positions = self.positions + 1
        chosen = self._choose(rows, output.logits[:, -1].float(), first=False)
        self.stats.steps += 1
        self.stats.peak_rows = max(self.stats.peak_rows, len(rows))
        self.stats.mixed_steps += len({row.adapter for row in rows}) > 1
        self._take(rows, chosen)

    def _prompt_logprobs(
        self, prefill: Prefill, logits: torch.Tensor, end: int, echo: list[bool]
    ) -> None:
        """Log-probs of the prompt tokens this chunk predicts, for the rows that echo them (the
        logits at column j score the token at column j + 1; a prompt's first token has none)."""
        start, length = prefill.done, prefill.input_ids.shape[1]
        for index, row in enumerate(prefill.rows):
            if not echo[index]:
                continue
            first = length - len(row.prompt)  # left padding before it
            if start <= first < end:
                row.prompt_logprobs.append((row.prompt[0], None, []))
            low, high = max(start, first), min(end, length - 1)
            if low < high:
                targets = prefill.input_ids[index, low + 1 : high + 1]
                row.prompt_logprobs += logprob_entries(
                    logits[index, low - start : high - start], targets, row.sampling.logprobs
                )

    def _choose(self, rows: list[Row], logits: torch.Tensor, first: bool) -> list[int | None]:
        """Each row's next token from its logits (Proxy-Tuning applied); a row whose own part
        fails (its sampler, its expert) fails alone with a 500 and gets None; the others go on."""
        tokens: list[int | None] = []
        for index, row in enumerate(rows):
            try:
                row_logits = logits[index]
                if first and row.sampling.proxy_alpha is not None:
                    row.proxy = ProxyRow(self.proxy, row.prompt, row.sampling.proxy_alpha)
                    row_logits = row.proxy.first(row_logits)
                elif row.proxy is not None:
                    row_logits = row.proxy.next(row_logits, row.last_token)
                token = next_token(row_logits, row.sampling, row.generator)
                if row.sampling.logprobs is not None:
                    row.logprobs += logprob_entries(
                        row_logits[None], torch.tensor([token]), row.sampling.logprobs
                    )
                tokens.append(token)
            except Exception as error:  # noqa: BLE001 - this row fails; the batch goes on
                row.fail(failure(error))
                tokens.append(None)
        return tokens

    def _take(self, rows: list[Row], tokens: list[int | None]) -> None:
        """Give each row its token (None: the row failed choosing it), then let the finished
        rows leave."""
        for row, token in zip(rows, tokens, strict=True):
            if token is None or row.finished:
                continue
            try:
                row.take(token, self.stops)
            except Exception as error:  # noqa: BLE001 - e.g. its text cannot be decoded
                row.fail(failure(error))
        self.stats.tokens += sum(token is not None for token in tokens)
        self._retire()

    def _retire(self) -> None:
        """Drop finished, failed and cancelled rows from the batch (cache, mask, positions)."""
        keep = [i for i, row in enumerate(self.rows) if not (row.finished or row.cancelled)]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache = [], None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache, self.mask = kv.keep_rows(self.cache, self.mask, index)
        self.positions = self.positions.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]

    def _fail_running(self, error: Exception) -> None:
        """A step failed: its rows fail (500), the batch starts afresh; the server goes on."""
        for row in self.rows:
            row.fail(failure(error))
        self.rows, self.cache = [], None


def failure(error: Exception) -> ServeError:
    """A ServeError as is; anything else as a 500 naming it."""
    if isinstance(error, ServeError):
        return error
    return ServeError(
        f"The server failed while decoding: {type(error).__name__}: {str(error)[:300]}",
        status=500,
        code="decoding_failed",
    )
