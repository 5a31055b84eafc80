"""`peftkit ui`: the local web page to estimate, train, compare and try adapters."""

from __future__ import annotations

import argparse
import os
from typing import Any

AUTH_VARIABLE = "PEFTKIT_UI_AUTH"  # USER:PASSWORD, the login the page asks for


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the web UI on a workspace folder until interrupted."""
    import importlib.util

    from peftkit.errors import ConfigError

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("peftkit ui needs Gradio: pip install 'peftkit[ui]' (make install does).")
    from peftkit.ui.app import launch, login_for

    auth = login_for(args.host, args.auth or os.environ.get(AUTH_VARIABLE), args.no_login)
    launch(args.workspace, args.host, args.port, args.max_upload_mib, auth=auth)
    return 0


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""
    ui = commands.add_parser("ui", help="a local web page to estimate, train, compare and try")
    ui.add_argument("--workspace", default="runs", help="the one folder it reads and writes")
    ui.add_argument(
        "--host", default="127.0.0.1",
        help="address to serve on; another than a local one needs a login or --no-login",
    )  # fmt: skip
    ui.add_argument(
        "--auth", metavar="USER:PASSWORD",
        help=f"ask for this login (better: set {AUTH_VARIABLE}, which ps does not show)",
    )  # fmt: skip
    ui.add_argument(
        "--no-login", action="store_true",
        help="serve on a non-local --host without a login (anyone reaching the port may use it)",
    )  # fmt: skip
    ui.add_argument("--port", type=int, default=7860, help="port to serve on")
    ui.add_argument("--max-upload-mib", type=int, default=100, help="largest data file upload")
    ui.set_defaults(handler=cmd_ui)
