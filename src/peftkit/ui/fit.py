"""Whether a run's training step fits this machine: the memory estimator's peak for the recipe's
model, task, method, batch and length (memory/estimate.py), against the memory free now (the
GPU's when training would use one, else the system's MemAvailable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.recipe import Recipe

MEMINFO = Path("/proc/meminfo")
# What estimate() calls a recipe's training.precision (mixed bf16 keeps fp32 master weights).
PRECISION_NAMES = {"fp32": "fp32", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class Fit:
    """An estimate and the memory it is measured against."""

    estimate: Any  # memory.estimate.MemoryEstimate
    available: int | None  # bytes free on the device that would train; None: unknown
    device: str

    @property
    def fits(self) -> bool | None:
        """Whether the estimated peak is below the free memory (None: free memory unknown)."""
        return None if self.available is None else self.estimate.total <= self.available

    def markdown(self) -> str:
        """The verdict and the estimate by part, for the page."""
        from peftkit.memory.estimate import gib

        if self.fits is None:
            verdict = f"Estimated peak {gib(self.estimate.total)}; free memory unknown here."
        else:
            word = "fits" if self.fits else "does NOT fit"
            verdict = (f"**{word}**: estimated peak {gib(self.estimate.total)} of "
                       f"{gib(self.available)} free ({self.device}).")  # fmt: skip
        return f"{verdict}\n\n```\n{self.estimate}\n```"


def available_memory(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where the file is missing)."""
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    return None


def free_device_memory() -> tuple[int | None, str]:
    """Free bytes where training would run: the first GPU if torch sees one, else system RAM."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return int(free), f"GPU 0, {torch.cuda.get_device_name(0)}"
    return available_memory(), "system memory, MemAvailable"


def check_fit(recipe: Recipe) -> Fit:
    """Estimate the recipe's training step and compare it with the memory free now."""
    from peftkit.memory.estimate import estimate

    result = estimate(
        recipe.model, dict(recipe.method), recipe.training.batch_size, recipe.task.max_length,
        PRECISION_NAMES[recipe.training.precision], task=recipe.task.type,
        task_options=recipe.task_options,
    )  # fmt: skip
    available, device = free_device_memory()
    return Fit(result, available, device)
