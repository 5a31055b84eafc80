"""What a run cost: peak memory, the memory training itself took, optimizer-state bytes, file
sizes.

The training memory a run reports is counted at the allocator: on a GPU the CUDA allocator's peak
over the loop minus what was allocated before; on a CPU the peak of live tensor bytes over the
first optimizer steps (memory_probe.py). `TrainingMemory` here adds the resident view on a CPU:
the kernel's resident high-water mark over the loop (VmHWM, reset just before it through
/proc/self/clear_refs, Linux 4.0 and later) minus the resident set before it. That one counts
every allocation, libraries' included, and also what glibc kept from freed blocks, so it says what
the process grew by, not what a method needs; runs report it as `training_resident_mib`."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import torch


def peak_memory_bytes() -> int:
    """Peak memory so far: CUDA's allocator peak on a GPU, else the process's peak resident set."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _status_bytes(field: str) -> int | None:
    """A size from /proc/self/status (VmRSS, VmHWM), in bytes; None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _reset_resident_peak() -> bool:
    """Set the kernel's resident high-water mark to the current resident set (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


class TrainingMemory:
    """Measures the memory a block of work takes beyond what was resident (or allocated, on a
    GPU) when it started: `with TrainingMemory() as memory: ...; memory.bytes`. `exact` is False
    where the peak could not be reset (not Linux): the process peak is used, loading included."""

    def __init__(self) -> None:
        self.start = 0
        self.peak = 0
        self.exact = True
        self.gpu = torch.cuda.is_available()

    def __enter__(self) -> TrainingMemory:
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = int(torch.cuda.memory_allocated())
        else:
            self.start = _status_bytes("VmRSS") or 0
            self.exact = _reset_resident_peak() and _status_bytes("VmHWM") is not None
        return self

    def __exit__(
        self, kind: type | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.gpu:
            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self.peak = (_status_bytes("VmHWM") if self.exact else None) or peak_memory_bytes()

    @property
    def bytes(self) -> int:
        """Peak during the block minus the level at its start."""
        return max(0, self.peak - self.start)

    @property
    def measure(self) -> str:
        """How it was measured, for the run's summary."""
        if self.gpu:
            return "CUDA allocator peak minus allocated before training"
        if self.exact:
            return "resident high-water mark (reset before training) minus resident before"
        return "process peak resident set minus resident before training (peak not resettable)"


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes held by an optimizer's state tensors (Adam's moments and step counts)."""
    if optimizer is None:
        return 0
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value  # a shard
                total += local.numel() * local.element_size()
    return total


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files in a folder (an adapter's size on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def mib(count: int) -> float:
    """Bytes as MiB."""
    return count / 2**20


def estimated_training_memory(recipe: Any, features: list[dict[str, Any]]) -> dict[str, Any]:
    """What peftkit's estimator predicts for this run's training memory: its peak beyond the
    weights (which were resident before training started, so the measured figure leaves them
    out, and so does a frozen reference copy made before it), for the recipe's model, task (with
    its section: preference, kto, grpo), method and batch size at the longest training example
    (grpo: the longest prompt; the estimate adds the completion). None, with the reason, where
    the estimator cannot size the model."""
    from peftkit.errors import PeftkitError
    from peftkit.memory.estimate import estimate

    longest = max((len(f["input_ids"]) for f in features), default=1)
    # training.precision bf16 is autocast over fp32 weights, gradients and AdamW state: the fp32
    # accounting, whose fp32 activations are then an upper bound.
    dtype = "fp32"
    try:
        base, training = recipe.base, recipe.training
        found = estimate(recipe.model, dict(recipe.method), training.batch_size, longest, dtype,
                         training.gradient_checkpointing, task=recipe.task.type,
                         base_dtype=base.dtype, quantization=base.quantize,
                         task_options=recipe.task_options)  # fmt: skip
    except (PeftkitError, OSError, ValueError) as error:
        return {"estimated_training_memory_mib": None, "estimate_note": str(error)}
    return {
        "estimated_training_memory_mib": mib(
            int(found.total - found.weights - found.reference_copy)
        ),
        "estimated_peak_mib": mib(int(found.total)),
        "estimate_settings": {
            "batch_size": recipe.training.batch_size,
            "seq_len": longest,
            "dtype": dtype,
            "base_dtype": recipe.base.dtype,
            "quantization": recipe.base.quantize,
            "gradient_checkpointing": recipe.training.gradient_checkpointing,
        },  # fmt: skip
    }
