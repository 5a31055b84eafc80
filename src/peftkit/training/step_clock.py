"""Per-step wall time and tokens of a training run, so a reader can take a steady-state median
(`peftkit compare` does) instead of one average over warm-up, profiling and a shared machine's
slow moments."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Records, for every optimizer step, the seconds since the previous step's end (or the
    loop's start) and the training tokens collated in that interval."""

    def __init__(self) -> None:
        self.count: Callable[[], int] | None = None  # set once the trainer's counter exists
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.last = 0.0
        self.seen = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the clock at the loop's start."""
        self.last = time.perf_counter()
        self.seen = self.count() if self.count is not None else 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One step's seconds and tokens."""
        now = time.perf_counter()
        seen = self.count() if self.count is not None else 0
        self.seconds.append(now - self.last)
        self.tokens.append(seen - self.seen)
        self.last, self.seen = now, seen

    def report(self) -> dict[str, Any]:
        """The run summary's per-step record and the thread count it trained with."""
        return {
            "step_seconds": self.seconds,
            "step_tokens": self.tokens,
            "torch_threads": torch.get_num_threads(),
        }
