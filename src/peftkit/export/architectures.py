"""What each exportable architecture is in GGUF: llama.cpp's architecture name, the metadata keys
its loader reads, the tensor layout changes it expects, and what the export refuses.

The conventions are llama.cpp's (its `convert_hf_to_gguf.py` and `gguf-py`), written here from
reading them: Llama's query and key rows are reordered for llama.cpp's rotary layout (pairs of
adjacent values, where transformers rotates the two halves of a head); Qwen2 uses the half-split
(NeoX) layout llama.cpp also has, so its rows stay as they are; GPT-2's Conv1D weights are stored
transposed. transformers' GGUF reader undoes each of these, which is what the tests check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from peftkit.errors import ExportError


@dataclass(frozen=True)
class GgufArchitecture:
    """One transformers architecture as GGUF: names, metadata, layout, and what it cannot carry."""

    model_type: str  # transformers' config.model_type
    model_class: str  # the causal language model class that is exported
    gguf_arch: gguf.MODEL_ARCH
    write_metadata: Callable[[gguf.GGUFWriter, Any], None]
    problems: Callable[[Any], list[str]]
    # (transformers tensor name, array, config) -> the array in llama.cpp's layout
    to_gguf_layout: Callable[[str, np.ndarray, Any], np.ndarray]

    @property
    def gguf_name(self) -> str:
        """The `general.architecture` value llama.cpp dispatches on."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


def rope_theta(config: Any) -> float:
    """The rotary base frequency (transformers 5 keeps it in rope_parameters)."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError(f"The {config.model_type} config states no rope_theta.")
    return float(theta)


def head_dim(config: Any) -> int:
    """Size of one attention head."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def key_value_heads(config: Any) -> int:
    """Key/value head count (grouped-query attention); the query head count when unset."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _rotary_decoder_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """The hyperparameters llama.cpp's Llama and Qwen2 loaders read (under the arch's prefix)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(key_value_heads(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _rotary_decoder_problems(config: Any) -> list[str]:
    """What a Llama/Qwen2 config may hold that the file could not carry faithfully."""
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r} (llama.cpp's loader assumes silu)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(
            f"rope scaling {rope['rope_type']!r} (not exported: transformers' GGUF reader "
            "would drop it, so the round trip could not be checked)"
        )
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        problems.append("a partial rotary embedding (partial_rotary_factor)")
    return problems


def _llama_problems(config: Any) -> list[str]:
    """Llama extras transformers' GGUF reader would lose."""
    problems = _rotary_decoder_problems(config)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("linear-layer biases (transformers' GGUF reader builds Llama without them)")
    return problems


def _qwen2_problems(config: Any) -> list[str]:
    """Qwen2 extras llama.cpp's qwen2 loader would ignore."""
    problems = _rotary_decoder_problems(config)
    if getattr(config, "use_sliding_window", False):
        problems.append("sliding-window attention (llama.cpp's qwen2 attends to the full context)")
    return problems


def interleave_rotary_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from transformers' rotary layout (first half, second half) to
    llama.cpp's (alternating): row j of the second half moves next to row j of the first."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _llama_layout(name: str, array: np.ndarray, config: Any) -> np.ndarray:
    """Query and key projections (weights and any biases) in llama.cpp's rotary order."""
    if ".self_attn.q_proj." in name:
        return interleave_rotary_rows(array, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return interleave_rotary_rows(array, key_value_heads(config))
    return array


def _same_layout(name: str, array: np.ndarray, config: Any) -> np.ndarray:
    """Qwen2: llama.cpp rotates half-split heads for it, as transformers does."""
    return array


def _gpt2_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """GPT-2's hyperparameters, as llama.cpp's gpt2 loader reads them."""
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _gpt2_problems(config: Any) -> list[str]:
    """GPT-2 options llama.cpp's gpt2 graph does not have."""
    problems = []
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation {config.activation_function!r} (llama.cpp uses tanh GELU)")
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
        problems.append("per-layer attention scaling (scale_attn_by_inverse_layer_idx)")
    # transformers' GGUF reader keeps GPT-2's defaults for these two (it reads the context length
    # into n_ctx, not n_positions), so the round trip that proves an export could not hold.
    if config.n_inner not in (None, 4 * config.n_embd):
        problems.append(f"an inner size of {config.n_inner} (transformers reads back 4 * n_embd)")
    if config.n_positions != 1024:
        problems.append(f"{config.n_positions} positions (transformers reads GPT-2 back with 1024)")
    return problems


def _gpt2_layout(name: str, array: np.ndarray, config: Any) -> np.ndarray:
    """GPT-2's Conv1D stores (in, out); GGUF stores every matrix as (out, in) like nn.Linear."""
    if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return np.ascontiguousarray(array.T)
    return array


ARCHITECTURES = {
    arch.model_type: arch
    for arch in (
        GgufArchitecture(
            "llama", "LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA,
            _rotary_decoder_metadata, _llama_problems, _llama_layout,
        ),
        GgufArchitecture(
            "qwen2", "Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2,
            _rotary_decoder_metadata, _qwen2_problems, _same_layout,
        ),
        GgufArchitecture(
            "gpt2", "GPT2LMHeadModel", gguf.MODEL_ARCH.GPT2,
            _gpt2_metadata, _gpt2_problems, _gpt2_layout,
        ),
    )
}  # fmt: skip


def architecture_for(model: Any) -> GgufArchitecture:
    """The export record for a model, or a clear refusal naming what is supported."""
    supported = ", ".join(f"{a.model_class} ({a.model_type})" for a in ARCHITECTURES.values())
    model_type = getattr(model.config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export does not support the '{model_type}' architecture; supported: {supported}."
        )
    if type(model).__name__ != arch.model_class:
        raise ExportError(
            f"GGUF export writes causal language models ({arch.model_class}); this model is a "
            f"{type(model).__name__}. Export a model trained for causal-lm or chat."
        )
    problems = arch.problems(model.config)
    if problems:
        raise ExportError(
            f"This {arch.model_class} cannot be exported faithfully: it has "
            + "; ".join(problems)
            + "."
        )
    return arch
