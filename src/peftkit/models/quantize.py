"""Quantised bases through bitsandbytes, as the ecosystem does it: NF4 (QLoRA: 4-bit NormalFloat
with double-quantised block scales) or LLM.int8 linear layers, on the CPU as on CUDA.

A checkpoint folder is quantised while it loads, by transformers' `BitsAndBytesConfig`; a model
built in code (the tiny test models, a random model of a big shape built on the meta device) is
quantised layer by layer with the same bitsandbytes modules and parameters transformers makes, so
both give the same layers (a test holds them equal). The output layer and a new task head are
left as they are, as transformers does. `dequantize` gives back a plain transformers model whose
weights are exactly dequant(W) (what the quantised model computes with): the base a QLoRA
adapter is merged onto."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError, TargetError
from peftkit.models.precision import quantized_kind

QUANTIZATIONS = ("nf4", "int8")
# LLM.int8 quantises a layer's input to int8 by design; bitsandbytes says so on every call.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast from")
BITSANDBYTES_PIN = "bitsandbytes==0.50.2"
_RUNS: dict[tuple[str, str], bool] = {}


def bitsandbytes() -> Any:
    """The bitsandbytes module, or a ConfigError saying how to install it."""
    # (Its import-time warning about the `kernels` package is silenced in peftkit/__init__.py.)
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise ConfigError(
            f"base.quantize needs bitsandbytes, which is not importable here ({error}). Install "
            f"it (pip install {BITSANDBYTES_PIN}; `make install` does), or drop base.quantize."
        ) from None


def check_runs(kind: str, compute_dtype: torch.dtype, device: str = "cpu") -> None:
    """Refuse, before any model loads, a quantisation bitsandbytes cannot run on this device:
    one small quantised layer must run forward and backward."""
    key = (kind, f"{device}:{compute_dtype}")
    if key in _RUNS:
        return
    bnb = bitsandbytes()
    try:
        with torch.device("meta"):
            layer = _new_layer(bnb, kind, 64, 64, False, compute_dtype)
        _fill(layer, torch.randn(64, 64), device)
        inputs = torch.randn(2, 64, device=device, requires_grad=True)
        layer(inputs).sum().backward()
        assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
    except Exception as error:  # noqa: BLE001 - any failure means: cannot run here
        raise ConfigError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run a {kind} layer on "
            f"{device} ({type(error).__name__}: {error}). Use {BITSANDBYTES_PIN} on a CPU or "
            "CUDA device it supports, or drop base.quantize (base.dtype: bf16 halves the base "
            "instead)."
        ) from None
    _RUNS[key] = True


def check_kind(kind: str) -> None:
    """Refuse an unknown quantisation name, naming the known ones."""
    if kind not in QUANTIZATIONS:
        raise ConfigError(
            f"Unknown quantisation {kind!r}; use one of: {', '.join(QUANTIZATIONS)} (or none)."
        )


def kept_modules(model: nn.Module) -> list[str]:
    """Names of the modules left unquantised, as transformers chooses them: the output layer, a
    new task head, and the modules the architecture keeps in float32 (T5's `wo`)."""
    from peftkit.targeting import task_head_modules

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = [
        name for name, module in model.named_modules() if output is not None and module is output
    ]
    return (
        kept + task_head_modules(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    )


def _quantizable(module: nn.Module) -> bool:
    """The layers bitsandbytes replaces: nn.Linear itself and GPT-2's Conv1D (as transformers)."""
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def quantizable_layers(model: nn.Module) -> list[str]:
    """The linear layers a quantised base stores in 4 or 8 bits; an error when there are none."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    kept = kept_modules(model)
    names = [
        name
        for name, module in model.named_modules()
        if _quantizable(module) and should_convert_module(name, kept)
    ]
    if not names:
        raise TargetError(
            f"{type(model).__name__} has no linear layers outside its output layer and task head, "
            "so there is nothing to quantise. Drop base.quantize (base.dtype: bf16 halves the "
            "weights instead)."
        )
    return names


def quantization_config(kind: str, compute_dtype: torch.dtype, kept: list[str]) -> Any:
    """transformers' BitsAndBytesConfig for a kind: NF4 with double quantisation (QLoRA's
    choice) computing in `compute_dtype`, or LLM.int8 with its outlier threshold 6."""
    import transformers

    check_kind(kind)
    if kind == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=kept,
    )


def _new_layer(bnb: Any, kind: str, inputs: int, outputs: int, bias: bool, dtype: torch.dtype):  # noqa: ANN202
    """The bitsandbytes layer transformers' replace_with_bnb_linear makes for these settings."""
    if kind == "int8":
        return bnb.nn.Linear8bitLt(inputs, outputs, bias, has_fp16_weights=False, threshold=6.0)
    return bnb.nn.Linear4bit(
        inputs, outputs, bias, dtype, compress_statistics=True, quant_type="nf4",
        quant_storage=torch.uint8,
    )  # fmt: skip


def _fill(layer: nn.Module, weight: torch.Tensor, device: Any) -> None:
    """Quantise `weight` (out x in) into the layer, as transformers' loader does."""
    bnb = bitsandbytes()
    settings = dict(layer.weight.__dict__)
    if type(layer.weight).__name__ == "Int8Params":
        settings.pop("SCB", None)
        quantized = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, **settings)
    else:
        quantized = bnb.nn.Params4bit(weight, requires_grad=False, **settings)
    layer.weight = quantized.to(device)


def quantize_layers(
    model: nn.Module,
    kind: str,
    compute_dtype: torch.dtype,
    make_weight: Callable[[str, nn.Module], torch.Tensor] | None = None,
    device: Any = "cpu",
) -> nn.Module:
    """Replace the model's linear layers, one at a time, by bitsandbytes layers holding their
    quantised weights. `make_weight(name, layer)` gives a layer's float weight (out x in) when
    the model sits on the meta device, so no more than one layer is ever held in float."""
    bnb = bitsandbytes()
    for name in quantizable_layers(model):
        old = model.get_submodule(name)
        conv = type(old).__name__ == "Conv1D"
        inputs, outputs = old.weight.shape if conv else (old.in_features, old.out_features)
        weight = make_weight(name, old) if make_weight is not None else old.weight.data
        weight = weight.T if conv and make_weight is None else weight
        with torch.device("meta"):
            layer = _new_layer(bnb, kind, inputs, outputs, old.bias is not None, compute_dtype)
        layer.source_cls = type(old)
        _fill(layer, weight.contiguous(), device)
        if old.bias is not None:
            layer.bias = nn.Parameter(old.bias.data, requires_grad=False)
        model.set_submodule(name, layer)
        del old, weight
    mark_quantized(model, kind, compute_dtype)
    return model


def mark_quantized(model: nn.Module, kind: str, compute_dtype: torch.dtype) -> None:
    """What transformers' loader leaves on a quantised model (PEFT reads it), and CPU training
    made safe: bitsandbytes repacks a CPU layer's weights in place for a faster kernel the
    first time it runs in eval mode without gradients; that kernel has no backward, so a model
    evaluated before training (as every peftkit run is) would then train with no gradient
    through its base layers. Packing is switched off on every layer."""
    model.is_loaded_in_4bit = kind == "nf4"
    model.is_loaded_in_8bit = kind == "int8"
    if getattr(model.config, "quantization_config", None) is None:
        model.config.quantization_config = quantization_config(
            kind, compute_dtype, kept_modules(model)
        )
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_quantized(model: nn.Module, dtype: torch.dtype) -> None:
    """PEFT's standard preparation of a quantised model for training, on a float32 base: every
    weight frozen, every non-quantised weight in float32 (it was loaded so already). Its
    gradient checkpointing is left to training.gradient_checkpointing (peftkit's own, for every
    method). On a half-precision base the upcast is skipped: it would double the frozen
    embeddings and norms for nothing, since peftkit keeps whatever trains in float32 itself."""
    if dtype == torch.float32:
        import peft

        peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def dequantize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every quantised layer by a plain nn.Linear holding dequant(W) in `dtype` (what the
    quantised layer computes with), and drop the quantisation marks: a plain model."""
    bnb = bitsandbytes()
    for name, layer in list(model.named_modules()):
        kind = quantized_kind(getattr(layer, "weight", None)) if name else None
        if kind is None:
            continue
        if kind == "int8":
            scales = layer.weight.SCB.float().unsqueeze(1)
            weight = layer.weight.data.float() * scales / 127  # LLM.int8's row-wise absmax
        else:
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
        plain = plain.to(device=weight.device, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(weight.to(dtype))
            if layer.bias is not None:
                plain.bias.copy_(layer.bias.data.to(dtype))
        model.set_submodule(name, plain)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if hasattr(model, flag):
            setattr(model, flag, False)
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model.to(dtype)
