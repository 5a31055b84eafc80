"""The `peftkit ui` web app: five pages (Train, Compare, Runs, Playground, Chat) on one workspace
folder, served by Gradio on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError
from peftkit.ui.jobs import children_stopped_on_exit
from peftkit.ui.workspace import UI_FILES, Workspace

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PAGES = ("train", "compare", "runs", "playground", "chat")


def build_app(workspace: Workspace, plans_folder: Path | None = None) -> Any:
    """The Gradio Blocks app of the five pages over `workspace`."""
    import gradio as gr

    from peftkit.ui import chat_page, compare_page, playground_page, runs_page, train_page
    from peftkit.ui.jobs import JOBS, JobSlots

    # One set of jobs per workspace, on the server: every page and tab attaches to them, and a
    # UI started again on the workspace finds the children an earlier one left running.
    slots = JobSlots(workspace.root / UI_FILES / JOBS)
    with gr.Blocks(title="peftkit") as app:
        gr.Markdown(f"## peftkit · workspace `{workspace.root}`")
        # Each page reads its lists of the workspace when shown: on load, and when its tab is
        # chosen (a run finished since appears without a Refresh).
        with gr.Tab("Train", elem_id="tab-train") as tab:
            train_page.build(workspace, slots, [app.load, tab.select])
        with gr.Tab("Compare", elem_id="tab-compare") as tab:
            compare_page.build(workspace, slots, plans_folder, [app.load, tab.select])
        with gr.Tab("Runs", elem_id="tab-runs") as tab:
            runs_page.build(workspace, slots, [app.load, tab.select])
        with gr.Tab("Playground", elem_id="tab-playground") as tab:
            playground_page.build(workspace, [app.load, tab.select])
        with gr.Tab("Chat", elem_id="tab-chat") as tab:
            chat_page.build(workspace, [app.load, tab.select])
    app.peftkit_slots = slots  # so the server stops the children it started when it ends
    return app


def prepare_environment(workspace: Workspace) -> None:
    """Settings Gradio reads at import: uploads land inside the workspace, nothing phones home."""
    os.environ["GRADIO_TEMP_DIR"] = str(workspace.root / UI_FILES / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def host_warning(host: str, port: int, root: Path, login: bool = False) -> str | None:
    """What to tell someone serving the UI beyond this machine (None for a local address)."""
    if host in LOCAL_HOSTS:
        return None
    who = "whoever logs in" if login else "anyone who can reach this machine on port " + str(port)
    tail = "" if login else "; the UI has no login (--no-login)"
    return (f"peftkit ui: warning: serving on {host}: {who} can start training and read and "
            f"write in {root}{tail}. Use the default 127.0.0.1 unless you mean it.")  # fmt: skip


def login_for(host: str, auth: str | None, no_login: bool = False) -> tuple[str, str] | None:
    """The (user, password) the page asks for, from `USER:PASSWORD` (--auth or the
    PEFTKIT_UI_AUTH variable); a non-local address without one is refused unless `no_login`."""
    if auth:
        user, _, password = auth.partition(":")
        if not user.strip() or not password:
            raise ConfigError(
                "A login is USER:PASSWORD, both non-empty (--auth or PEFTKIT_UI_AUTH)."
            )
        return user.strip(), password
    if host in LOCAL_HOSTS or no_login:
        return None
    raise ConfigError(
        f"peftkit ui on {host} would let anyone who reaches the port train and read and write "
        f"the workspace. Give a login: set PEFTKIT_UI_AUTH=USER:PASSWORD (or --auth "
        f"USER:PASSWORD, which other users of this machine can see in its process list), or "
        f"pass --no-login if every machine that can reach it may use it."
    )


def launch(
    workspace: str | Path = "runs",
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mib: int = 100,
    plans_folder: str | Path | None = "recipes",
    auth: tuple[str, str] | None = None,
) -> None:
    """Serve the UI until interrupted (Ctrl-C or SIGTERM), with a login page when `auth` is
    given; a host other than the local one gets a warning."""
    space = Workspace(workspace, max_upload_bytes=max_upload_mib * 2**20)
    prepare_environment(space)
    warning = host_warning(host, port, space.root, login=auth is not None)
    if warning:
        print(warning, file=sys.stderr)
    app = build_app(space, Path(plans_folder) if plans_folder else None)
    print(f"peftkit ui: workspace {space.root}; open http://{host}:{port}/", flush=True)
    # Ctrl-C or SIGTERM ends the server, and its children with it (no training left orphaned).
    with children_stopped_on_exit(app.peftkit_slots):
        app.queue().launch(
            server_name=host, server_port=port, max_file_size=space.max_upload_bytes,
            quiet=True, footer_links=[], allowed_paths=[str(space.root)], auth=auth,
            auth_message="peftkit ui: log in with the user and password it was started with.",
        )  # fmt: skip
