"""Helpers the commands share: recipe overrides from flags, count checks, run folders."""

from __future__ import annotations

import argparse


def overrides(args: argparse.Namespace) -> list[str]:
    """--set pairs plus the convenience flags, as override strings."""
    overrides = list(args.set or [])
    if getattr(args, "model", None):
        overrides.append(f"model={args.model}")
    if getattr(args, "method", None):
        overrides.append(f"method.name={args.method}")
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return overrides


def check_positive(flag: str, value: int | None) -> None:
    """Refuse a count below 1 given on the command line (None: the flag was not given)."""
    from peftkit.errors import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value}.")


def add_proxy_flags(parser: argparse.ArgumentParser) -> None:
    """The Proxy-Tuning flags `generate` and `serve` share (checked by check_proxy_flags)."""
    parser.add_argument("--proxy-expert", help="Proxy-Tuning: the tuned small model")
    parser.add_argument("--expert-adapter", help="Proxy-Tuning: an adapter on the expert")
    parser.add_argument("--proxy-anti-expert", help="Proxy-Tuning: the untuned small model")
    parser.add_argument(
        "--proxy-adapter",
        help="Proxy-Tuning with one set of weights: expert = --model + this adapter, "
        "anti-expert = the same model with it disabled",
    )
