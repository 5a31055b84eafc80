"""The UI's workspace: one folder (default `runs/`) that holds everything the UI reads or writes.

A web page is an open door: every path it sends (a run name, a model folder, an uploaded file) is
resolved here and refused unless it stays inside the workspace, symbolic links followed. Uploads
are copied in with a size limit and read by the CLI's own readers, so they fail with the CLI's
messages. Light on purpose (no torch, no gradio): the tests and the CLI use it directly."""

from __future__ import annotations

import filecmp
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.io import atomic_file
from peftkit.run_folder import CHECKPOINTS, earlier_run

UPLOADS = "uploads"  # where uploaded data files are kept
UI_FILES = ".ui"  # the UI's own scratch (Gradio's upload cache)
RECIPE_NAME = "ui-recipe.yaml"  # the recipe the Train page wrote for a run (what Resume reruns)
LOG_NAME = "ui-train.log"  # the training process's output, beside its run
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class WorkspaceError(PeftkitError, ValueError):
    """A path from the page leaves the workspace, or a name or upload is not acceptable."""


@dataclass(frozen=True)
class RunInfo:
    """A run folder of the workspace and what it holds."""

    name: str
    path: Path
    state: str  # "finished" or "unfinished" (checkpoints only)
    summary: dict[str, Any]


class Workspace:
    """The one folder the UI reads and writes."""

    def __init__(self, root: str | Path, max_upload_bytes: int = 100 * 2**20) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes

    def resolve(self, path: str | Path) -> Path:
        """`path` (relative to the workspace, or absolute) as an absolute path inside it; a path
        that leaves it (`..`, an absolute path elsewhere, a link pointing out) is refused."""
        text = str(path).strip()
        if not text:
            raise WorkspaceError("Give a path inside the workspace; this one is empty.")
        candidate = Path(text)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = candidate.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise WorkspaceError(
                f"{text} is outside the workspace {self.root}: the UI reads and writes only "
                "there. Copy what you need into it, or start `peftkit ui --workspace` on a "
                "folder that holds it."
            )
        return resolved

    def run_folder(self, name: str, what: str = "Run name") -> Path:
        """The folder for a new run called `name` (a plain folder name inside the workspace);
        `what` names the field in the message (a comparison's results folder)."""
        name = name.strip()
        if not NAME_PATTERN.match(name):
            raise WorkspaceError(
                f"{what} {name!r} must be a plain folder name: letters, digits, '.', '_' or "
                "'-', starting with a letter or digit (at most 100 characters)."
            )
        return self.resolve(name)

    def model(self, name: str) -> str:
        """A model for the page: a bundled name as it is, else a folder inside the workspace."""
        from peftkit.models import bundled_names

        name = name.strip()
        if name in bundled_names():
            return name
        folder = self.resolve(name)
        if not folder.is_dir():
            raise WorkspaceError(
                f"Model {name!r} is neither a bundled model ({', '.join(bundled_names())}) nor a "
                f"folder in the workspace {self.root}."
            )
        return str(folder)

    def save_upload(self, source: str | Path, name: str | None = None) -> Path:
        """Copy an uploaded file into the workspace's uploads folder, refusing one that is too
        large or not a data file peftkit reads; returns the copy. An earlier upload of the same
        name and other contents is kept: the new one is named `<stem>-<hash>.<suffix>`."""
        from peftkit.data.files import SUFFIXES

        source = Path(source)
        name = Path(name or source.name).name
        if Path(name).suffix.lower() not in SUFFIXES:
            raise WorkspaceError(
                f"Cannot read {name}: upload one of {', '.join(SUFFIXES)} (the formats `peftkit "
                "train` reads)."
            )
        size = source.stat().st_size
        if size > self.max_upload_bytes:
            raise WorkspaceError(
                f"{name} is {size / 2**20:.1f} MiB; uploads are limited to "
                f"{self.max_upload_bytes / 2**20:.0f} MiB (peftkit ui --max-upload-mib). Put a "
                "larger file into the workspace folder and choose it by name."
            )
        target = self.resolve(Path(UPLOADS) / name)
        if target.exists() and not filecmp.cmp(source, target, shallow=False):
            # Another file of this name was uploaded before: it stays (a run may read it), and
            # this one gets its own name, from its contents.
            digest = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
            target = self.resolve(Path(UPLOADS) / f"{Path(name).stem}-{digest}{Path(name).suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as staging:  # a new file: never rewrites one a run already read
            shutil.copyfile(source, staging)
        return target

    def runs(self) -> list[RunInfo]:
        """The run folders of the workspace (finished or holding checkpoints), newest first."""
        found = []
        for folder in self._folders():
            state = earlier_run(folder)
            if state is None:
                continue
            summary_path = folder / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
            finished = "finished" if state == "a finished run" else "unfinished"
            found.append(RunInfo(folder.relative_to(self.root).as_posix(), folder, finished,
                                 summary))  # fmt: skip
        return found

    def adapters(self) -> dict[str, Path]:
        """Finished runs' adapter folders, by run name (for the Playground)."""
        return {run.name: run.path / "adapter" for run in self.runs()
                if (run.path / "adapter").is_dir()}  # fmt: skip

    def compare_results(self) -> list[str]:
        """Folders holding a comparison's compare.json, relative to the workspace."""
        return [f.relative_to(self.root).as_posix() for f in self._folders()
                if (f / "compare.json").is_file()]  # fmt: skip

    def plans(self, bundled: Path | None = None) -> dict[str, Path]:
        """Compare plans: YAML files with `methods` in the workspace (and its plans/ folder),
        then those of the project's recipes/ folder (read only), by the name the page shows."""
        found: dict[str, Path] = {}
        for path in sorted([*self.root.glob("*.yaml"), *self.root.glob("plans/*.yaml")]):
            if _looks_like_plan(path):
                found[path.relative_to(self.root).as_posix()] = path
        for path in sorted(bundled.glob("compare-*.yaml")) if bundled and bundled.is_dir() else []:
            found[f"{bundled.name}/{path.name} (bundled)"] = path.resolve()
        return found

    def _folders(self) -> list[Path]:
        """Folders one or two levels down (a comparison's runs sit inside its folder), newest
        first; the UI's own and hidden folders left out."""
        candidates = [p for p in self.root.glob("*") if p.is_dir()]
        candidates += [p for p in self.root.glob("*/*") if p.is_dir()]
        kept = [p for p in candidates
                if not any(part.startswith(".") or part in (UPLOADS, CHECKPOINTS, "logs")
                           for part in p.relative_to(self.root).parts)]  # fmt: skip
        return sorted(kept, key=lambda p: p.stat().st_mtime, reverse=True)


def _looks_like_plan(path: Path) -> bool:
    """Whether a YAML file is a compare plan (a mapping with recipe and methods)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "methods" in data and "recipe" in data
