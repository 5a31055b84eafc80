"""A run folder (a recipe's output_dir) and what may happen to an earlier run in it.

A run writes `adapter/`, `recipe.yaml` and `summary.json` when it finishes, and `checkpoints/`
(and `logs/`) while it trains. A new run never silently replaces an earlier one: training into a
folder that holds one is refused unless it continues that run (`--resume`) or asks to replace it
(`--overwrite`). Replacing is safe: the earlier run is moved, whole, to `<folder>.previous` and
deleted only once the new run has finished, so a new run that fails loses nothing.

Each run records, in `peftkit-run.json`, the names it created in the folder (and `eval` and
`app-eval` add their reports there): `--overwrite` moves only those, so a file of the user's own
stays put even under a name a run would use (`logs/`, `eval.json`). A folder written before the
record existed falls back to the fixed list of names a run writes.

Light on purpose (no torch): `peftkit train` and `peftkit compare` ask here before anything heavy
loads."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peftkit.errors import ConfigError, OutputError
from peftkit.io import write_text_atomically

FINISHED_MARKS = ("summary.json", "adapter")  # what a finished run leaves
CHECKPOINTS = "checkpoints"
PREVIOUS_SUFFIX = ".previous"
# Everything peftkit writes into a run folder (eval and app-eval add their reports later);
# --overwrite moves these and leaves any other file of the folder where it is.
RUN_ENTRIES = ("adapter", "summary.json", "recipe.yaml", CHECKPOINTS, "logs", "eval.json")
REPORTS = "app_eval_*.json"
PREVIOUS_MARK = "PEFTKIT_PREVIOUS_RUN.txt"  # in a folder --overwrite made (only those are deleted)
MANIFEST = "peftkit-run.json"  # the names a run created in its folder (record_entries)
TRAINING_ENTRIES = ("adapter", "summary.json", "recipe.yaml", CHECKPOINTS, "logs")


def run_and_adapter(path: Path) -> tuple[Path, Path]:
    """(run folder, adapter folder) from either of the two."""
    if (path / "adapter").is_dir():
        return path, path / "adapter"
    return path.parent, path


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
    """Where --overwrite keeps the earlier run until the new one finishes: beside the folder, or
    for a symlinked folder beside its target, so that setting a run aside is renames within one
    file system (never EXDEV)."""
    folder = Path(folder)
    if folder.is_symlink():
        folder = folder.resolve()
    return folder.with_name(folder.name + PREVIOUS_SUFFIX)


def check_output_dir(folder: str | Path, resume: object = None, overwrite: bool = False) -> None:
    """Refuse to start a run in a folder that holds an earlier one, unless it is resumed or
    overwritten; says which way out fits. Touches nothing."""
    folder = Path(folder)
    check_writable_folder(folder)
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


def check_writable_folder(folder: str | Path, inputs: dict[str, str | Path] | None = None) -> None:
    """Refuse an output folder that is an existing file (`inputs` names files the run reads, such
    as the recipe and the data, to say which one it is), or where nothing can be written: a
    read-only folder or file system. Probes by creating and removing a temporary folder in the
    folder, or in its nearest existing parent; leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        which = next(
            (what for what, path in (inputs or {}).items()
             if path and Path(path).exists() and folder.samefile(path)),
            None,
        )  # fmt: skip
        named = f" (it is the {which})" if which else ""
        raise ConfigError(
            f"The output folder {folder} is an existing file{named}, not a folder: the run "
            "writes its adapter, recipe.yaml and summary.json into a folder. Give another "
            "output_dir (--output-dir)."
        )
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"The output folder {folder} cannot be made: {parent} is a file, not a folder."
        )
    try:
        probe = tempfile.mkdtemp(prefix=".peftkit-write-probe-", dir=parent)
    except OSError as error:
        raise ConfigError(
            f"Cannot write into the output folder {folder}: {parent} refuses new files "
            f"({error.strerror or error}). Give a folder you can write to (--output-dir)."
        ) from None
    os.rmdir(probe)


def recorded_entries(folder: str | Path) -> list[str] | None:
    """The names the run in `folder` recorded as its own, or None when it kept no record."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("entries", [])
    except (ValueError, AttributeError, OSError):
        return None  # a damaged record: treated as none (the fixed list of names applies)
    # Names only: a doctored record naming ../ or an absolute path moves nothing outside.
    return [n for n in names if isinstance(n, str) and n and Path(n).name == n and n != ".."]


def record_entries(folder: str | Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Claim for the run in `folder` those of `names` that do not exist yet (or that it already
    claimed), before it writes them; a name the user's own file holds is never claimed.
    Returns the run's whole record."""
    folder = Path(folder)
    recorded = recorded_entries(folder)
    if recorded is None:  # a run written before records were kept owns the fixed names
        recorded = [p.name for p in _fixed_entries(folder)] if earlier_run(folder) else []
    new = [n for n in names if n not in recorded and not (folder / n).exists()]
    if new or not (folder / MANIFEST).is_file():
        _write_record(folder, recorded + new)
    return recorded + new


def settle_entries(folder: str | Path) -> None:
    """The run has finished: keep in its record only the names it really wrote."""
    folder = Path(folder)
    recorded = recorded_entries(folder)
    if recorded is not None:
        _write_record(folder, [n for n in recorded if (folder / n).exists()])


def _write_record(folder: Path, names: list[str]) -> None:
    """Write the record of a run's own names (atomically: it decides what --overwrite moves)."""
    from peftkit.io import write_text_atomically

    text = json.dumps({"written_by": "peftkit", "entries": names}, indent=2) + "\n"
    write_text_atomically(folder / MANIFEST, text)


def run_entries(folder: Path) -> list[Path]:
    """The files and folders of the run in `folder` (not whatever else the folder holds): those
    its record names, with the record itself; without a record, the names a run writes."""
    recorded = recorded_entries(folder)
    if recorded is not None:
        return [folder / n for n in [*recorded, MANIFEST] if os.path.lexists(folder / n)]
    return _fixed_entries(folder)


def _fixed_entries(folder: Path) -> list[Path]:
    """What a run written before records were kept may have written: the fixed list of names."""
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
    staging = previous.with_name(f".{previous.name}-{os.getpid()}")
    moved: list[Path] = []
    try:
        staging.mkdir()
        write_text_atomically(
            staging / PREVIOUS_MARK,
            f"peftkit train --overwrite moved the earlier run of {folder} here; it is deleted "
            "when the new run finishes.\n",
        )
        for entry in run_entries(folder):
            os.replace(entry, staging / entry.name)
            moved.append(entry)
        # Renames only (nothing copied or deleted); <folder>.previous appears once it holds all.
        os.replace(staging, previous)
    except OSError as error:
        for entry in reversed(moved):  # put the earlier run back as it was
            os.replace(staging / entry.name, entry)
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(
            f"--overwrite could not set the earlier run in {folder} aside in {previous}: "
            f"{write_failure(error) or error}. Nothing was changed: the earlier run is where it "
            "was."
        ) from None
    return previous


def write_failure(error: BaseException) -> str | None:
    """The cause in words when `error` is a failed write (disk full, read-only file system,
    permission, another file system), from the OS error or the text torch and safetensors
    wrap it in; None for any other error."""
    import errno

    words = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission is denied",
        errno.EPERM: "permission is denied",
        errno.EXDEV: "the folders are on different file systems",
        errno.EIO: "the disk reported an input/output error",
    }
    code = getattr(error, "errno", None)
    if isinstance(error, OSError) and code in words:
        where = f": {error.filename}" if error.filename else ""
        return f"{words[code]} ({error.strerror or error}{where})"
    text = " ".join(str(error).split())
    markers = {
        "No space left on device": "the disk is full",
        "StorageFull": "the disk is full",
        "Disk quota exceeded": "the disk quota is used up",
        "Read-only file system": "the file system is read-only",
        "file write failed": "a file could not be written (is the disk full?)",
    }
    for marker, cause in markers.items():
        if marker in text:
            return f"{cause} ({text[:200]})"
    return None


def discard_previous(previous: Path | None) -> None:
    """The new run has finished: the earlier run it replaces can go."""
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def interrupted_message(folder: str | Path, command: str) -> str:
    """What an interrupted `peftkit train` kept in `folder` and how to go on: its newest
    complete checkpoint and the --resume command, or that no checkpoint was kept; and where an
    earlier run that --overwrite set aside is. `command` is the train command that ran,
    without --resume or --overwrite."""
    folder = Path(folder)
    steps = sorted(
        int(path.name.removeprefix("checkpoint-"))
        for path in (folder / CHECKPOINTS).glob("checkpoint-*")
        if path.is_dir() and path.name.removeprefix("checkpoint-").isdigit()
    )
    resume = f"{command} --resume"
    if steps:
        said = (
            f"Kept: the checkpoint of step {steps[-1]} in {folder / CHECKPOINTS} (checkpoints "
            f"are written whole or not at all). Continue from it with: {resume}"
        )
    else:
        said = (
            f"No checkpoint was written yet (every training.save_steps steps), so this run kept "
            f"nothing to continue from in {folder}; start it again to train."
        )
    previous = previous_folder(folder)
    if (previous / PREVIOUS_MARK).is_file():
        said += f" The earlier run that --overwrite replaces is kept, whole, in {previous}."
    return said


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
