"""The trainers of the task types that do not train on their features' token loss. A task
record says which objective it trains with (`TaskType.trainer`: "preference", "kto", "grpo");
this table, on the training side, maps that name to the builder of its Trainer. The task records
name nothing of training/: training/ imports them, never the other way."""

from __future__ import annotations

from collections.abc import Callable

from peftkit.errors import ConfigError
from peftkit.tasks.base import BuiltTrainer, TaskType, TrainerParts
from peftkit.training.grpo import build_grpo_trainer
from peftkit.training.kto import build_kto_trainer
from peftkit.training.preference import build_preference_trainer

Builder = Callable[[TrainerParts], BuiltTrainer]

# The objective a task record names -> the builder of its Trainer (TRL's, subclassed with
# PeftkitTrainer). A new objective registers its builder here.
TASK_TRAINERS: dict[str, Builder] = {
    "preference": build_preference_trainer,
    "kto": build_kto_trainer,
    "grpo": build_grpo_trainer,
}


def trainer_builder(task_type: TaskType) -> Builder | None:
    """The builder of a task type's own trainer; None: it trains with PeftkitTrainer."""
    if task_type.trainer is None:
        return None
    if task_type.trainer not in TASK_TRAINERS:
        raise ConfigError(
            f"Task type {task_type.name!r} trains with {task_type.trainer!r}, which has no "
            f"trainer builder (known: {', '.join(sorted(TASK_TRAINERS))}); register one in "
            "peftkit/training/task_trainers.py."
        )
    return TASK_TRAINERS[task_type.trainer]
