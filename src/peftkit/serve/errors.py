"""The server's errors: an HTTP status and OpenAI's error body, which clients already parse.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

4xx: the request was wrong (or the server is full: 429) and nothing else is affected; 5xx: the
server failed the request (a timeout, 504; a failure while decoding, 500)."""

from __future__ import annotations

from typing import Any

from peftkit.errors import PeftkitError


class ServeError(PeftkitError):
    """A request the server refuses or fails, with its status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param
        self.kind = kind or default_kind(status)

    def body(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return error_body(self.message, self.kind, self.param, self.code)


def default_kind(status: int) -> str:
    """OpenAI's error type for a status."""
    if status == 429:
        return "rate_limit_error"
    if status == 504:
        return "timeout_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """{"error": {message, type, param, code}}; text that has no UTF-8 form (a lone surrogate
    echoed from a request) is escaped, so the body can always be sent."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def unknown_model(name: str, known: list[str]) -> ServeError:
    """404 for a model field naming no served model or adapter."""
    return ServeError(
        f"The model '{name}' does not exist here. Served models: {', '.join(known)} (the base, "
        "or base:adapter for a loaded adapter; GET /v1/models lists them).",
        status=404,
        code="model_not_found",
        param="model",
    )
