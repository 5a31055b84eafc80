"""The adapters a server holds: names, folders, loading and unloading while it runs.

A request's `model` is the base's name or `base:adapter`. Names are short and plain (letters,
digits, `_ . -`, starting with a letter or digit). Adapters named on the command line may live
anywhere; adapters loaded at run time (POST /v1/adapters) must resolve, symbolic links followed,
to a folder inside the directory given at start (no directory: run-time loading is off). The
model is only changed on the engine's thread, between steps; an unload first stops new requests
for the adapter, then waits until no queued or running row uses it."""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from peftkit import io, registry
from peftkit.api import read_info
from peftkit.errors import PeftkitError
from peftkit.serve.engine import Engine
from peftkit.serve.errors import ServeError, unknown_model

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_PATH = 1024  # characters of a run-time adapter path


def adapter_folder(path: Path) -> Path:
    """The adapter folder itself, given it or a training run's folder (which holds adapter/)."""
    return path / "adapter" if (path / "adapter" / io.CONFIG_NAME).is_file() else path


class AdapterSet:
    """Adapter names and folders; loads and unloads go through the engine's thread."""

    def __init__(self, engine: Engine, base_name: str, root: str | Path | None = None) -> None:
        self.engine, self.base_name = engine, base_name
        self.root = Path(root).resolve() if root is not None else None
        self.loaded: dict[str, Path] = {}
        self.tasks: dict[str, str | None] = {}  # the task each adapter was tuned for (peftkit.json)
        self.busy: set[str] = set()  # names being loaded or unloaded
        self.lock = threading.Lock()

    def model_ids(self) -> list[str]:
        """The base's name, then base:adapter for every adapter ready to serve."""
        with self.lock:
            names = [name for name in self.loaded if name not in self.busy]
        return [self.base_name, *(f"{self.base_name}:{name}" for name in names)]

    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` field asks for (None: the base); 404 if none."""
        if model == self.base_name:
            return None
        base, colon, name = model.partition(":")
        with self.lock:
            ready = name in self.loaded and name not in self.busy
        if colon and base == self.base_name and ready:
            return name
        raise unknown_model(model, self.model_ids())

    def confined(self, path: str) -> Path:
        """A run-time adapter path, resolved inside the adapter directory (else 400 / 403): the
        folder given, the adapter/ folder inside a run folder and every file in the adapter
        folder, each with its symbolic links followed."""
        if self.root is None:
            raise ServeError(
                "Loading adapters at run time is off: start the server with --adapter-dir DIR.",
                status=403,
                code="adapter_loading_disabled",
            )
        if "\x00" in path or len(path) > MAX_PATH:
            raise ServeError(
                f"The adapter path must be at most {MAX_PATH} characters without NUL bytes.",
                param="path",
                code="invalid_path",
            )
        folder = self.inside(adapter_folder(self.inside(self.root / path, path)), path)
        try:  # every file a load may read (config, weights, peftkit.json...) must stay inside too
            entries = list(folder.iterdir()) if folder.is_dir() else []
        except OSError as error:
            raise ServeError(
                f"The adapter folder cannot be read: {error}", param="path", code="invalid_path"
            ) from None
        for entry in entries:
            self.inside(entry, f"{path}/{entry.name}")
        return folder

    def inside(self, path: Path, given: str) -> Path:
        """`path` resolved, symbolic links followed, if it lies in the adapter directory."""
        try:
            resolved = path.resolve()
            resolved.exists()  # a name too long for the file system raises here
        except (OSError, RuntimeError, ValueError) as error:  # a link loop, a name too long...
            raise ServeError(
                f"The adapter path '{given[:200]}' cannot be resolved: "
                f"{type(error).__name__}: {str(error)[:200]}",
                param="path",
                code="invalid_path",
            ) from None
        if not resolved.is_relative_to(self.root):
            raise ServeError(
                f"The path '{given[:200]}' leads outside the adapter directory; give a folder "
                "inside it (relative to it).",
                param="path",
                code="path_outside_adapter_dir",
            )
        return resolved

    def load(self, name: str, folder: str | Path) -> Future:
        """Start loading the adapter in `folder` as `name`; the future settles when it serves."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ServeError(
                f"Invalid adapter name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit.",
                param="name",
                code="invalid_adapter_name",
            )
        folder = adapter_folder(Path(folder))
        record = self._record(folder)
        try:
            task = read_info(folder).get("task")
        except PeftkitError:  # an unreadable peftkit.json: the task is unknown, nothing worse
            task = None
        with self.lock:
            if name in self.loaded or name in self.busy:
                raise ServeError(f"An adapter named '{name}' is already loaded.", 409, "exists")
            self.busy.add(name)
        engine = self.engine

        def run() -> None:
            engine.model = record.add(engine.model, name, folder)
            engine.row_adapters = record
            engine.adapters.add(name)

        def settle(future: Future) -> None:
            with self.lock:
                self.busy.discard(name)
                if future.exception() is None:
                    self.loaded[name] = folder
                    self.tasks[name] = task

        future = engine.call(run)
        future.add_done_callback(settle)
        return future

    def unload(self, name: str) -> Future:
        """Stop serving `name` now; the future settles once it is removed from the model."""
        with self.lock:
            if name not in self.loaded or name in self.busy:
                raise ServeError(f"No adapter named '{name}' is loaded.", 404, "adapter_not_found")
            self.busy.add(name)
        engine = self.engine

        def run() -> None:
            engine.model = engine.row_adapters.remove(engine.model, name)
            engine.adapters.discard(name)

        def settle(future: Future) -> None:
            with self.lock:
                self.busy.discard(name)
                if future.exception() is None:
                    del self.loaded[name]
                    self.tasks.pop(name, None)

        future = engine.call(run, ready=lambda: not engine.uses(name))
        future.add_done_callback(settle)
        return future

    def _record(self, folder: Path) -> Any:
        """The row-adapter functions of the method that saved `folder` (one method per server)."""
        if not (folder / io.CONFIG_NAME).is_file():
            raise ServeError(
                f"{folder} holds no {io.CONFIG_NAME}: give an adapter folder or a run folder.",
                param="path",
                code="adapter_not_found",
            )
        try:
            method = registry.method_for_saved(
                io.read_json(folder / io.CONFIG_NAME, io.CONFIG_NAME)
            )
        except PeftkitError as error:
            raise ServeError(str(error), param="path", code="invalid_adapter") from None
        rows = method.row_adapters
        if rows is None:
            raise ServeError(
                f"Adapters of method '{method.name}' cannot be served several to a batch; merge "
                "it into its base (peftkit merge) and serve the merged model.",
                param="path",
                code="unsupported_method",
            )
        current = self.engine.row_adapters
        if current is not None and rows is not current and self.loaded:
            raise ServeError(
                f"The adapter in {folder} is of another kind than those already served; one "
                "server serves adapters of one method family.",
                param="path",
                code="unsupported_method",
            )
        return rows
