"""A memory estimate by part (weights, gradients, AdamW state, activations, workspaces) and the
peak they give; `estimate.py` measures and accounts them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30


@dataclass
class MemoryEstimate:
    """Estimated memory of one training step, in bytes, by part, and the peak they give.

    The peak is the largest of three moments: the start of the backward pass (every saved
    activation plus the loss-gradient buffers), its end (every gradient; with gradient
    checkpointing also the layer inputs and the one layer being recomputed), and the highest
    point of the forward and backward pass as followed on the meta device (`pass_peak`: live
    activations and temporaries plus the gradients made so far; not followed with gradient
    checkpointing), and, for a task type whose trainer generates first (GRPO), the rollouts'
    highest point (`generation`). Weights, a frozen reference copy and optimizer state are live
    throughout. With several processes
    every part is one process's: with FSDP the weights, gradients and optimizer state are its
    shard, and every moment also holds the parameters FSDP has gathered whole (`gathered`)."""

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
    workspace: float = 0.0  # a quantised base: one layer's weight dequantised at a time
    quantization: str | None = None
    base_dtype: str | None = None  # a frozen weight's storage (None: the precision's own)
    attention: str = "fused"
    notes: list[str] = field(default_factory=list)
    gpus: int = 1  # processes; every part is per process
    sharding: str = "none"  # "fsdp": weights, gradients and optimizer state divided by gpus
    gathered: float = 0.0  # fsdp: the root's parameters and the largest layer's, gathered whole
    # The pass followed on meta: live activations and temporaries plus the gradients made so
    # far, at the forward and backward pass's highest point (0: not followed)
    pass_peak: float = 0.0
    # A task type with its own trainer (memory/task_step.py): the reference's frozen copy of the
    # policy's weights, live throughout (0: none, or the adapter switched off), and the highest
    # point of the rollouts that come before the step (GRPO's generation: KV cache and sampling).
    reference_copy: float = 0.0
    generation: float = 0.0

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
            "backward start": self.activations
            + self.loss_workspace
            + self.workspace
            + self.gathered,
            "backward end": self.gradients + self.recompute + self.workspace + self.gathered,
            "the pass's highest point": self.pass_peak + self.workspace + self.gathered,
            "generation": self.generation + self.workspace + self.gathered,
        }

    @property
    def peak_phase(self) -> str:
        """Which moment of the step is the peak."""
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def total(self) -> float:
        """The estimated peak memory of the training step."""
        return self.weights + self.reference_copy + self.optimizer + max(self.phases.values())

    def as_dict(self) -> dict[str, Any]:
        """The estimate as plain data for JSON (bytes, plus GiB for reading)."""
        names = ("weights", "gradients", "optimizer", "activations", "loss_workspace", "recompute",
                 "workspace", "gathered", "pass_peak", "reference_copy", "generation")  # fmt: skip
        parts = {name: getattr(self, name) for name in names}
        parts["model_states"] = self.model_states
        parts["total"] = self.total
        settings = ("model", "task", "method", "label", "method_options", "precision",
                    "batch_size", "seq_len", "gradient_checkpointing", "quantization", "base_dtype",
                    "attention", "gpus", "sharding",
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
        quantized = f", {self.base_dtype} base" if self.base_dtype else ""
        quantized += f", {self.quantization} base layers" if self.quantization else ""
        if self.sharding != "none" or self.gpus > 1:
            quantized += f", per process of {self.gpus} ({self.sharding})"
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
        if self.workspace:
            rows.append(("dequantisation", gib(self.workspace)))
        if self.sharding == "fsdp":
            rows.append(("gathered by FSDP", gib(self.gathered)))
        if self.pass_peak:
            rows.append(("highest in the pass", gib(self.pass_peak)))
        if self.reference_copy:
            rows.append(("reference copy", gib(self.reference_copy)))
        if self.generation:
            rows.append(("generation", gib(self.generation)))
        rows.append((f"peak ({self.peak_phase})", gib(self.total)))
        width = max(len(name) for name, _ in rows)
        lines = [title] + [f"  {name:<{width}}  {value:>14}" for name, value in rows]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def gib(value: float) -> str:
    """Bytes as GiB, for tables."""
    return f"{value / GIB:,.2f} GiB"
