"""How far a training process has got, read from what it writes anyway: the step counter and time
left from Trainer's progress bar in its output, and the loss curve from the TensorBoard event
files `training.report_to: tensorboard` writes into the run's logs/ folder (the numbers Trainer
itself logged, at their steps)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Trainer's bar has no description: "40%|####      | 40/100 [00:08<00:12,  4.93it/s]". Bars with
# one (transformers' "Loading weights: ...") are not the training's.
_BAR = re.compile(r"(?:^|[\r\n])[ \t]*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)\s*\[([0-9:]+)<([0-9:?]+)")


@dataclass(frozen=True)
class Progress:
    """Steps done of the total, and the time spent and left by the bar's own account."""

    step: int
    total: int
    elapsed: str
    remaining: str  # "?" before the first step

    def __str__(self) -> str:
        left = "" if self.remaining == "?" else f", about {self.remaining} left"
        return f"step {self.step}/{self.total} ({self.elapsed} so far{left})"


def training_progress(log_text: str) -> Progress | None:
    """The latest state of Trainer's progress bar in a training log, if it has one yet."""
    bars = _BAR.findall(log_text)
    if not bars:
        return None
    step, total, elapsed, remaining = bars[-1]
    return Progress(int(step), int(total), elapsed, remaining)


def loss_curve(run: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """(step, loss) as Trainer logged them to TensorBoard in `run/logs` (empty before the first
    logged step, or when the run does not report to TensorBoard)."""
    logs = run / "logs"
    if not logs.is_dir() or not any(logs.rglob("events.out.tfevents.*")):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    # One event file per process start: a resumed run adds one; later files win for a step.
    for folder in sorted({path.parent for path in logs.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags().get("scalars", []):
            points.update({event.step: event.value for event in events.Scalars(tag)})
    return sorted(points.items())
