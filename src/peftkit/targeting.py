"""Pick the modules a method attaches to: by name list, regex, or "all-linear", with
per-architecture defaults. Name-list and regex semantics follow HF PEFT's, so a spec means the
same in both."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from peftkit.errors import TargetError

# Attention projections the LoRA paper adapts (query and value), by each family's own names.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}

TargetSpec = str | Sequence[str] | None

# Model class suffixes -> PEFT task type; the task type decides which head is new and must train.
_TASK_TYPES = [
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
]
_HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}


def model_type(model: nn.Module) -> str:
    """The transformers model_type ("bert", "llama", ...) of a model, or "" if it has none."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model, from its class name; None for a bare backbone."""
    name = type(model).__name__
    for suffix, kind in _TASK_TYPES:
        if name.endswith(suffix):
            return kind
    return None


def task_head_modules(model: nn.Module) -> list[str]:
    """Top-level modules of a task head that starts untrained (a classifier), which must train."""
    if task_type(model) not in _HEAD_TASKS:
        return []
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and any(True for _ in child.parameters())
    ]


def is_linear(module: nn.Module) -> bool:
    """True for layers LoRA-style methods can adapt: nn.Linear and GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _excluded_from_all_linear(model: nn.Module) -> set[str]:
    """The output layer and task heads: "all-linear" leaves them alone, as PEFT does."""
    excluded = set(task_head_modules(model))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if output is not None and module is output:
            excluded.add(name)
    return excluded


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every adaptable linear layer in the model."""
    return [name for name, module in model.named_modules() if name and is_linear(module)]


def matches(name: str, spec: TargetSpec) -> bool:
    """PEFT's rule: a string is a full regex match; a list matches a name or a dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == target or name.endswith("." + target) for target in spec or [])


def default_targets(model: nn.Module) -> list[str]:
    """The default LoRA targets for this architecture, or a clear error naming the choices."""
    kind = model_type(model)
    if kind not in DEFAULT_LORA_TARGETS:
        raise TargetError(
            f"No default target modules for model type '{kind or type(model).__name__}'. "
            "Set target_modules to a list of module names, a regex, or 'all-linear'. "
            f"Linear layers here end in: {', '.join(suffixes(model))}."
        )
    return list(DEFAULT_LORA_TARGETS[kind])


def suffixes(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear layers (what a user can target)."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})


def resolve_targets(model: nn.Module, spec: TargetSpec) -> list[str]:
    """Full names of the linear layers a spec selects; raises if it selects none."""
    if spec is None:
        spec = default_targets(model)
    if spec == "all-linear":
        excluded = _excluded_from_all_linear(model)
        found = [
            name
            for name in linear_module_names(model)
            if not any(name == e or name.startswith(e + ".") for e in excluded)
        ]
    else:
        if not isinstance(spec, str) and not isinstance(spec, Sequence):
            raise TargetError(f"target_modules must be a list, a regex or 'all-linear': {spec!r}")
        found = [name for name in linear_module_names(model) if matches(name, spec)]
    if not found:
        raise TargetError(
            f"target_modules {spec!r} matched no linear layer of this "
            f"{model_type(model) or type(model).__name__} model. Linear layers here end in: "
            f"{', '.join(suffixes(model))} (or use 'all-linear')."
        )
    return found
