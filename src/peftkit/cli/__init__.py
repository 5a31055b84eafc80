"""The `peftkit` command line: one module per group of commands, each adding its subcommands.
Heavy libraries are imported inside each command, so `--help` is instant (no torch import on that
path)."""

from __future__ import annotations

import argparse
import sys

from peftkit.cli import applications, combine, export, generation, memory, serve, training, ui

# The order `peftkit --help` lists them in.
GROUPS = (training, combine, applications, export, generation, serve, memory, ui)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning: every method, one command line, measured.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the command, turn peftkit errors into one clear line."""
    args = build_parser().parse_args(argv)
    applications.register_apps()  # their data sets, for any command that reads a recipe
    import warnings

    # transformers' own deprecation notices about its internals say nothing to a peftkit user.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (train says what it kept)
        print("\npeftkit: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - only peftkit's own errors are reported briefly
        from peftkit.errors import PeftkitError

        if isinstance(error, PeftkitError):
            print(f"peftkit: error: {error}", file=sys.stderr)
            return 2
        raise
