"""The OpenAI API's request and response shapes, as far as the server speaks them.

Requests are pydantic models in strict mode: a number where text belongs, "5" for max_tokens, 1
for a boolean, NaN or infinity are all refused with a 400 naming the field. Fields the server
does not know are ignored (clients send `user` and the like); options it knows but does not
implement (best_of > 1, penalties, tools...) are refused by `refuse_unsupported` rather
than silently dropped. Two extensions, as vLLM spells them where it has them: `ignore_eos` and
`proxy_alpha` (Proxy-Tuning strength; the expert and anti-expert are named when the server
starts). With the openai client they go in `extra_body`."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftkit.serve.errors import ServeError

MAX_STOP_CHARS = 1000  # characters of one stop string


class Strict(BaseModel):
    """Strict types, finite numbers, unknown fields ignored; `null` for an optional field means
    its default (as OpenAI takes it); text must be valid Unicode (no lone surrogates)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def null_is_the_default(cls, data: Any) -> Any:
        """Drop explicit nulls of fields that have a default (a required field stays refused)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()}  # fmt: skip

    @field_validator("*", mode="after")
    @classmethod
    def valid_unicode(cls, value: Any) -> Any:
        """Refuse text holding a lone surrogate (JSON's "\\ud800"): it has no UTF-8 form."""
        if lone_surrogate(value):
            raise ValueError("text holds a lone surrogate (an unpaired \\ud800-\\udfff escape)")
        return value


def lone_surrogate(value: Any) -> bool:
    """Whether a string (or one inside lists and dicts) cannot be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list | tuple):
        return any(lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(lone_surrogate(k) or lone_surrogate(v) for k, v in value.items())
    return False


class StreamOptions(Strict):
    """stream_options: whether the last event carries the token counts."""

    include_usage: bool = False


class Decoding(Strict):
    """The options shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch's generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)  # choices per prompt
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    proxy_alpha: float | None = None

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple (at most 4 non-empty strings, as OpenAI allows, each at most
        MAX_STOP_CHARS characters)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise ServeError(
                f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters.",
                param="stop",
            )
        return tuple(stop)


class CompletionRequest(Decoding):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False  # the prompt's text (and with logprobs its tokens' log-probs) first
    logprobs: int | None = Field(default=None, ge=0, le=20)  # top alternatives per token
    best_of: int | None = None
    suffix: str | None = None


class TextPart(Strict):
    """A text part of a message's content (image parts are not served)."""

    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    """One turn of a conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_turn(self) -> dict[str, str]:
        """{"role", "content"} with text parts joined (a developer turn is a system turn)."""
        content = self.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(Decoding):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class AdapterRequest(Strict):
    """POST /v1/adapters: load the adapter folder `path` (under the adapter directory) as `name`."""

    name: str
    path: str


def refuse_unsupported(request: Decoding) -> None:
    """A 400 for any option the server knows but does not implement."""
    checks: list[tuple[str, bool, str]] = [
        ("presence_penalty", request.presence_penalty == 0, "no presence penalty"),
        ("frequency_penalty", request.frequency_penalty == 0, "no frequency penalty"),
        ("logit_bias", not request.logit_bias, "no logit_bias"),
    ]
    if isinstance(request, CompletionRequest):
        checks += [
            ("echo", not (request.echo and request.stream), "echo without streaming"),
            (
                "logprobs",
                request.logprobs is None or not request.stream,
                "logprobs without streaming",
            ),
            ("best_of", request.best_of in (None, 1), "best_of=1"),
            ("suffix", request.suffix is None, "no suffix"),
        ]
    if isinstance(request, ChatRequest):
        text = request.response_format in (None, {"type": "text"})
        checks += [
            (
                "logprobs",
                not (request.logprobs and request.stream),
                "logprobs without streaming",
            ),
            (
                "top_logprobs",
                request.top_logprobs is None or request.logprobs,
                "top_logprobs with logprobs: true",
            ),
            ("tools", not request.tools and request.tool_choice in (None, "none"), "no tools"),
            ("response_format", text, "plain text responses"),
        ]
    for param, fine, what in checks:
        if not fine:
            raise ServeError(f"'{param}' is not supported: this server serves {what}.", param=param)


def new_id(prefix: str) -> str:
    """A response id such as cmpl-3f2a..."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's token counts."""
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": total}  # fmt: skip


def choice(
    chat: bool,
    index: int,
    text: str | None,
    finish: str | None,
    first: bool | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice: a completion's text, a chat message (first=None), or a streamed chat delta
    (the first delta of a choice carries the role)."""
    if not chat:
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    if first is None:  # a whole message
        message = {"role": "assistant", "content": text or ""}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
    delta: dict[str, str] = {"role": "assistant", "content": text or ""} if first else {}
    if text and not first:
        delta["content"] = text
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def envelope(chat: bool, stream: bool, rid: str, model: str, created: int) -> dict[str, Any]:
    """The fields every response or chunk starts with."""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model}


def model_card(model_id: str, parent: str | None, task: str | None = None) -> dict[str, Any]:
    """One entry of GET /v1/models; an adapter's card names the task it was tuned for (a chat
    adapter's prompts go through /v1/chat/completions, as `peftkit generate` renders them)."""
    card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "peftkit",
            "parent": parent}  # fmt: skip
    if parent is not None:
        card["task"] = task
    return card


def completion_logprobs(decode: Any, entries: list[Any], offset: int = 0) -> dict[str, Any]:
    """A completion choice's `logprobs`: tokens, token_logprobs, top_logprobs and text_offset
    (a prompt's first token has None; the chosen token is always among the top, as in vLLM)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token, logprob, others in entries:
        text = decode(token)
        tokens.append(text)
        token_logprobs.append(logprob)
        offsets.append(offset)
        offset += len(text)
        if logprob is None:
            top_logprobs.append(None)
            continue
        alternatives: dict[str, float] = {}
        for other, value in others:  # best first: tokens of the same text keep the best value
            alternatives.setdefault(decode(other), value)
        alternatives.setdefault(text, logprob)
        top_logprobs.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}  # fmt: skip


def chat_logprobs(decode: Any, entries: list[Any]) -> dict[str, Any]:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = decode(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in others]}
        for token, logprob, others in entries
    ]}  # fmt: skip
