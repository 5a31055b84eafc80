"""Reward functions for GRPO (task.type: grpo), by name: the recipe's `task.rewards`.

A name is one of:

- `format`: 1.0 when the whole completion matches `task.format_pattern` (a regular expression,
  DOTALL), else 0.0;
- a name an application registered with `register_reward` (the Text-to-SQL application registers
  `sql-execution` from its own package: the core names no application);
- an import path `module:function` to a user's own function.

Every reward is called as `function(prompts=..., completions=..., **columns)`: prompts and
completions as text (a conversation's completion is its assistant text), and every other column
of the data rows as a list, one value per completion (TRL's GRPOTrainer adds `completion_ids`,
`trainer_state`, `log_extra` and `log_metric`; accept `**kwargs`). It returns one number per
completion. A function that raises, or returns anything else, is a `RewardError` naming it."""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from peftkit.errors import RewardError

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig

RewardFunction = Callable[..., Sequence[Any]]

# name -> reward function; the core's own (`format`) is built from the task (its pattern).
_REWARDS: dict[str, RewardFunction] = {}
BUILT_IN = ("format",)


def register_reward(name: str, function: RewardFunction) -> None:
    """Add a named reward. Registering the same function again is a no-op; another function
    under a taken name is refused."""
    if name in BUILT_IN or _REWARDS.get(name, function) is not function:
        raise RewardError(f"A reward named '{name}' is already registered.")
    _REWARDS[name] = function


def reward_names() -> list[str]:
    """The rewards a recipe can name so far: the built-in ones, then the registered ones."""
    return [*BUILT_IN, *_REWARDS]


def completion_text(completion: Any) -> str:
    """A completion as text: a string as it is, a list of messages as its contents joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list | tuple):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def format_reward(pattern: str) -> RewardFunction:
    """1.0 for each completion that matches `pattern` as a whole (DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def matches_format(completions: list[str], **_: Any) -> list[float]:
        return [1.0 if compiled.fullmatch(text.strip()) else 0.0 for text in completions]

    return matches_format


def _imported(path: str) -> RewardFunction:
    """The function at `module:function`, or a RewardError saying why it cannot be had."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise RewardError(f"Reward {path!r}: write an import path as 'module:function'.")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - a user's module may fail in any way
        raise RewardError(
            f"Reward {path!r}: importing {module_name} failed ({type(error).__name__}: {error}). "
            "Make the module importable (on PYTHONPATH, or installed)."
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardError(f"Reward {path!r}: {module_name} has no function '{attribute}'.")
    return function


class CheckedReward:
    """A reward function called with text completions, its output checked: one finite number
    per completion, or a RewardError naming the function and what it did."""

    def __init__(self, name: str, function: RewardFunction) -> None:
        self.name = name
        self.__name__ = name  # TRL names its reward columns after __name__
        self.function = function

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        """The checked rewards of the completions."""
        texts = [completion_text(c) for c in completions]
        prompt_texts = [completion_text(p) for p in prompts]
        try:
            values = self.function(prompts=prompt_texts, completions=texts, **columns)
        except RewardError:
            raise
        except Exception as error:  # noqa: BLE001 - a user's function may fail in any way
            raise RewardError(
                f"Reward '{self.name}' raised {type(error).__name__}: {error}. Fix the function; "
                "it is called as f(prompts=..., completions=..., **columns) with one value per "
                "completion in every list."
            ) from error
        return self.check(values, len(texts))

    def check(self, values: Any, count: int) -> list[float]:
        """`values` as floats, if they are one finite number per completion."""
        if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
            raise RewardError(
                f"Reward '{self.name}' returned {type(values).__name__} {values!r:.80}; it must "
                f"return a list of {count} numbers, one per completion."
            )
        if len(values) != count:
            raise RewardError(
                f"Reward '{self.name}' returned {len(values)} values for {count} completions; "
                "return one number per completion."
            )
        bad = [
            (i, v) for i, v in enumerate(values)
            if not isinstance(v, numbers.Real) or not math.isfinite(float(v))
        ]  # fmt: skip
        if bad:
            index, value = bad[0]
            raise RewardError(
                f"Reward '{self.name}' returned {value!r} for completion {index} ({len(bad)} of "
                f"{count} values are not finite numbers); return a number for every completion."
            )
        return [float(v) for v in values]


def resolve_reward(name: str, task: TaskConfig) -> CheckedReward:
    """The checked reward function a recipe names."""
    if name == "format":
        return CheckedReward(name, format_reward(task.format_pattern))
    if name in _REWARDS:
        return CheckedReward(name, _REWARDS[name])
    if ":" in name:
        return CheckedReward(name, _imported(name))
    from peftkit.config import nearest

    guess = nearest(name, reward_names())
    hint = f" Did you mean '{guess}'?" if guess else ""
    raise RewardError(
        f"Unknown reward '{name}'.{hint} Known: {', '.join(reward_names())}; or give your own "
        "function as 'module:function'."
    )


def task_rewards(task: TaskConfig) -> tuple[list[CheckedReward], list[float]]:
    """(the task's reward functions, their weights: the recipe's, or all 1)."""
    rewards = [resolve_reward(name, task) for name in task.rewards]
    weights = list(task.reward_weights) or [1.0] * len(rewards)
    return rewards, weights
