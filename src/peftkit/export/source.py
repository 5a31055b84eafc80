"""What to export: a run or adapter folder (merged on the fly through peftkit.load and
peftkit.merge), a folder holding a merged model, or a bundled or hub model name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import peftkit.api as api
from peftkit.errors import ExportError, PeftkitError
from peftkit.io import CONFIG_NAME
from peftkit.models import load_model


@dataclass
class ExportSource:
    """A plain transformers model ready to write, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: Any
    name: str  # general.name in the file
    description: str


def adapter_folder(path: Path) -> Path | None:
    """The adapter folder of a run folder or of an adapter folder; None for anything else."""
    for folder in (path / "adapter", path):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


def merge_adapter(adapter_dir: Path, base_model: str | None = None) -> ExportSource:
    """Load an adapter onto its base model and fold it in; refuse a method that cannot merge."""
    info = api.read_info(adapter_dir)
    base = base_model or info.get("base_model")
    if not base:
        raise ExportError(f"{adapter_dir} does not name its base model: pass --model.")
    labels = info.get("labels") or []
    # The base as the adapter was trained on it: a QLoRA adapter folds into dequant(NF4 W).
    model, tokenizer = load_model(
        base, info.get("task", "causal-lm"), num_labels=len(labels) or None,
        dtype=info.get("base_dtype", "fp32"), quantize=info.get("quantize"),
    )  # fmt: skip
    tuned = api.load(model, adapter_dir)
    try:
        merged = api.merge(tuned)
    except PeftkitError as error:
        raise ExportError(f"{adapter_dir} cannot become one GGUF model: {error}") from error
    except Exception as error:  # noqa: BLE001 - a method's merge failing is reported, not hidden
        raise ExportError(
            f"Folding the adapter in {adapter_dir} into its base failed "
            f"({type(error).__name__}: {error}); the adapter itself is unchanged. Export it "
            "with a base it was trained on (--model), or save a merged model with peftkit merge."
        ) from error
    run_name = adapter_dir.parent.name if adapter_dir.name == "adapter" else adapter_dir.name
    return ExportSource(
        merged.eval(), tokenizer, run_name, f"{base} + adapter {adapter_dir}, merged"
    )


def load_source(source: str, base_model: str | None = None) -> ExportSource:
    """The model to export from a run/adapter folder, a model folder, or a model name."""
    folder = adapter_folder(Path(source))
    if folder is not None:
        return merge_adapter(folder, base_model)
    if base_model:
        raise ExportError(
            f"--model names the base of an adapter, but {source} is not an adapter or run "
            "folder (no adapter_config.json)."
        )
    model, tokenizer = load_model(source, "causal-lm")
    name = Path(source).name if Path(source).is_dir() else source
    return ExportSource(model.eval(), tokenizer, name, f"model {source}")
