"""Range checks for the numbers a recipe or config holds: each refuses a value with a ConfigError
that names the key, the value and the range it must lie in. Light (no torch), so a recipe is
checked whole when it is read, before anything heavy loads."""

from __future__ import annotations

import math
from numbers import Real

from peftkit.errors import ConfigError


def check_finite(key: str, value: float | int | None) -> None:
    """Refuse inf, -inf and nan (None: the key is unset, which its default allows)."""
    if value is None:
        return
    if isinstance(value, Real) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}.")


def check_range(
    key: str,
    value: float | int | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a non-finite value, or one outside [low, high] (an open end excludes its bound;
    None: no bound on that side). None as the value means unset and passes."""
    if value is None:
        return
    check_finite(key, value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        allowed = _describe(low, high, low_open, high_open)
        raise ConfigError(f"{key} must be {allowed}, got {value}.")


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The allowed range in words: 'at least 1', 'above 0', 'in [0, 1]'."""
    if high is None:
        return f"above {_show(low)}" if low_open else f"at least {_show(low)}"
    if low is None:
        return f"below {_show(high)}" if high_open else f"at most {_show(high)}"
    return f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"


def _show(bound: float | None) -> str:
    """A bound as the user would write it (1, not 1.0)."""
    return str(int(bound)) if bound is not None and float(bound).is_integer() else str(bound)


def check_task_numbers(task: object) -> None:
    """The range of each number of a task section (TaskConfig): example counts and lengths."""
    check_range("task.max_length", getattr(task, "max_length", None), 8)
    check_range("task.max_new_tokens", getattr(task, "max_new_tokens", None), 1)
    check_range("task.max_train_examples", getattr(task, "max_train_examples", None), 1)
    check_range("task.max_eval_examples", getattr(task, "max_eval_examples", None), 1)
