"""`peftkit ui`: the local web page to estimate, train, compare and try adapters."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the web UI on a workspace folder until interrupted."""
    import importlib.util

    from peftkit.errors import ConfigError

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("peftkit ui needs Gradio: pip install 'peftkit[ui]' (make install does).")
    from peftkit.ui.app import launch

    launch(args.workspace, args.host, args.port, args.max_upload_mib)
    return 0


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""
    ui = commands.add_parser("ui", help="a local web page to estimate, train, compare and try")
    ui.add_argument("--workspace", default="runs", help="the one folder it reads and writes")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (warns if not local)")
    ui.add_argument("--port", type=int, default=7860, help="port to serve on")
    ui.add_argument("--max-upload-mib", type=int, default=100, help="largest data file upload")
    ui.set_defaults(handler=cmd_ui)
