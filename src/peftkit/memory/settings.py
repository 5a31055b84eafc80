"""The storage settings `recommend` tries for each method, in order of preference: the base in
float32, then bf16, then quantised to 8 and 4 bits, each first without and then with gradient
checkpointing. A lower-precision base costs accuracy (NF4 the most; measured in
docs/lowbit.md) and checkpointing costs time (about a third more compute), so the first setting
that fits a budget is the one to train with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.errors import TargetError
from peftkit.memory.estimate import Measurement, MemoryEstimate, account, measure, pass_dtype
from peftkit.memory.storage import refuse_low_bit_base


@dataclass(frozen=True)
class Setting:
    """How the base is stored and whether activations are checkpointed."""

    base_dtype: str | None  # None: as the training precision stores it
    quantization: str | None = None
    gradient_checkpointing: bool = False

    @property
    def label(self) -> str:
        """A short name: 'bf16 base', 'nf4 base (bf16) + checkpointing'."""
        if self.quantization:
            name = f"{self.quantization} base ({self.base_dtype or 'precision'})"
        else:
            name = f"{self.base_dtype} base" if self.base_dtype else "base as the precision"
        return name + (" + checkpointing" if self.gradient_checkpointing else "")

    def as_dict(self) -> dict[str, Any]:
        """The setting as recipe values (base.dtype, base.quantize, gradient checkpointing)."""
        return {"base_dtype": self.base_dtype, "quantize": self.quantization,
                "gradient_checkpointing": self.gradient_checkpointing}  # fmt: skip


STORAGE = [("fp32", None), ("bf16", None), ("bf16", "int8"), ("bf16", "nf4")]
EXPLORED = [Setting(d, q, c) for d, q in STORAGE for c in (False, True)]


def settings_for(method: Any, explore: bool, fixed: Setting) -> list[Setting]:
    """The settings to try for a method: the fixed one, or every explored one it can train on
    (a method that changes the base's own weights only on a float32 base)."""
    if not explore:
        refuse_low_bit_base(method, fixed.base_dtype, fixed.quantization)
        return [fixed]
    if method.needs_float32_base:
        return [s for s in EXPLORED if s.base_dtype == "fp32" and s.quantization is None]
    return list(EXPLORED)


def estimates(
    model: str,
    section: dict[str, Any],
    settings: list[Setting],
    dtype: str,
    batch_size: int,
    seq_len: int,
    task: str,
    gpus: int = 1,
    sharding: str = "none",
) -> list[tuple[Setting, MemoryEstimate]]:
    """One estimate per setting, from one meta-device pass per activation dtype."""
    passes: dict[Any, Measurement] = {}
    found = []
    for setting in settings:
        activation = pass_dtype(dtype, setting.base_dtype)
        if activation not in passes:
            passes[activation] = measure(
                model, section, batch_size, seq_len, activation, task, chunked_loss=gpus == 1
            )
        try:
            estimate = account(passes[activation], dtype, setting.gradient_checkpointing,
                               setting.base_dtype, setting.quantization, gpus,
                               sharding)  # fmt: skip
        except TargetError:
            if len(settings) == 1:
                raise
            continue  # nothing to quantise here: the other settings still stand
        found.append((setting, estimate))
    return found
