"""Adapter folders on disk: adapter_config.json + adapter_model.safetensors, written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkit.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFTKIT_INFO_NAME = "peftkit.json"


def replace_folder(staging: Path, final: Path, keep_extra: bool = True) -> None:
    """Put a complete folder in place of `final` by renames: a reader sees the old folder or the
    new one, never a mix. With keep_extra, files of the old folder the new one lacks are carried
    over (a README, a tokenizer saved beside an adapter)."""
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


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path


def write_folder_atomically(folder: str | Path, files: dict[str, Any]) -> Path:
    """Write a folder of files atomically (atomic_folder). `files` maps names to a dict of
    tensors (safetensors) or JSON-serialisable data."""
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
