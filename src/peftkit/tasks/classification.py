"""Classification: a text column and a label column; a new head predicts the label, scored by
accuracy beside the majority-class baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.errors import DataError
from peftkit.tasks.base import Features, Rows, TaskData, TaskType, batches

if TYPE_CHECKING:
    from peftkit.recipe import TaskConfig


def _auto_class() -> Any:
    import transformers

    return transformers.AutoModelForSequenceClassification


def columns(task: TaskConfig) -> list[str]:
    """The text and label columns."""
    return [task.text_column, task.label_column]


def labels(task: TaskConfig, rows: Rows) -> list[str]:
    """The sorted class names found in the training rows."""
    return sorted({str(row[task.label_column]) for row in rows})


def features(rows: Rows, tokenizer: Any, task: TaskConfig, names: list[str]) -> Features:
    """input_ids, attention_mask and the label index of each (text, label) row, truncated."""
    index = {name: i for i, name in enumerate(names)}
    encoded = tokenizer(
        [str(row[task.text_column]) for row in rows], truncation=True, max_length=task.max_length
    )
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": index[str(row[task.label_column])]}
        for ids, mask, row in zip(
            encoded["input_ids"], encoded["attention_mask"], rows, strict=True
        )
    ]


def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """Tokenised features; refuses a single label or held-out labels never seen in training."""
    CLASSIFICATION.check_columns(task, train, held_out)
    names = labels(task, train)
    if len(names) < 2:
        raise DataError(f"Classification needs at least 2 labels; the training data has {names}.")
    unseen = sorted({str(row[task.label_column]) for row in held_out} - set(names))
    if unseen:
        raise DataError(
            f"Held-out labels {unseen} never occur in the training data (labels: {names})."
        )
    train_features = features(train, tokenizer, task, names)
    truncated = sum(len(f["input_ids"]) >= task.max_length for f in train_features)
    eval_features = features(held_out, tokenizer, task, names)
    return TaskData(train_features, eval_features, labels=names, truncated=truncated)


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
)
