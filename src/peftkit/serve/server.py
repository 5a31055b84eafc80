"""Starting the server: load the base (and the Proxy-Tuning pair), start the engine, load the
adapters named at start, and run the app on uvicorn: in the foreground (`peftkit serve`), or on
a thread of this process with `running(...)` (tests, benchmarks, notebooks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.decoding.proxy_options import check_proxy_flags
from peftkit.errors import ConfigError, PeftkitError
from peftkit.serve.engine import Engine, Limits
from peftkit.serve.handling import Service
from peftkit.serve.proxy_rows import ProxyPair


@dataclass(frozen=True)
class ServeOptions:
    """Everything `peftkit serve` takes (the CLI's flags, one to one)."""

    model: str
    served_name: str | None = None  # the name requests use for the base (default: model)
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter or run folder
    adapter_dir: str | None = None  # run-time loads must lie inside it (None: no run-time loads)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_queue: int = 64
    max_tokens: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    timeout: float = 300.0
    max_prefill_tokens: int = 512  # prompt tokens run per engine turn (chunked prefill)
    max_body_bytes: int = 1_000_000
    proxy_expert: str | None = None
    proxy_expert_adapter: str | None = None
    proxy_anti_expert: str | None = None
    proxy_adapter: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        positive = {"max_batch": self.max_batch, "max_queue": self.max_queue,
                    "max_tokens": self.max_tokens, "timeout": self.timeout,
                    "max_body_bytes": self.max_body_bytes,
                    "max_prefill_tokens": self.max_prefill_tokens}  # fmt: skip
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be above 0, got {value}.")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be at least 2, got {self.max_model_len}.")
        check_proxy_flags(
            self.proxy_expert, self.proxy_anti_expert, self.proxy_adapter,
            self.proxy_expert_adapter,
        )  # fmt: skip


def load_proxy(options: ServeOptions, device: Any) -> ProxyPair | None:
    """The expert and anti-expert named at start (None: Proxy-Tuning is off)."""
    import peftkit.api as api
    from peftkit.decoding.proxy import WithoutAdapter
    from peftkit.models import load_model
    from peftkit.serve.adapters import adapter_folder

    if options.proxy_adapter:  # one set of weights: the adapter on, then off
        expert = api.load(
            load_model(options.model, "causal-lm")[0], adapter_folder(Path(options.proxy_adapter))
        )
        return ProxyPair(expert.eval().to(device), WithoutAdapter(expert))
    if not options.proxy_expert:
        return None
    expert = load_model(options.proxy_expert, "causal-lm")[0]
    if options.proxy_expert_adapter:
        expert = api.load(expert, adapter_folder(Path(options.proxy_expert_adapter)))
    anti_expert = load_model(options.proxy_anti_expert, "causal-lm")[0]
    return ProxyPair(expert.eval().to(device), anti_expert.eval().to(device))


def build(options: ServeOptions) -> Service:
    """Load everything and start the engine; the Service the app serves."""
    from peftkit.decoding.proxy_options import output_vocab_size
    from peftkit.models import load_model
    from peftkit.serve.adapters import AdapterSet
    from peftkit.serve.errors import ServeError

    model, tokenizer = load_model(options.model, "causal-lm")
    model = model.eval().to(options.device)
    proxy = load_proxy(options, options.device)
    if proxy is not None:
        proxy.check(model, tokenizer)
    limits = Limits(
        options.max_batch, options.max_queue, options.timeout, options.max_prefill_tokens
    )
    engine = Engine(model, tokenizer, limits, proxy)
    engine.start()
    adapters = AdapterSet(engine, options.served_name or options.model, options.adapter_dir)
    try:
        for name, folder in options.adapters.items():
            adapters.load(name, folder).result()
    except (ServeError, PeftkitError) as error:  # the adapter's fault: said as a flag's error
        engine.stop()
        raise ConfigError(f"--adapter {name}={folder}: {error}") from None
    except Exception:
        engine.stop()
        raise
    context = options.max_model_len or getattr(model.config, "max_position_embeddings", 2048)
    return Service(
        engine, adapters, tokenizer, output_vocab_size(model), options.max_tokens, context
    )


def serve(options: ServeOptions) -> None:
    """Serve in the foreground until interrupted."""
    import uvicorn

    from peftkit.serve.app import build_app

    service = build(options)
    try:
        uvicorn.run(
            build_app(service, options.max_body_bytes), host=options.host, port=options.port
        )
    finally:
        service.engine.stop()


@dataclass(frozen=True)
class Running:
    """A server running on a thread of this process."""

    url: str  # the API's base URL, e.g. http://127.0.0.1:54321/v1
    service: Service


@contextlib.contextmanager
def running(options: ServeOptions, startup_seconds: float = 60.0) -> Iterator[Running]:
    """Serve on a thread (port 0: a free port) until the block ends; then shut down."""
    import uvicorn

    from peftkit.serve.app import build_app

    service = build(options)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    app = build_app(service, options.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((options.host, options.port))
        thread.start()
        waited = time.monotonic() + startup_seconds
        while not server.started:
            if not thread.is_alive() or time.monotonic() > waited:
                raise RuntimeError("The server did not start.")
            time.sleep(0.01)
        host, port = listener.getsockname()[:2]
        yield Running(f"http://{host}:{port}/v1", service)
    finally:
        server.should_exit = True
        if thread.is_alive():
            thread.join(timeout=30)
        service.engine.stop()
        listener.close()
