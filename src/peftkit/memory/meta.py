"""The model a memory estimate is about, on the meta device: exact shapes, no memory.

A model is named by a transformers config, a config.json (or its folder), a bundled name or a
named size (Llama-2 shapes); it is built for a task type with that task's transformers class, and
a method (any registered one, with any of its options) is applied with `peftkit.apply`, so the
estimate sees the modules, parameters and hooks that training will run."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError

# Llama-2 shapes (Touvron et al., 2023, Table 1 and the released config.json files).
NAMED_SIZES: dict[str, dict[str, Any]] = {
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                  "num_attention_heads": 64, "num_key_value_heads": 8},
}  # fmt: skip
_LLAMA2_COMMON = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}


def resolve_config(model: Any) -> tuple[Any, str]:
    """A transformers config and a display name, from a config object, a config.json path (or its
    folder), a bundled model name or a named size such as "llama-7b"."""
    import transformers

    if isinstance(model, transformers.PretrainedConfig):
        return copy.deepcopy(model), getattr(model, "model_type", "model")
    name = str(model)
    if name in NAMED_SIZES:
        return transformers.LlamaConfig(**_LLAMA2_COMMON, **NAMED_SIZES[name]), name
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return transformers.AutoConfig.for_model(**json.loads(path.read_text())), name
    from peftkit import models

    if name.startswith("tiny-") and name.removeprefix("tiny-") in models.TINY_FAMILIES:
        return models.tiny_config(name.removeprefix("tiny-")), name
    folders = {"minilm": models.minilm_folder, "smollm2-135m": models.smollm2_folder}
    if name in folders:
        return transformers.AutoConfig.from_pretrained(folders[name]()), name
    raise ConfigError(
        f"Cannot find a model config for {name!r}: give a transformers config, a config.json path, "
        f"a bundled name ({', '.join(models.bundled_names())}) or a named size "
        f"({', '.join(NAMED_SIZES)})."
    )


def default_task(config: Any) -> str:
    """The task type a model is trained for when none is named: encoder-decoders seq2seq, encoders
    (BERT) classification, decoders causal-lm."""
    import transformers

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    kind = type(config)
    if kind in transformers.MODEL_FOR_MASKED_LM_MAPPING and not config.is_decoder:
        return "classification"
    if kind in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        return "causal-lm"
    return "classification"


def task_model(config: Any, task: str, dtype: torch.dtype, name: str) -> nn.Module:
    """The model for a task type on the meta device, ready for a pass that reads no values."""
    import transformers

    from peftkit.models import build
    from peftkit.tasks.types import get_task_type

    task_type = get_task_type(task)  # the task type's record picks its transformers class
    if task_type.trainer is not None and task_type.step is None:
        raise ConfigError(
            f"the estimator does not model task type {task!r}: it trains with its own trainer "
            "and its record says no step shape (tasks/base.py StepShape). Estimate the same "
            "model and method with --task causal-lm for a lower bound."
        )
    config = copy.deepcopy(config)
    with torch.device("meta"):
        make = lambda: task_type.auto_class().from_config(config, dtype=dtype)  # noqa: E731
        model = build(task_type, make, config.model_type)
    # Decoders classify from the last non-padding token, so they need a padding id; the check
    # that warns about padding without an attention mask reads token values, which meta lacks.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    for module in model.modules():
        if isinstance(module, transformers.PreTrainedModel):
            module.warn_if_padding_and_no_attention_mask = lambda *args: None
    return model


def step_shape(task: str, options: Any) -> Any:
    """The step of a task type with its own trainer, from its record and the recipe's section
    for it (tasks/base.py StepShape); None for a type trained on its features' token loss."""
    from peftkit.tasks.types import get_task_type

    task_type = get_task_type(task)
    if task_type.trainer is None or task_type.step is None:
        return None
    return task_type.step(options)


def method_config(method: Any) -> Any:
    """A registered method's config from a config object, a method name (default options), or a
    recipe's method section ({"name": ..., **options}): the plan's one reader of a section."""
    from peftkit.plan import method_from_section

    return method_from_section(method)[1]


def apply_on_meta(model: nn.Module, config: Any) -> tuple[nn.Module, list[str]]:
    """The method applied to a meta-device model as `peftkit.apply` applies it (then, where its
    trainable set is chosen from data, made at its planned size); the method's warnings."""
    from peftkit import api, registry

    method = registry.method_for_config(config)
    with torch.device("meta"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = api.apply(model, config)
        if method.prepare_without_data is not None:
            method.prepare_without_data(tuned, config)
    package = str(Path(__file__).parents[1])  # peftkit's own warnings speak to the user
    notes = [str(w.message) for w in caught if str(w.filename).startswith(package)]
    return tuned, list(dict.fromkeys(notes))


def check_length(model: nn.Module, seq_len: int, name: str) -> None:
    """Refuse a sequence longer than a learned position table (BERT, GPT-2); rotary and relative
    positions (Llama, T5) take any length."""
    from peftkit.targeting import max_positions

    limit = max_positions(model.config)
    learned = any(
        isinstance(m, nn.Embedding) and m.num_embeddings == limit for m in model.modules()
    )
    if limit is not None and learned and seq_len > limit:
        raise ConfigError(
            f"seq_len {seq_len} is longer than the {limit} positions {name} learned; "
            f"estimate at most {limit} tokens."
        )
