"""Training memory counted at the allocator, on a CPU: the peak of live tensor bytes over the first
optimizer steps of a run, gradients, optimizer state, saved activations and temporaries included.

Why not the resident set alone: glibc keeps freed blocks and reuses them, so the resident growth
over a training loop depends on what the allocator happened to keep (on the demo task a LoRA run
grew by more than full fine-tuning's, while its tensors peaked at about two thirds of full's).
torch's CPU allocator keeps no peak statistics, but its profiler reports every allocation and free
with its size; summing them in time order gives the exact peak. Profiling costs time, so only a
short window is profiled (the first steps: the optimizer state is created in the first) and the
window's time is reported so the throughput can leave it out. A GPU needs none of this: the CUDA
allocator's own peak is exact (see measure.py)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from peftkit.training.measure import TrainingMemory, mib, optimizer_state_bytes


def peak_of_allocations(sizes: list[int]) -> int:
    """The highest running total of signed allocation sizes (frees negative), at least 0."""
    total = peak = 0
    for size in sizes:
        total += size
        peak = max(peak, total)
    return peak


def _live_training_bytes(model: Any, optimizer: Any) -> int:
    """Gradients and optimizer state already held when the window opens (a resumed run)."""
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None) if model else 0
    return grads + (optimizer_state_bytes(optimizer) if optimizer is not None else 0)


class TensorMemoryProbe(TrainerCallback):
    """Profiles allocations over the first `steps` optimizer steps; `bytes` is their peak."""

    def __init__(self, steps: int = 2) -> None:
        self.steps = steps
        self.enabled = not torch.cuda.is_available()  # on a GPU the CUDA allocator's peak is used
        self.profiler: profile | None = None
        self.first_step = 0
        self.started = 0.0
        self.held = 0
        self.bytes: int | None = None
        self.seconds = 0.0  # wall time of the profiled window
        self.window_steps = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the window at the first step this process runs."""
        if not self.enabled or self.profiler is not None or self.bytes is not None:
            return
        self.held = _live_training_bytes(kwargs.get("model"), kwargs.get("optimizer"))
        self.first_step = state.global_step
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.started = time.perf_counter()
        self.profiler.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the window after `steps` optimizer steps."""
        if self.profiler is not None and state.global_step - self.first_step >= self.steps:
            self._close(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A run shorter than the window closes it at its end."""
        if self.profiler is not None:
            self._close(state.global_step)

    def _close(self, step: int) -> None:
        """Stop profiling and sum the allocations in time order."""
        assert self.profiler is not None
        self.profiler.stop()
        self.seconds = time.perf_counter() - self.started
        self.window_steps = step - self.first_step
        events = [
            event
            for event in self.profiler.profiler.kineto_results.events()
            if event.name() == "[memory]"
        ]
        events.sort(key=lambda event: event.start_ns())
        self.bytes = self.held + peak_of_allocations([event.nbytes() for event in events])
        self.profiler = None

    @property
    def measure(self) -> str:
        """How it was measured, for the run's summary."""
        return (
            f"peak of live tensor bytes over the first {self.window_steps} optimizer steps "
            "(torch profiler allocation events)"
        )

    def report(
        self, resident: TrainingMemory, tokens: int, seconds: float, steps: int
    ) -> dict[str, Any]:
        """The run summary's training memory and throughput; the throughput leaves out the
        profiled window (profiling slows its steps), taking its steps to carry average tokens."""
        measured = self.bytes is not None
        timed_steps = max(steps - self.window_steps, 1)
        timed_tokens = tokens * timed_steps / max(steps, 1) if measured else tokens
        timed_seconds = max(seconds - self.seconds, 1e-9) if measured else max(seconds, 1e-9)
        return {
            "training_memory_mib": mib(self.bytes if measured else resident.bytes),
            "training_memory_measure": self.measure if measured else resident.measure,
            "training_resident_mib": mib(resident.bytes),
            "tokens_per_second": timed_tokens / timed_seconds,
        }
