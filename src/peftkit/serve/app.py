"""The HTTP face of the server: an ASGI app (FastAPI) speaking the OpenAI API.

FastAPI on uvicorn is what vLLM's and SGLang's OpenAI servers run on: pydantic request models
(strict types, the schema at /docs), streaming responses for server-sent events, and a small,
well-kept stack. Every refusal is an OpenAI error body with a 4xx status: malformed JSON and wrong
types (400, from the request models), unknown models and adapters (404), a body over the size
limit (413), a full queue (429). Errors the server causes are 5xx; none of them stops it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from peftkit.serve import handling
from peftkit.serve.errors import ServeError, error_body
from peftkit.serve.protocol import AdapterRequest, ChatRequest, CompletionRequest, model_card


class BodyLimit:
    """ASGI middleware: read the request body, refusing it with a 413 past `limit` bytes."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await self.refuse(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self.refuse(send)
                return
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect, for streams

        await self.app(scope, replay, send)

    async def refuse(self, send: Any) -> None:
        """A 413 with an OpenAI error body."""
        message = f"The request body is larger than this server's limit of {self.limit} bytes."
        payload = json.dumps(error_body(message, "invalid_request_error", None, "body_too_large"))
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload.encode()})


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """A readable message and the offending field for pydantic's first complaint."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON: " + first.get("msg", ""), None
    field = location[0] if location else None
    where = ".".join(location) or "body"
    return f"Invalid request: {where}: {first.get('msg')}", field


def build_app(service: handling.Service, max_body_bytes: int) -> FastAPI:
    """The FastAPI app over a running Service."""
    app = FastAPI(title="peftkit serve", docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, field = validation_message(error)
        body = error_body(message, "invalid_request_error", field, "invalid_value")
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        body = error_body(str(error.detail), "invalid_request_error", None, None)
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> JSONResponse:
        message = f"The server failed: {type(error).__name__}: {str(error)[:300]}"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **vars(service.engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        ids, tasks = service.adapters.model_ids(), service.adapters.tasks
        cards = [model_card(ids[0], None)] + [
            model_card(i, ids[0], tasks.get(i.partition(":")[2])) for i in ids[1:]
        ]
        return {"object": "list", "data": cards}

    async def answer(request: CompletionRequest | ChatRequest, http: Request) -> Any:
        # Tokenising runs on a worker thread: the event loop keeps answering (health checks,
        # other streams) while a long prompt is tokenised.
        prepared = await asyncio.to_thread(handling.prepare, service, request)
        accepted = handling.Request(service, request, prepared)
        if accepted.stream:
            return StreamingResponse(accepted.event_stream(), media_type="text/event-stream")
        return await unless_disconnected(accepted, http)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request) -> Any:
        return await answer(request, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request) -> Any:
        return await answer(request, http)

    @app.post("/v1/adapters")
    async def load_adapter(request: AdapterRequest) -> dict[str, Any]:
        folder = service.adapters.confined(request.path)
        await settled(service.adapters.load(request.name, folder))
        return model_card(
            f"{service.adapters.base_name}:{request.name}",
            service.adapters.base_name,
            service.adapters.tasks.get(request.name),
        )

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await settled(service.adapters.unload(name))
        model = f"{service.adapters.base_name}:{name}"
        return {"id": model, "object": "model", "deleted": True}

    return app


async def unless_disconnected(accepted: handling.Request, http: Request) -> Any:
    """The whole response; if the client leaves first, its rows are cancelled (the engine drops
    them before their next step) and nothing is sent. A client that times out and retries would
    otherwise leave each try decoding to its end."""
    work = asyncio.ensure_future(accepted.response())
    gone = asyncio.ensure_future(disconnected(http))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()  # response() cancels the rows as it unwinds
        accepted.cancel()
        return Response(status_code=499)  # nginx's "client closed request"; no one reads it
    return work.result()


async def disconnected(http: Request) -> None:
    """Return once the client has closed its connection."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def settled(future: Any) -> Any:
    """Await an engine command; its failure as a 400 naming the cause."""
    try:
        return await asyncio.wrap_future(future)
    except ServeError:
        raise
    except Exception as error:  # noqa: BLE001 - an adapter that does not load is the request's fault
        raise ServeError(f"{type(error).__name__}: {error}", param="path") from None
