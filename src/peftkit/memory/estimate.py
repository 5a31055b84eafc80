"""Estimate the memory of one training step by parts: weights, gradients, AdamW state and saved
activations, for any registered method with any of its options, on any model size.

The estimate measures what `peftkit.apply` really does, on the meta device (shapes, no memory):
the model is built for its task type, the method is applied to it, and the parameters are counted
exactly (trainable, frozen, and added by the method: applied total minus base total). The
activations come from one forward pass of the applied model (activations.py). Base precision and
quantisation are inputs like the batch size, never methods. See docs/estimate.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.config import to_dict
from peftkit.errors import ConfigError
from peftkit.memory import activations, meta
from peftkit.registry import method_for_config

GIB = 2**30


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter in one precision regime, and the dtype activations are kept in."""

    name: str
    frozen: float  # a weight that does not train: its storage only
    weight: float  # a trainable weight's working copy
    gradient: float
    optimizer: float  # AdamW m and v, plus an fp32 master copy in mixed precision
    activation_dtype: torch.dtype
    help: str


PRECISIONS = {
    p.name: p
    for p in [
        Precision("fp32", 4, 4, 4, 8, torch.float32, "fp32 weights, gradients, m and v"),
        Precision(
            "bf16-mixed", 2, 2, 2, 12, torch.bfloat16,
            "bf16 weights and gradients; fp32 master copy, m and v (ZeRO paper accounting)",
        ),
        Precision(
            "fp16-mixed", 2, 2, 2, 12, torch.float16,
            "fp16 weights and gradients; fp32 master copy, m and v (ZeRO paper accounting)",
        ),
        Precision("bf16", 2, 2, 2, 4, torch.bfloat16, "pure bf16: weights, gradients, m, v"),
    ]
}  # fmt: skip

# NF4 (Dettmers et al., 2023): 4 bits a weight; double quantisation brings the block constants to
# 8-bit absmax per 64 weights plus one fp32 constant per 256 blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Storage of the frozen linear weights of the base (any method), in bytes per weight.
QUANTIZATIONS = {"nf4": NF4_BYTES}


@dataclass
class MemoryEstimate:
    """Estimated memory of one training step, in bytes, by part, and the peak they give.

    The peak is the larger of two moments: the start of the backward pass (every saved activation
    plus the loss-gradient buffers) and its end (every gradient; with gradient checkpointing also
    the layer inputs and the one layer being recomputed). Weights and optimizer state are live
    throughout. Gradients and activations are never all live at once: each layer's activations
    are freed as its gradients are made."""

    model: str
    task: str
    method: str  # the registered name
    label: str  # the name with the options that differ from the defaults
    method_options: dict[str, Any]
    precision: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    total_parameters: int  # of the applied model
    trainable_parameters: int
    added_parameters: int  # applied total minus base total
    weights: float
    gradients: float
    optimizer: float
    activations: float  # saved for backward, live when the backward pass starts
    loss_workspace: float  # fp32 gradients of the logits, made first in the backward pass
    recompute: float = 0.0  # gradient checkpointing: layer inputs plus one recomputed layer
    quantization: str | None = None
    attention: str = "fused"
    notes: list[str] = field(default_factory=list)

    @property
    def frozen_parameters(self) -> int:
        """Parameters that do not train: stored, no gradient, no optimizer state."""
        return self.total_parameters - self.trainable_parameters

    @property
    def model_states(self) -> float:
        """Weights, gradients and optimizer state: the ZeRO paper's "model states"."""
        return self.weights + self.gradients + self.optimizer

    @property
    def phases(self) -> dict[str, float]:
        """Memory beyond weights and optimizer state at the two candidate peaks."""
        return {
            "backward start": self.activations + self.loss_workspace,
            "backward end": self.gradients + self.recompute,
        }

    @property
    def peak_phase(self) -> str:
        """Which moment of the step is the peak."""
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def total(self) -> float:
        """The estimated peak memory of the training step."""
        return self.weights + self.optimizer + max(self.phases.values())

    def as_dict(self) -> dict[str, Any]:
        """The estimate as plain data for JSON (bytes, plus GiB for reading)."""
        names = ("weights", "gradients", "optimizer", "activations", "loss_workspace", "recompute")
        parts = {name: getattr(self, name) for name in names}
        parts["model_states"] = self.model_states
        parts["total"] = self.total
        settings = ("model", "task", "method", "label", "method_options", "precision",
                    "batch_size", "seq_len", "gradient_checkpointing", "quantization", "attention",
                    "total_parameters", "trainable_parameters", "added_parameters")  # fmt: skip
        return {
            **{name: getattr(self, name) for name in settings},
            "frozen_parameters": self.frozen_parameters,
            "peak_phase": self.peak_phase,
            "bytes": {k: int(v) for k, v in parts.items()},
            "gib": {k: v / GIB for k, v in parts.items()},
            "notes": self.notes,
        }

    def __str__(self) -> str:
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        quantized = f", {self.quantization} base" if self.quantization else ""
        title = (
            f"{self.model} ({self.task}), {self.label}, {self.precision}{quantized}, batch "
            f"{self.batch_size} x {self.seq_len} tokens{checkpointing}"
        )
        per_parameter = self.model_states / self.total_parameters if self.total_parameters else 0
        rows = [
            ("parameters", f"{self.total_parameters:,}"),
            ("trainable", f"{self.trainable_parameters:,}"),
            ("added by the method", f"{self.added_parameters:,}"),
            ("weights", gib(self.weights)),
            ("gradients", gib(self.gradients)),
            ("optimizer (AdamW)", gib(self.optimizer)),
            ("model states", f"{gib(self.model_states)} ({per_parameter:.2f} B/param)"),
            ("activations", gib(self.activations)),
            ("loss workspace", gib(self.loss_workspace)),
        ]
        if self.gradient_checkpointing:
            rows.append(("recompute", gib(self.recompute)))
        rows.append((f"peak ({self.peak_phase})", gib(self.total)))
        width = max(len(name) for name, _ in rows)
        lines = [title] + [f"  {name:<{width}}  {value:>14}" for name, value in rows]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def gib(value: float) -> str:
    """Bytes as GiB, for tables."""
    return f"{value / GIB:,.2f} GiB"


def describe(config: Any) -> str:
    """A method config as its name plus the options that differ from the defaults."""

    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    changed = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != default(f)
    ]
    name = method_for_config(config).name
    return f"{name} ({', '.join(changed)})" if changed else name


def _check(dtype: str, attention: str, quantization: str | None, batch: int, seq: int) -> None:
    """Refuse settings the estimator does not know, naming the valid ones."""
    for value, valid, what in [(dtype, PRECISIONS, "dtype"),
                               (attention, activations.ATTENTION, "attention")]:  # fmt: skip
        if value not in valid:
            raise ConfigError(f"Unknown {what} {value!r}; use one of: {', '.join(valid)}.")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"Unknown quantization {quantization!r}; use one of: {', '.join(QUANTIZATIONS)} "
            "(or none)."
        )
    if batch < 1 or seq < 1:
        raise ConfigError(f"batch_size and seq_len must be at least 1: {batch}, {seq}.")


def _linear_weights(model: torch.nn.Module) -> set[int]:
    """The weights a quantised base stores in 4 bits: its linear layers' weights, except the
    output layer and a new task head (they stay in the working precision)."""
    from peftkit.targeting import is_linear, task_head_modules

    kept = [model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None]
    kept += [model.get_submodule(name) for name in task_head_modules(model)]
    kept_ids = {id(m) for m in kept if m is not None}
    kept_ids |= {id(sub) for m in kept if m is not None for sub in m.modules()}
    return {id(m.weight) for m in model.modules() if is_linear(m) and id(m) not in kept_ids}


def _persistent_bytes(tensors: Any) -> int:
    """Bytes of distinct tensors (buffers: index tables and the like)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate(
    model: Any,
    method: Any,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str = "bf16-mixed",
    gradient_checkpointing: bool = False,
    *,
    task: str | None = None,
    attention: str = "fused",
    quantization: str | None = None,
) -> MemoryEstimate:
    """Estimate one training step's memory by part (weights, gradients, AdamW, activations).

    model: a transformers config, config.json path or folder, bundled name, or named size
    (llama-7b, llama-13b, llama-70b). method: a method config object, a registered method's name
    (its default options), or a recipe's method section ({"name": NAME, OPTION: VALUE, ...}).
    task: the task type (default: the model's usual one). quantization: "nf4" stores the frozen
    linear weights of the base in 4 bits, whatever the method."""
    _check(dtype, attention, quantization, batch_size, seq_len)
    config = meta.method_config(method)
    hf_config, name = meta.resolve_config(model)
    task = task or meta.default_task(hf_config)
    precision = PRECISIONS[dtype]
    base = meta.task_model(hf_config, task, precision.activation_dtype, name)
    meta.check_length(base, seq_len, name)
    activations.set_attention(base, attention)
    layers = activations.transformer_layers(base)
    base_total = sum(p.numel() for p in base.parameters())
    base_buffers = _persistent_bytes(base.buffers())
    linear_weights = _linear_weights(base)
    tuned, notes = meta.apply_on_meta(base, config)

    parameters = list(tuned.parameters())  # each shared tensor once
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    quantized = 0
    if quantization is not None:
        quantized = sum(
            p.numel() for p in parameters if not p.requires_grad and id(p) in linear_weights
        )
        notes.append(f"{quantized:,} frozen linear weights stored in {quantization}")
    saved = activations.saved_tensors(tuned, base, layers, batch_size, seq_len)
    saved_bytes, recompute = saved.parts(gradient_checkpointing)
    if saved.sequence > seq_len:
        notes.append(f"the method lengthens every sequence to {saved.sequence} positions")
    if not trainable:
        notes.append("nothing trains with these options")
    storage = QUANTIZATIONS[quantization] if quantization else 0.0
    return MemoryEstimate(
        model=name,
        task=task,
        method=method_for_config(config).name,
        label=describe(config),
        method_options=to_dict(config),
        precision=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        total_parameters=total,
        trainable_parameters=trainable,
        added_parameters=total - base_total,
        # The method's own buffers (index tables) live as long as the weights.
        weights=(total - trainable - quantized) * precision.frozen
        + quantized * storage
        + trainable * precision.weight
        + _persistent_bytes(tuned.buffers())
        - base_buffers,
        gradients=trainable * precision.gradient,
        optimizer=trainable * precision.optimizer,
        activations=saved_bytes,
        loss_workspace=2 * saved.logits * 4 if trainable else 0,
        recompute=recompute,
        quantization=quantization,
        attention=attention,
        notes=notes,
    )
