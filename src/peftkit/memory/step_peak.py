"""The measured peak of one real training step on the CPU, to hold the estimator against.

CPU has no `max_memory_allocated`, and the process's resident size counts the Python heap and
memory the C allocator keeps after torch frees it. So: run one step first (AdamW makes its state),
count exactly what is live before the second step (the storages of parameters, buffers and
optimizer state), then add the peak of the running sum of the allocation and free events
`torch.profiler` records during the second step. Allocation sizes do not depend on timing, so the
number repeats to the byte, run to run."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile


def live_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind some tensors."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_peak_bytes(
    model: nn.Module,
    inputs: dict[str, Any],
    loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> int:
    """Peak bytes of live tensors during one AdamW step of `model` (its trainable parameters) on
    `inputs` (a batch with labels), its loss `loss(model, inputs)` (default: the model's own)."""
    loss = loss if loss is not None else (lambda m, batch: m(**batch).loss)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        loss(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    before = live_bytes([*model.parameters(), *model.buffers(), *state])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return before + peak
