"""What a recipe's task section says: the task type, where its examples come from, its columns
and lengths. Reading it imports no torch; the type's record (tasks/__init__.py) does the work."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from peftkit.checks import check_task_numbers
from peftkit.config import nearest
from peftkit.errors import ConfigError

# Every task type's name, in the order `peftkit methods` and the UI list them; each has its record
# in TASK_TYPES (tasks/__init__.py), which checks the two agree.
TASK_NAMES = ("classification", "causal-lm", "chat", "seq2seq")


def check_task_name(name: str) -> None:
    """Refuse an unknown task type, naming the nearest and the valid ones."""
    if name in TASK_NAMES:
        return
    guess = nearest(str(name), list(TASK_NAMES))
    hint = f" Did you mean '{guess}'?" if guess else ""
    raise ConfigError(f"Unknown task type '{name}'.{hint} Use one of: {', '.join(TASK_NAMES)}.")


@dataclass(frozen=True)
class TaskConfig:
    """What to learn: the task type and where its examples come from."""

    type: str = field(default="classification", metadata={"help": " | ".join(TASK_NAMES)})
    dataset: str | None = field(
        default=None, metadata={"help": "a bundled dataset name (e.g. amazon-reviews)"}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "your training data: CSV, JSON, JSONL or Parquet"}
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "held-out data; default: 10% split off train_file"}
    )
    encoding: str = field(
        default="utf-8",
        metadata={"help": "text encoding of CSV/JSON/JSONL files (e.g. latin-1, cp1252)"},
    )
    text_column: str = field(default="text", metadata={"help": "classification input column"})
    label_column: str = field(default="label", metadata={"help": "classification label column"})
    prompt_column: str = field(default="prompt", metadata={"help": "causal-LM prompt column"})
    response_column: str = field(
        default="response", metadata={"help": "causal-LM response column (the loss is on it)"}
    )
    source_column: str = field(default="source", metadata={"help": "seq2seq input column"})
    target_column: str = field(default="target", metadata={"help": "seq2seq output column"})
    max_length: int = field(default=128, metadata={"help": "tokens per example, after truncation"})
    metric: str | None = field(
        default=None,
        metadata={
            "help": "the headline metric; seq2seq: exact_match | token_f1 | rouge_l "
            "(default: accuracy, eval_loss, exact_match by task type)"
        },
    )
    max_new_tokens: int = field(
        default=32, metadata={"help": "seq2seq evaluation: most tokens generated per example"}
    )
    max_train_examples: int | None = field(
        default=None, metadata={"help": "use only the first N training examples"}
    )
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "evaluate on only the first N held-out examples"}
    )

    def __post_init__(self) -> None:
        check_task_name(self.type)  # an unknown name raises, naming the nearest and valid ones
        if self.dataset is None and self.train_file is None:
            raise ConfigError("The task needs a data source: set task.dataset or task.train_file.")
        if self.max_length < 8:
            raise ConfigError(f"task.max_length must be at least 8, got {self.max_length}.")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(
                f"task.encoding {self.encoding!r} is not a text encoding Python knows; use a name "
                "such as utf-8, latin-1 or cp1252."
            ) from None
        check_task_numbers(self)  # the other numbers: finite, in range (checks.py)
