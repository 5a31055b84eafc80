"""`peftkit serve`: a base model and its adapters behind the OpenAI API (docs/serve.md)."""

from __future__ import annotations

import argparse
from typing import Any

from peftkit.cli.common import add_proxy_flags


def named_folders(pairs: list[str] | None) -> dict[str, str]:
    """NAME=PATH pairs (--adapter) as a dict; an error for a pair without '=' or a repeated name."""
    from peftkit.errors import ConfigError

    named: dict[str, str] = {}
    for pair in pairs or []:
        name, equals, path = pair.partition("=")
        if not (equals and name and path):
            raise ConfigError(
                f"--adapter takes NAME=PATH (e.g. reviews=runs/reviews), got '{pair}'."
            )
        if name in named:
            raise ConfigError(f"--adapter names '{name}' twice; give each adapter its own name.")
        named[name] = path
    return named


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a base model and its adapters over the OpenAI API until interrupted."""
    from peftkit.cli.common import check_positive

    check_positive("--threads", args.threads)
    adapters = named_folders(args.adapter)  # refused before the model loads
    import torch

    from peftkit.serve.server import ServeOptions, serve

    options = ServeOptions(  # checks the numbers and the Proxy-Tuning flags, before any load
        model=args.model, served_name=args.served_model_name,
        adapters=adapters, adapter_dir=args.adapter_dir,
        host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
        max_tokens=args.max_tokens, max_model_len=args.max_model_len, timeout=args.timeout,
        max_prefill_tokens=args.max_prefill_tokens,
        max_body_bytes=args.max_body_bytes, proxy_expert=args.proxy_expert,
        proxy_expert_adapter=args.expert_adapter, proxy_anti_expert=args.proxy_anti_expert,
        proxy_adapter=args.proxy_adapter, device=args.device,
    )  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    serve(options)
    return 0


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""

    serve = commands.add_parser(
        "serve", help="serve a model and its adapters over the OpenAI API (docs/serve.md)"
    )
    serve.add_argument("--model", required=True, help="base model: bundled name or folder")
    serve.add_argument(
        "--served-model-name", help="the name requests use for the base (default: --model)"
    )
    serve.add_argument(
        "--adapter", action="append", metavar="NAME=PATH",
        help="an adapter (or run) folder served as model BASE:NAME (repeatable)",
    )  # fmt: skip
    serve.add_argument(
        "--adapter-dir",
        help="allow loading adapters at run time (POST /v1/adapters) from folders inside this one",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for the batch; more get 429"
    )
    serve.add_argument("--max-tokens", type=int, default=512, help="most tokens one request gets")
    serve.add_argument(
        "--max-model-len", type=int, help="prompt + completion tokens (default: the model's)"
    )
    serve.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take (then 504)"
    )
    serve.add_argument(
        "--max-prefill-tokens", type=int, default=512,
        help="prompt tokens run per step between decode steps (chunked prefill; lower: smoother "
        "streams while long prompts arrive, higher: faster prompts)",
    )  # fmt: skip
    serve.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, help="largest request body (then 413)"
    )
    add_proxy_flags(serve)
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    serve.set_defaults(handler=cmd_serve)
