"""Shared set-up of the server tests: tiny LoRA adapters that really differ, plain HTTP calls,
and a way to hold the engine so that requests sent one after another are admitted together."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import peftkit
from peftkit.models import load_model

MODEL = "tiny-llama"


def make_adapter(
    folder: Path, seed: int, rank: int, targets: list[str] | None = None, task: str = "causal-lm"
) -> str:
    """A LoRA adapter on tiny-llama with random non-zero B (as after training): it changes text.
    `task` is what its peftkit.json says it was tuned for."""
    base, _ = load_model(MODEL, "causal-lm")
    torch.manual_seed(seed)
    config = peftkit.LoraConfig(rank=rank, dropout=0.0, target_modules=targets)
    model = peftkit.apply(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return str(peftkit.save(model, folder, info={"base_model": MODEL, "task": task}))


def client(url: str) -> Any:
    """The real OpenAI client, pointed at a test server (no retries: every status is seen)."""
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, JSON body) of one HTTP call; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def is_openai_error(body: Any) -> bool:
    """Whether a body is OpenAI's {"error": {message, type, param, code}}."""
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and set(error) == {"message", "type", "param", "code"}
        and bool(error["message"])
    )


@contextlib.contextmanager
def engine_held(engine: Any, waiting: int, timeout: float = 60.0) -> Iterator[None]:
    """Block the engine's loop until `waiting` rows are queued (so they are admitted together)."""
    release = threading.Event()
    engine.call(release.wait)
    try:
        yield
        deadline = time.monotonic() + timeout
        while len(engine.waiting) < waiting and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        release.set()
