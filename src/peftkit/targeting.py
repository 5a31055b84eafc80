"""What peftkit knows about each architecture family, in one place, and picking the modules a
method attaches to: by name list, regex, or "all-linear". Name-list and regex semantics follow
HF PEFT's, so a spec means the same in both.

The per-family tables name modules by their role in a transformer layer (the attention's query
and value projections, each sublayer's output, each block's output, the layer stack); methods
choose among roles, so a new family is a row here, not an edit in every method."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from peftkit.errors import TargetError

# The attention's query and value projections, by each family's own names (the low-rank methods'
# default targets, as in Hu et al. 2021).
QUERY_VALUE_PROJECTIONS: dict[str, list[str]] = {
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

# The attention's key and value projections (the modules whose outputs (IA)^3 rescales, Liu et al.
# 2022). GPT-2 fuses query, key and value in one Conv1D: a vector on its output scales all three.
# T5's names also take the decoder's cross-attention keys and values, as the paper does.
KEY_VALUE_PROJECTIONS: dict[str, list[str]] = {
    "bert": ["key", "value"],
    "roberta": ["key", "value"],
    "t5": ["k", "v"],
    "mt5": ["k", "v"],
    "bart": ["k_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "llama": ["k_proj", "v_proj"],
    "qwen2": ["k_proj", "v_proj"],
    "mistral": ["k_proj", "v_proj"],
}
# model_type -> regex (full match) of each layer's second feed-forward projection, whose input is
# the feed-forward network's intermediate activation (after the nonlinearity, after the gate in
# gated families). BERT names the attention's output projection `attention.output.dense` and the
# feed-forward one `output.dense`: a suffix match on "output.dense" takes both, hence the regex.
_BERT_FEED_FORWARD_DOWN = r".*\.layer\.\d+\.output\.dense"
_T5_FEED_FORWARD_DOWN = r".*\.DenseReluDense\.wo"  # also gated T5 v1.1 / mT5 (wi_0, wi_1 -> wo)
_LLAMA_FEED_FORWARD_DOWN = r".*\.layers\.\d+\.mlp\.down_proj"
FEED_FORWARD_DOWN: dict[str, str] = {
    "bert": _BERT_FEED_FORWARD_DOWN,
    "roberta": _BERT_FEED_FORWARD_DOWN,
    "t5": _T5_FEED_FORWARD_DOWN,
    "mt5": _T5_FEED_FORWARD_DOWN,
    "bart": r".*\.layers\.\d+\.fc2",
    "gpt2": r".*\.h\.\d+\.mlp\.c_proj",
    "llama": _LLAMA_FEED_FORWARD_DOWN,
    "qwen2": _LLAMA_FEED_FORWARD_DOWN,
    "mistral": _LLAMA_FEED_FORWARD_DOWN,
}

TargetSpec = str | Sequence[str] | None

# A numbered path segment ("layers.3.", "h.0.", "block.1.") marks the repeated transformer layers.
_IN_LAYER_STACK = re.compile(r"\.\d+\.")
# Leaf names of query/key/value projections across BERT, T5, GPT-2 (fused c_attn), Llama, Qwen2.
QKV_PROJECTIONS = {
    "query", "key", "value", "q", "k", "v", "q_proj", "k_proj", "v_proj",
    "c_attn", "qkv_proj", "query_key_value", "Wqkv",
}  # fmt: skip
# Path parts that name an attention block (its output projection is not a q/k/v projection).
ATTENTION_PARTS = {"attention", "attn", "self_attn", "selfattention", "encdecattention"}
# The roles module_role() gives a layer's modules.
ROLES = ("query_key_value", "attention_output", "feed_forward", "layer_norm", "other")

# model_type -> regex (full match) of the modules whose output is a sublayer's update, just before
# its skip connection (the dropout after the output projection where the family has one, else the
# projection itself), after attention and after the feed-forward network. T5 decoder blocks are
# [self-attention, cross-attention, feed-forward]; encoder blocks lack the middle one, hence the
# per-stack indices; cross-attention is left out.
SUBLAYER_OUTPUTS: dict[str, str] = {
    "bert": r".*\.layer\.\d+\.attention\.output\.dropout|.*\.layer\.\d+\.output\.dropout",
    "t5": r".*block\.\d+\.layer\.0\.dropout"
    r"|.*encoder\.block\.\d+\.layer\.1\.dropout|.*decoder\.block\.\d+\.layer\.2\.dropout",
    "gpt2": r".*\.h\.\d+\.attn\.resid_dropout|.*\.h\.\d+\.mlp\.dropout",
    "llama": r".*\.layers\.\d+\.self_attn\.o_proj|.*\.layers\.\d+\.mlp\.down_proj",
}
# model_type -> regex of the module that ends each layer's feed-forward block: in post-norm
# families (BERT) the block's final layer norm, in T5 the feed-forward sublayer, in pre-norm
# decoders the whole layer (its output is the residual stream after the block).
BLOCK_OUTPUTS: dict[str, str] = {
    "bert": r".*\.layer\.\d+\.output\.LayerNorm",
    "t5": r".*encoder\.block\.\d+\.layer\.1|.*decoder\.block\.\d+\.layer\.2",
    "gpt2": r".*\.h\.\d+",
    "llama": r".*\.layers\.\d+",
}
for _table in (SUBLAYER_OUTPUTS, BLOCK_OUTPUTS):  # families that share their relatives' layout
    _table.update(roberta=_table["bert"], mt5=_table["t5"], qwen2=_table["llama"],
                  mistral=_table["llama"])  # fmt: skip

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
    """True for layers low-rank methods can adapt: nn.Linear and GPT-2's Conv1D."""
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
    """The default targets (query and value projections) for this architecture, or a clear error
    naming the choices."""
    kind = model_type(model)
    if kind not in QUERY_VALUE_PROJECTIONS:
        raise TargetError(
            f"No default target modules for model type '{kind or type(model).__name__}'. "
            "Set target_modules to a list of module names, a regex, or 'all-linear'. "
            f"Linear layers here end in: {', '.join(suffixes(model))}."
        )
    return list(QUERY_VALUE_PROJECTIONS[kind])


def key_value_targets(model: nn.Module) -> list[str]:
    """This architecture's key and value projections (names), or an error for an unknown one."""
    return list(_family_entry(KEY_VALUE_PROJECTIONS, model, "key and value projections"))


def feed_forward_down(model: nn.Module) -> list[str]:
    """Full names of the layers' second feed-forward projections (their input is the intermediate
    activation); [] for a family peftkit has no entry for."""
    pattern = FEED_FORWARD_DOWN.get(model_type(model))
    if pattern is None:
        return []
    return [name for name in linear_module_names(model) if re.fullmatch(pattern, name)]


def _family_entry(table: dict[str, Any], model: nn.Module, what: str) -> Any:
    """A per-family table's entry for this model, or an error saying what to set instead."""
    kind = model_type(model)
    if kind not in table:
        raise TargetError(
            f"No default {what} known for model type '{kind or type(model).__name__}'. "
            "Set target_modules to a list of module names, a regex, or 'all-linear'. "
            f"Linear layers here end in: {', '.join(suffixes(model))}."
        )
    return table[kind]


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


def in_layer_stack(name: str) -> bool:
    """Whether a parameter or module name lies inside the repeated transformer layers."""
    return _IN_LAYER_STACK.search(f".{name}") is not None


def is_norm(module: nn.Module) -> bool:
    """True for layer norms of any family (torch LayerNorm, T5LayerNorm, LlamaRMSNorm, ...)."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))


def module_role(name: str, module: nn.Module) -> str:
    """A module's role (ROLES): a norm, one of the layer stack's projections, or 'other'."""
    if is_norm(module):
        return "layer_norm"
    if not is_linear(module) or not in_layer_stack(name):
        return "other"  # pooler, task head, output layer
    parts = name.split(".")
    if parts[-1] in QKV_PROJECTIONS:
        return "query_key_value"
    if any(part.lower() in ATTENTION_PARTS for part in parts):
        return "attention_output"
    return "feed_forward"


def layer_index(name: str) -> int | None:
    """The layer a module belongs to: the first number in its dotted name (None outside layers)."""
    found = re.search(r"\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def module_listing(model: nn.Module, limit: int = 60) -> str:
    """The model's module names with layer numbers folded to '*', for error messages."""
    folded = dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n, _ in model.named_modules())
    names = [n for n in folded if n]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def max_positions(config: Any) -> int | None:
    """The longest sequence an absolute-position model takes, or None (relative positions)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
