"""Estimates side by side: one column per (precision, method), as in the README's table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peftkit import tables
from peftkit.memory.estimate import MemoryEstimate, estimate, gib

DTYPES = ("bf16-mixed", "fp32")


def side_by_side(
    model: Any,
    methods: Sequence[Any],
    dtypes: Sequence[str] = DTYPES,
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    **options: Any,
) -> list[MemoryEstimate]:
    """One estimate per (dtype, method) pair; methods as `estimate` takes them, options too."""
    return [
        estimate(model, method, batch_size, seq_len, dtype, gradient_checkpointing, **options)
        for dtype in dtypes
        for method in methods
    ]


def title(estimates: Sequence[MemoryEstimate]) -> str:
    """What the table is about: the model, its size, the step, and each method's options."""
    first = estimates[0]
    base = first.total_parameters - first.added_parameters
    checkpointing = ", gradient checkpointing" if first.gradient_checkpointing else ""
    lines = [
        f"{first.model} ({first.task}): {base:,} parameters, batch {first.batch_size} x "
        f"{first.seq_len} tokens{checkpointing}, AdamW"
    ]
    described = {e.label: e.method_options for e in estimates}
    for label, options in described.items():
        shown = ", ".join(f"{key}={value}" for key, value in options.items()) or "no options"
        lines.append(f"- {label}: {shown}")
    return "\n".join(lines)


def markdown_table(estimates: Sequence[MemoryEstimate]) -> str:
    """Estimates side by side as a Markdown table, in GiB, one column per estimate."""
    heads = [
        f"{e.label}, {e.precision}" + (", checkpointing" if e.gradient_checkpointing else "")
        for e in estimates
    ]
    rows = [
        ("trainable parameters", [f"{e.trainable_parameters:,}" for e in estimates]),
        ("weights", [gib(e.weights) for e in estimates]),
        ("gradients", [gib(e.gradients) for e in estimates]),
        ("optimizer (AdamW)", [gib(e.optimizer) for e in estimates]),
        ("model states", [gib(e.model_states) for e in estimates]),
        ("  per parameter", [f"{e.model_states / e.total_parameters:.2f} B" for e in estimates]),
        ("activations", [gib(e.activations) for e in estimates]),
        ("loss workspace", [gib(e.loss_workspace) for e in estimates]),
        ("highest in the pass", [gib(e.pass_peak) for e in estimates]),
        ("**peak**", [f"**{gib(e.total)}** ({e.peak_phase})" for e in estimates]),
    ]  # fmt: skip
    return tables.markdown_table(["", *heads], [[name, *values] for name, values in rows])
