"""A model's weights as GGUF tensors: llama.cpp's names, its layout, and the storage type each
tensor gets for an output type (the rules of llama.cpp's converter: vectors and norms stay f32,
matrices take the output type, and a q8_0 matrix whose rows do not split into 32-value blocks
falls back to f16)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from peftkit.errors import ExportError
from peftkit.export.architectures import GgufArchitecture

QT = gguf.GGMLQuantizationType
# --outtype -> (storage type of the matrices, general.file_type)
OUTTYPES = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Tensors llama.cpp always reads as f32 whatever the file's type (besides vectors and norms).
ALWAYS_F32 = ("position_embd.weight",)


@dataclass(frozen=True)
class GgufTensor:
    """One tensor ready for the writer: its GGUF name, stored bytes (or values) and type."""

    name: str
    data: np.ndarray
    qtype: gguf.GGMLQuantizationType


def check_outtype(outtype: str) -> None:
    """Refuse an output type this exporter does not write."""
    if outtype not in OUTTYPES:
        raise ExportError(
            f"Unknown GGUF output type '{outtype}'; choose one of {', '.join(OUTTYPES)} "
            "(f16 is near-lossless; q8_0 is half its size)."
        )


def check_plain_model(model: nn.Module) -> None:
    """Refuse a model whose tensors are not exactly those its config describes: a reader builds
    the model from the config, so any other tensor (an unmerged adapter module, a bias the
    architecture lacks) would be dropped silently."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected, actual = set(fresh.state_dict()), set(model.state_dict())
    extra, missing = sorted(actual - expected), sorted(expected - actual)
    if extra or missing:
        detail = "; ".join(
            f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for what, names in (("not in the architecture", extra), ("missing", missing))
            if names
        )
        raise ExportError(
            f"The model's tensors differ from those its {model.config.model_type} config "
            f"describes ({detail}). A GGUF reader builds the model from the config and would "
            "lose them: export a model whose tuned weights fold into the base weights."
        )


def output_embedding_name(model: nn.Module) -> str | None:
    """The state-dict name of the output projection when it is the input embedding itself
    (tied, as SmolLM2 and GPT-2 are): GGUF then stores token_embd only."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or output.weight is not embedding.weight:
        return None
    for name, module in model.named_modules():
        if module is output:
            return f"{name}.weight"
    return None


def storage_type(gguf_name: str, array: np.ndarray, outtype: str) -> gguf.GGMLQuantizationType:
    """The GGUF type a tensor is stored in for this output type."""
    if array.ndim <= 1 or gguf_name.endswith("_norm.weight") or gguf_name in ALWAYS_F32:
        return QT.F32
    qtype = OUTTYPES[outtype][0]
    if qtype == QT.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0]:
        return QT.F16  # rows must split into whole 32-value blocks
    return qtype


def layer_count(config: Any) -> int:
    """Number of transformer blocks, under either naming."""
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def gguf_tensors(model: nn.Module, arch: GgufArchitecture, outtype: str) -> Iterator[GgufTensor]:
    """Every weight of the model, renamed, re-laid-out and stored as the output type says."""
    check_outtype(outtype)
    config = model.config
    names = gguf.get_tensor_name_map(arch.gguf_arch, layer_count(config))
    tied_output = output_embedding_name(model)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == tied_output or hf_name.endswith(".attn.bias"):
            continue  # tied: token_embd serves both; GPT-2's causal-mask buffer is not a weight
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise ExportError(
                f"Tensor '{hf_name}' has no name in llama.cpp's {arch.gguf_name} layout; "
                "the model does not match the architecture it claims."
            )
        gguf_name = f"{gguf_stem}.{suffix}"
        array = tensor.detach().to(torch.float32).cpu().numpy()
        array = np.ascontiguousarray(arch.to_gguf_layout(hf_name, array, config))
        qtype = storage_type(gguf_name, array, outtype)
        yield GgufTensor(gguf_name, gguf.quants.quantize(array, qtype), qtype)
