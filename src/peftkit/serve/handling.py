"""From a validated request to rows for the engine, and from the rows' events to an OpenAI
response or a stream of server-sent events.

Every check that can refuse a request runs before any row is queued, so a refused request costs
the engine nothing: the model field, the options, the prompt (tokenized here: text through the
tokenizer as `peftkit generate` does, chat messages through the chat template as
tasks/chat.py renders them, token ids as given), its length against the context, max_tokens
against the server's limit."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from peftkit.decoding.prompts import to_token_ids
from peftkit.errors import ConfigError
from peftkit.serve.adapters import AdapterSet
from peftkit.serve.engine import Engine
from peftkit.serve.errors import ServeError
from peftkit.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    Decoding,
    chat_logprobs,
    choice,
    completion_logprobs,
    envelope,
    new_id,
    refuse_unsupported,
    usage,
)
from peftkit.serve.rows import Row
from peftkit.serve.sampling import Sampling


@dataclass
class Service:
    """What the routes need: the engine, the adapters, the tokenizer and the limits."""

    engine: Engine
    adapters: AdapterSet
    tokenizer: Any
    vocab_size: int  # ids the model scores: token ids in prompts must be below it
    max_tokens: int  # the most tokens one request may ask for
    context: int  # prompt + completion tokens a row may hold
    default_tokens: int = 16  # max_tokens of a completion that names none (OpenAI's default)
    # One tokenisation at a time: fast tokenizers refuse concurrent use ("Already borrowed").
    tokenizing: threading.Lock = field(default_factory=threading.Lock)

    def prompts(self, request: CompletionRequest | ChatRequest) -> list[list[int]]:
        """The request's prompts as token ids (a completion may hold several)."""
        if isinstance(request, ChatRequest):
            turns = [message.as_turn() for message in request.messages]
            try:
                return [to_token_ids(self.tokenizer, turns, chat=True)]
            except Exception as error:  # noqa: BLE001 - a template that refuses these turns
                raise ServeError(
                    f"The chat template cannot render these messages: {error}", param="messages"
                ) from None
        prompt = request.prompt
        many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        prompts = list(prompt) if many else [prompt]
        try:
            rows = [to_token_ids(self.tokenizer, p, chat=False) for p in prompts]
        except ConfigError:  # an empty list of token ids
            rows = [[]]
        for ids in rows:
            if not ids:
                raise ServeError("A prompt is empty; give every prompt some text.", param="prompt")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ServeError(
                    f"Token ids must lie in [0, {self.vocab_size}).", param="prompt", code="bad_ids"
                )
        return rows

    def sampling(self, request: Decoding, prompts: list[list[int]]) -> Sampling:
        """The request's decoding settings, checked against the server's limits."""
        refuse_unsupported(request)
        if request.proxy_alpha is not None and self.engine.proxy is None:
            raise ServeError(
                "This server has no Proxy-Tuning pair: start it with --proxy-expert and "
                "--proxy-anti-expert (or --proxy-adapter) to use proxy_alpha.",
                param="proxy_alpha",
            )
        wanted = request.max_tokens
        if isinstance(request, ChatRequest):
            wanted = request.max_completion_tokens or wanted
        longest = max(len(p) for p in prompts)
        if wanted is None:  # OpenAI's 16 for completions; as many as fit for chat
            default = self.default_tokens if isinstance(request, CompletionRequest) else None
            wanted = max(
                1, min(default or self.max_tokens, self.max_tokens, self.context - longest)
            )
        if wanted > self.max_tokens:
            raise ServeError(
                f"max_tokens is {wanted}, above this server's limit of {self.max_tokens}.",
                param="max_tokens",
            )
        if longest + wanted > self.context:
            raise ServeError(
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {longest + wanted} tokens ({longest} in the prompt, {wanted} for the "
                "completion). Shorten the prompt or ask for fewer tokens.",
                param="messages" if isinstance(request, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        if isinstance(request, ChatRequest):
            logprobs, echo = (request.top_logprobs or 0) if request.logprobs else None, False
        else:
            logprobs, echo = request.logprobs, request.echo
        return Sampling(
            max_tokens=wanted,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop_strings(),
            ignore_eos=request.ignore_eos,
            proxy_alpha=request.proxy_alpha,
            logprobs=logprobs,
            echo=echo,
        )


@dataclass(frozen=True)
class Prepared:
    """What a request becomes before it is queued: its adapter, prompt ids and settings."""

    adapter: str | None
    prompts: list[list[int]]
    sampling: Sampling


def prepare(service: Service, request: CompletionRequest | ChatRequest) -> Prepared:
    """Every check and the tokenisation (run on a worker thread: a 1 MB prompt takes seconds)."""
    adapter = service.adapters.resolve(request.model)
    with service.tokenizing:
        prompts = service.prompts(request)
    return Prepared(adapter, prompts, service.sampling(request, prompts))


class Request:
    """One accepted request: its rows in the engine and the queue their events arrive on."""

    def __init__(
        self,
        service: Service,
        request: CompletionRequest | ChatRequest,
        prepared: Prepared | None = None,
    ) -> None:
        self.chat = isinstance(request, ChatRequest)
        self.model = request.model
        prepared = prepared or prepare(service, request)
        adapter, prompts, sampling = prepared.adapter, prepared.prompts, prepared.sampling
        self.stream = request.stream
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + service.engine.limits.timeout

        def outbox(index: int) -> Any:
            def emit(kind: str, payload: Any) -> None:
                loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, payload))

            return emit

        # n choices per prompt, in OpenAI's order; with a seed, choice j samples with seed + j.
        n = self.n = request.n
        self.rows = [
            Row(ids, adapter, choice_sampling(sampling, j), outbox(i * n + j), deadline)
            for i, ids in enumerate(prompts)
            for j in range(n)
        ]
        self.tokenizer = service.tokenizer
        given = request.prompt if isinstance(request, CompletionRequest) else None
        texts = given if isinstance(given, list) and given and isinstance(given[0], str) else None
        # What echo puts before each choice's text: the prompt as sent (ids: decoded).
        self.echoed = [
            (texts[i] if texts else given if isinstance(given, str) else self.decode(ids))
            if sampling.echo else ""
            for i, ids in enumerate(prompts)
            for _ in range(n)
        ]  # fmt: skip
        service.engine.submit(self.rows)

    def decode(self, ids: Any) -> str:
        """Token ids (or one id) as text."""
        return self.tokenizer.decode([ids] if isinstance(ids, int) else ids)

    def logprobs(self, index: int) -> dict[str, Any] | None:
        """Choice `index`'s logprobs in the endpoint's shape (None: not asked for)."""
        row = self.rows[index]
        if row.sampling.logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(self.decode, row.logprobs)
        return completion_logprobs(self.decode, [*row.prompt_logprobs, *row.logprobs])

    def cancel(self) -> None:
        """The client left (or the response is complete): the engine drops the rows."""
        for row in self.rows:
            row.cancelled = True

    def usage(self) -> dict[str, int]:
        """Token counts over the request's rows."""
        prompt = sum(len(row.prompt) for row in self.rows[:: self.n])  # each prompt once
        return usage(prompt, sum(row.generated for row in self.rows))

    async def response(self) -> dict[str, Any]:
        """Wait for every row; the whole response (or raise the first row's error)."""
        texts = [""] * len(self.rows)
        reasons: list[str | None] = [None] * len(self.rows)
        try:
            while any(reason is None for reason in reasons):
                index, kind, payload = await self.events.get()
                if kind == "error":
                    raise payload
                if kind == "text":
                    texts[index] += payload
                else:
                    reasons[index] = payload
        finally:
            self.cancel()
        body = envelope(self.chat, False, self.id, self.model, self.created)
        body["choices"] = [
            choice(
                self.chat, i, self.echoed[i] + text, reason, None if self.chat else False,
                self.logprobs(i),
            )
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ]  # fmt: skip
        body["usage"] = self.usage()
        return body

    def chunk(self, index: int, text: str | None, finish: str | None, first: bool) -> str:
        """One server-sent event carrying a piece of one choice."""
        body = envelope(self.chat, True, self.id, self.model, self.created)
        body["choices"] = [choice(self.chat, index, text, finish, first if self.chat else False)]
        return sse(body)

    async def event_stream(self) -> AsyncIterator[str]:
        """The response as server-sent events, ending with [DONE] (or an error event)."""
        try:
            if self.chat:
                for index in range(len(self.rows)):
                    yield self.chunk(index, None, None, first=True)
            open_rows = len(self.rows)
            while open_rows:
                index, kind, payload = await self.events.get()
                if kind == "error":
                    yield sse(payload.body())
                    return
                if kind == "text":
                    yield self.chunk(index, payload, None, first=False)
                else:
                    yield self.chunk(index, None, payload, first=False)
                    open_rows -= 1
            if self.include_usage:
                body = envelope(self.chat, True, self.id, self.model, self.created)
                yield sse({**body, "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()


def choice_sampling(sampling: Sampling, j: int) -> Sampling:
    """The settings of a prompt's choice j (n > 1): its own seed, seed + j, when one is given."""
    if j == 0 or sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed + j) % 2**64)


def sse(body: dict[str, Any]) -> str:
    """One server-sent event holding a JSON body."""
    return f"data: {json.dumps(body)}\n\n"
