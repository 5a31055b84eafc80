"""Task types: one record per type (classification, causal-lm, chat, seq2seq, preference, kto,
grpo) and one list.

Everything peftkit knows about a task type (its transformers Auto class, the columns it reads,
its labels, how its loss is normalised, how it is scored, whether it generates text) is in its
record; the training pipeline, the model loader, the estimator and the CLI ask the record."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.errors import ConfigError, DataError
from peftkit.tasks.base import Rows, TaskData, TaskType, higher_is_better, read_split
from peftkit.tasks.causal_lm import CAUSAL_LM
from peftkit.tasks.chat import CHAT
from peftkit.tasks.classification import CLASSIFICATION
from peftkit.tasks.config import TASK_NAMES, check_task_name
from peftkit.tasks.grpo import GRPO
from peftkit.tasks.kto import KTO
from peftkit.tasks.preference import PREFERENCE
from peftkit.tasks.seq2seq import SEQ2SEQ

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig

TASK_TYPES: dict[str, TaskType] = {
    task.name: task for task in [CLASSIFICATION, CAUSAL_LM, CHAT, SEQ2SEQ, PREFERENCE, KTO, GRPO]
}
# config.py names the types so that a recipe is checked without importing torch: the same list.
assert tuple(TASK_TYPES) == TASK_NAMES, "tasks/config.py's TASK_NAMES must list TASK_TYPES"

__all__ = [
    "TASK_TYPES", "Rows", "TaskData", "TaskType", "get_task_type", "higher_is_better",
    "split_rows",
]  # fmt: skip


def task_names() -> list[str]:
    """Every task type's name, in list order."""
    return list(TASK_TYPES)


def get_task_type(name: str) -> TaskType:
    """The task type called `name`, or an error naming the nearest and the valid ones."""
    check_task_name(name)
    return TASK_TYPES[name]


def split_rows(task: TaskConfig) -> tuple[Rows, Rows]:
    """(train rows, held-out rows) of the task's data, each file checked by its task type."""
    return read_split(task, get_task_type(task.type))


def headline_metric(task: TaskConfig) -> str:
    """The metric the summary leads with: the recipe's choice, checked, or the type's default."""
    task_type = get_task_type(task.type)
    if task.metric is None:
        return task_type.metric
    if task.metric not in task_type.metrics:
        raise ConfigError(
            f"task.metric '{task.metric}' is not reported for {task.type} tasks; "
            f"choose one of: {', '.join(task_type.metrics)}."
        )
    return task.metric


def prepare_task(task: TaskConfig, tokenizer: Any) -> TaskData:
    """Read and tokenise the task's data."""
    train, held_out = split_rows(task)
    if not held_out:
        raise DataError("The held-out split is empty: give eval_file or more training rows.")
    return get_task_type(task.type).prepare(task, tokenizer, train, held_out)
