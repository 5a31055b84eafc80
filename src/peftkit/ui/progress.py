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


# Terminal escape sequences (colours, cursor moves) that a log holds and a text box cannot show.
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def clean_output(text: str) -> str:
    """A process's output without terminal colour codes and other escape sequences."""
    return _ESCAPES.sub("", text)


_INTERRUPTED = re.compile(
    r"Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*KeyboardInterrupt[^\n]*"
)


def without_interrupt_traceback(text: str) -> str:
    """Output with the traceback that Stop's interrupt prints (KeyboardInterrupt) cut to one
    line: it is how the run was asked to end, not an error."""
    return _INTERRUPTED.sub("KeyboardInterrupt (stopped)", text)


@dataclass(frozen=True)
class Progress:
    """Steps done of the total, and the time spent and left by the bar's own account."""

    step: int
    total: int
    elapsed: str
    remaining: str  # "?" before the first step

    def __str__(self) -> str:
        return self.describe()

    def describe(self, time_left: bool = True) -> str:
        """The bar as words (step 13/20, 00:10 so far, about 00:06 left); the time left only
        when asked (not for a run that has ended)."""
        left = "" if self.remaining == "?" or not time_left else f", about {self.remaining} left"
        return f"step {self.step}/{self.total} ({self.elapsed} so far{left})"


def training_progress(log_text: str) -> Progress | None:
    """The latest state of Trainer's progress bar in a training log, if it has one yet."""
    bars = _BAR.findall(log_text)
    if not bars:
        return None
    step, total, elapsed, remaining = bars[-1]
    return Progress(int(step), int(total), elapsed, remaining)


# What `peftkit train` prints once the model is loaded and scored, just before Trainer starts.
TRAINING_STARTS = "trainable parameters:"


def training_phase(log_text: str, progress: Progress | None) -> str:
    """What a running training is doing, from its output: the long quiet phases before the first
    step (loading, scoring the model before training) and after the last (scoring it after)."""
    if progress is None:
        if TRAINING_STARTS in log_text:
            return "starting to train"
        return "loading the model and data, then scoring the model before training"
    if progress.step >= progress.total:
        return "trained: scoring the tuned model on the held-out rows"
    return "training"


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
