"""What a run cost: peak memory, optimizer-state bytes, throughput, file sizes."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes() -> int:
    """Peak memory so far: CUDA's allocator peak on a GPU, else the process's peak resident set."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes held by an optimizer's state tensors (Adam's moments and step counts)."""
    if optimizer is None:
        return 0
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files in a folder (an adapter's size on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def mib(count: int) -> float:
    """Bytes as MiB."""
    return count / 2**20
