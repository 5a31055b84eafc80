"""A run folder (a recipe's output_dir) and what may happen to an earlier run in it.

A run writes `adapter/`, `recipe.yaml` and `summary.json` when it finishes, and `checkpoints/`
(and `logs/`) while it trains. A new run never silently replaces an earlier one: training into a
folder that holds one is refused unless it continues that run (`--resume`) or asks to replace it
(`--overwrite`). Replacing is safe: the earlier run is moved, whole, to `<folder>.previous` and
deleted only once the new run has finished, so a new run that fails loses nothing.

Light on purpose (no torch): `peftkit train` and `peftkit compare` ask here before anything heavy
loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from peftkit.errors import ConfigError

FINISHED_MARKS = ("summary.json", "adapter")  # what a finished run leaves
CHECKPOINTS = "checkpoints"
PREVIOUS_SUFFIX = ".previous"
# Everything peftkit writes into a run folder (eval and app-eval add their reports later);
# --overwrite moves these and leaves any other file of the folder where it is.
RUN_ENTRIES = ("adapter", "summary.json", "recipe.yaml", CHECKPOINTS, "logs", "eval.json")
REPORTS = "app_eval_*.json"
PREVIOUS_MARK = "PEFTKIT_PREVIOUS_RUN.txt"  # in a folder --overwrite made (only those are deleted)


def earlier_run(folder: str | Path) -> str | None:
    """What the folder holds: 'a finished run', 'an unfinished run' (checkpoints only), or None."""
    folder = Path(folder)
    if any((folder / mark).exists() for mark in FINISHED_MARKS):
        return "a finished run"
    checkpoints = folder / CHECKPOINTS
    if checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*")):
        return "an unfinished run"
    return None


def previous_folder(folder: str | Path) -> Path:
    """Where --overwrite keeps the earlier run until the new one finishes."""
    folder = Path(folder)
    return folder.with_name(folder.name + PREVIOUS_SUFFIX)


def check_output_dir(folder: str | Path, resume: object = None, overwrite: bool = False) -> None:
    """Refuse to start a run in a folder that holds an earlier one, unless it is resumed or
    overwritten; says which way out fits. Touches nothing."""
    folder = Path(folder)
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in the output folder and --overwrite replaces it: "
            "choose one."
        )
    held = earlier_run(folder)
    if resume:
        return
    previous = previous_folder(folder)
    if held is not None and not overwrite:
        resume_hint = (
            " To continue it from its newest checkpoint instead, pass --resume."
            if held == "an unfinished run"
            else ""
        )
        raise ConfigError(
            f"{folder} already holds {held}, which this run would replace. Train into a new "
            f"folder (--output-dir), or pass --overwrite to replace it (the earlier run is kept "
            f"in {previous} until the new one finishes).{resume_hint}"
        )
    if overwrite and previous.exists():
        if not (previous / PREVIOUS_MARK).is_file():
            raise ConfigError(
                f"--overwrite keeps the earlier run in {previous} until the new one finishes, "
                f"but {previous} already exists and is not one peftkit made. Move it first."
            )
        if held == "a finished run":
            raise ConfigError(
                f"{previous} still holds a run an earlier --overwrite replaced, and {folder} "
                f"holds a finished run too; --overwrite would drop one of them. Move or delete "
                f"{previous} first."
            )


def run_entries(folder: Path) -> list[Path]:
    """The files and folders of the run in `folder` (not whatever else the folder holds)."""
    named = [folder / name for name in RUN_ENTRIES if (folder / name).exists()]
    return named + sorted(folder.glob(REPORTS))


def set_aside_earlier_run(folder: str | Path) -> Path | None:
    """For --overwrite (after check_output_dir): move the folder's earlier run to
    <folder>.previous and return that, or None when there is none. A previous folder left by an
    overwrite that did not finish still holds the last finished run: it is kept (and returned),
    and what that unfinished attempt left in the folder is removed."""
    folder = Path(folder)
    previous = previous_folder(folder)
    if previous.exists():
        for entry in run_entries(folder):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return previous
    if earlier_run(folder) is None:
        return None
    staging = folder.with_name(f".{folder.name}.previous-{os.getpid()}")
    staging.mkdir()
    (staging / PREVIOUS_MARK).write_text(
        f"peftkit train --overwrite moved the earlier run of {folder} here; it is deleted when "
        "the new run finishes.\n"
    )
    for entry in run_entries(folder):
        os.replace(entry, staging / entry.name)
    # Renames only (nothing copied or deleted); <folder>.previous appears once it holds it all.
    os.replace(staging, previous)
    return previous


def discard_previous(previous: Path | None) -> None:
    """The new run has finished: the earlier run it replaces can go."""
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def refuse_unfinished_run(folder: str | Path) -> None:
    """Refuse to use a run that stopped before it finished (checkpoints, no adapter) as a
    finished one, saying how to continue it."""
    folder = Path(folder)
    if (folder / "adapter").is_dir() or earlier_run(folder) != "an unfinished run":
        return
    recipes = [folder / name for name in ("ui-recipe.yaml", "recipe.yaml")]
    recipe = next((str(path) for path in recipes if path.is_file()), "RECIPE")
    raise ConfigError(
        f"{folder} holds an unfinished run (checkpoints, no adapter yet): it stopped before "
        f"the end. Continue it with `peftkit train {recipe} --resume` (or Resume on the Runs "
        "page of peftkit ui); it can be evaluated once it has finished."
    )
