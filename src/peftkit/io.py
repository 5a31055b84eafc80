"""Everything peftkit writes, written atomically and with the modes the user's umask asks for;
adapter folders on disk (adapter_config.json + adapter_model.safetensors).

A file or folder is built under a temporary name beside its destination and renamed into place,
so a reader (or a crash) never sees it half-written. The temporary name comes from mkstemp or
mkdtemp, which create it readable by its owner only (0600 / 0700); before the rename it gets the
mode an ordinary open() or mkdir() would have given it (0644 / 0755 under umask 022), so an
adapter or a GGUF file can be read by another user or container as the user's umask allows."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.errors import AdapterError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFTKIT_INFO_NAME = "peftkit.json"


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way, set and at once restored
    os.umask(mask)
    return mask


def give_umask_modes(path: str | Path) -> None:
    """Give a file, or a folder and everything in it, the modes open() and mkdir() would have
    given them: 0666 (0777 for a folder or an executable) less the umask. mkstemp and mkdtemp
    leave 0600 and 0700, and some writers choose their own (safetensors writes 0600)."""
    mask = umask()
    root = Path(path)
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for entry in entries:
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & stat.S_IXUSR
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


def replace_folder(staging: Path, final: Path, keep_extra: bool = True) -> None:
    """Put a complete folder in place of `final` by renames: a reader sees the old folder or the
    new one, never a mix. With keep_extra, files of the old folder the new one lacks are carried
    over (a README, a tokenizer saved beside an adapter). What the new folder holds gets the
    umask's modes first (give_umask_modes): a Trainer checkpoint is published this way too."""
    give_umask_modes(staging)
    if final.exists():
        for extra in final.iterdir() if keep_extra else ():
            if not (staging / extra.name).exists():
                os.replace(extra, staging / extra.name)
        retired = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Write a folder so a crash never leaves it half-written: the block fills a staging folder
    beside it, which then replaces it (replace_folder); on an error nothing is touched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Write a file so a crash never leaves it half-written: the block writes the yielded
    temporary path beside it (same suffix, so writers that read the format from it work), which
    then replaces it by a rename; on an error nothing is touched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        give_umask_modes(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file and a rename: never half-written."""
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomically(path: str | Path, data: Any, **options: Any) -> Path:
    """Write data as indented JSON (json.dumps options such as default=str pass through) with a
    final newline, atomically."""
    return write_text_atomically(path, json.dumps(data, indent=2, **options) + "\n")


def write_folder_atomically(folder: str | Path, files: dict[str, Any]) -> Path:
    """Write a folder of files atomically (atomic_folder). `files` maps names to a dict of
    tensors (safetensors) or JSON-serialisable data."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as staging:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in content.items()}
                save_file(tensors, str(staging / name), metadata={"format": "pt"})
            else:
                (staging / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return Path(folder)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, with an error naming the file when it is missing or malformed."""
    if not path.is_file():
        raise AdapterError(f"No {what} at {path}: is this an adapter folder written by save()?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path} is not valid JSON ({error}); the folder is damaged.") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def read_tensors(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The adapter tensors: safetensors always; a pickle .bin file only when explicitly allowed."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise AdapterError(f"{path} is truncated or corrupted ({error}).") from None
    pickled = folder / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{folder} holds only a pickle file ({PICKLE_WEIGHTS_NAME}), which can run code "
                "when loaded. Pass allow_pickle=True only if you trust its source."
            )
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise AdapterError(f"No {WEIGHTS_NAME} in {folder}: is this an adapter folder?")
