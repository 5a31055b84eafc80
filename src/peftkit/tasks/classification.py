"""Classification: a text column and a label column; a new head predicts the label, scored by
accuracy beside the majority-class baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.data.files import is_blank, name_rows, require_columns
from peftkit.errors import DataError
from peftkit.tasks.base import Features, Rows, TaskData, TaskType, batches

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig


def _auto_class() -> Any:
    import transformers

    return transformers.AutoModelForSequenceClassification


def columns(task: TaskConfig) -> list[str]:
    """The text and label columns."""
    return [task.text_column, task.label_column]


def check_rows(task: TaskConfig, rows: Rows, source: str) -> None:
    """Both columns present, and a label in every row: an empty label cell would otherwise
    become a class of its own. (A row with empty text is dropped, and counted, by prepare.)"""
    require_columns(rows, columns(task), source, values=False)
    empty = [i for i, row in enumerate(rows) if is_blank(row.get(task.label_column))]
    if empty:
        raise DataError(
            f"{source}: {len(empty)} of {len(rows)} rows have an empty '{task.label_column}' "
            f"cell ({name_rows(empty)}, counting from 0). Give every row a label, or remove "
            "those rows."
        )


def with_text(rows: Rows, task: TaskConfig) -> Rows:
    """The rows whose text cell holds something (an empty input has nothing to classify)."""
    return [row for row in rows if not is_blank(row.get(task.text_column))]


def label_name(value: Any) -> str:
    """A label cell as its class name: surrounding spaces stripped, and a whole number the same
    whatever its type (JSON 1, 1.0 and "1", CSV 1 and " 1" are one class, "1")."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def labels(task: TaskConfig, rows: Rows) -> list[str]:
    """The sorted class names found in the training rows that have text (the rows it trains on)."""
    return sorted({label_name(row[task.label_column]) for row in with_text(rows, task)})


def report_respelt_labels(task: TaskConfig, rows: Rows) -> None:
    """Say (on stderr) which label spellings were read as one class by label_name, if any."""
    import sys

    respelt: dict[str, set[str]] = {}
    for row in rows:
        raw = row[task.label_column]
        if str(raw) != label_name(raw):
            respelt.setdefault(label_name(raw), set()).add(repr(raw))
    if respelt:
        examples = "; ".join(
            f"{', '.join(sorted(spellings))} as {name!r}"
            for name, spellings in sorted(respelt.items())[:5]
        )
        print(
            f"peftkit: note: labels are read with surrounding spaces stripped and whole numbers "
            f"as integers: {examples}",
            file=sys.stderr,
        )


def features(rows: Rows, tokenizer: Any, task: TaskConfig, names: list[str]) -> Features:
    """input_ids, attention_mask and the label index of each (text, label) row, truncated."""
    index = {name: i for i, name in enumerate(names)}
    encoded = tokenizer(
        [str(row[task.text_column]) for row in rows], truncation=True, max_length=task.max_length
    )
    return [
        {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": index[label_name(row[task.label_column])],
        }
        for ids, mask, row in zip(
            encoded["input_ids"], encoded["attention_mask"], rows, strict=True
        )
    ]


def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """Tokenised features; refuses a single label or held-out labels never seen in training.
    Rows with empty text are dropped and counted."""
    check_rows(task, train, "the training data")
    check_rows(task, held_out, "the held-out data")
    kept, kept_held_out = with_text(train, task), with_text(held_out, task)
    for rows, what in ((kept, "training"), (kept_held_out, "held-out")):
        if not rows:
            raise DataError(
                f"Every {what} row has an empty '{task.text_column}' cell: there is no text to "
                "classify. Check task.text_column names the column that holds the text."
            )
    dropped, dropped_eval = len(train) - len(kept), len(held_out) - len(kept_held_out)
    train, held_out = kept, kept_held_out
    names = labels(task, train)
    if len(names) < 2:
        raise DataError(f"Classification needs at least 2 labels; the training data has {names}.")
    report_respelt_labels(task, train + held_out)
    unseen = sorted({label_name(row[task.label_column]) for row in held_out} - set(names))
    if unseen:
        raise DataError(
            f"Held-out labels {unseen} never occur in the training data (labels: {names})."
        )
    train_features = features(train, tokenizer, task, names)
    truncated = sum(len(f["input_ids"]) >= task.max_length for f in train_features)
    eval_features = features(held_out, tokenizer, task, names)
    return TaskData(
        train_features, eval_features, labels=names, truncated=truncated, dropped=dropped,
        dropped_eval=dropped_eval,
    )  # fmt: skip


def accuracy(model: nn.Module, data: TaskData, collator: Any, batch_size: int) -> dict[str, float]:
    """Classification accuracy on the held-out features, and the majority-class baseline."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in batches(data.eval, collator, batch_size):
            predicted = model(**batch).logits.argmax(-1)
            correct += int((predicted == batch["labels"]).sum())
    counts = [sum(f["labels"] == i for f in data.eval) for i in range(len(data.labels))]
    total = max(1, len(data.eval))
    return {"accuracy": correct / total, "majority_baseline": max(counts) / total}


CLASSIFICATION = TaskType(
    name="classification",
    description="text -> one of the labels, through a new classification head",
    auto_class=_auto_class,
    model_needs="a model with a sequence-classification head (BERT, GPT-2, Llama, T5, ...)",
    columns=columns,
    prepare=prepare,
    evaluate=accuracy,
    metric="accuracy",
    metrics=("accuracy",),
    labels=labels,
    row_check=check_rows,
)
