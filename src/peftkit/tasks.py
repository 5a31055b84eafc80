"""Task types: how each one reads its rows, builds features, and scores a model before and after.

A task type is a small record of functions, like a Method; the pipeline in train.py is generic."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.data import tokenize
from peftkit.data.bundled import load_bundled
from peftkit.data.files import read_rows, require_columns
from peftkit.errors import ConfigError, DataError
from peftkit.recipe import TaskConfig

Rows = list[dict[str, Any]]


@dataclass
class TaskData:
    """Tokenised train and held-out features, plus what evaluation and saving need to know."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)
    truncated: int = 0  # examples cut to max_length (counted, reported in the summary)
    dropped: int = 0  # examples left with nothing to learn after truncation
    tokenizer: Any = None  # for evaluations that generate and decode text
    max_new_tokens: int = 32


def split_rows(task: TaskConfig) -> tuple[Rows, Rows]:
    """(train rows, held-out rows) from a bundled set or files; 10% held out if no eval file."""
    if task.dataset is not None:
        train, held_out = load_bundled(task.dataset)
    else:
        train = read_rows(task.train_file)
        if task.eval_file is not None:
            held_out = read_rows(task.eval_file)
        else:
            if len(train) < 2:
                raise DataError(f"{task.train_file} needs at least 2 rows to split off eval rows.")
            shuffled = train[:]
            random.Random(0).shuffle(shuffled)
            cut = max(1, len(shuffled) // 10)
            held_out, train = shuffled[:cut], shuffled[cut:]
    if task.max_train_examples is not None:
        train = train[: task.max_train_examples]
    if task.max_eval_examples is not None:
        held_out = held_out[: task.max_eval_examples]
    return train, held_out


def _classification(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    columns = [task.text_column, task.label_column]
    require_columns(train, columns, "the training data")
    require_columns(held_out, columns, "the held-out data")
    labels = sorted({str(row[task.label_column]) for row in train})
    if len(labels) < 2:
        raise DataError(f"Classification needs at least 2 labels; the training data has {labels}.")
    unseen = sorted({str(row[task.label_column]) for row in held_out} - set(labels))
    if unseen:
        raise DataError(
            f"Held-out labels {unseen} never occur in the training data (labels: {labels})."
        )

    def build(rows: Rows) -> list[dict[str, Any]]:
        return tokenize.classification_features(
            rows, tokenizer, task.text_column, task.label_column, labels, task.max_length
        )

    train_features = build(train)
    truncated = sum(len(f["input_ids"]) >= task.max_length for f in train_features)
    return TaskData(train_features, build(held_out), labels=labels, truncated=truncated)


def _pairs(
    task: TaskConfig, rows: Rows, columns: list[str], make: Callable[..., Any], tokenizer: Any
) -> tuple[list[dict[str, Any]], int, int]:
    """Features from the (input, output) columns of each row, counting truncations and drops."""
    features, truncated, dropped = [], 0, 0
    for row in rows:
        feature = make(tokenizer, str(row[columns[0]]), str(row[columns[1]]), task.max_length)
        if feature is None:
            dropped += 1
            continue
        truncated += feature.pop("truncated", len(feature["input_ids"]) >= task.max_length)
        features.append(feature)
    return features, truncated, dropped


def _paired(source: str, make: Callable[..., Any]) -> Callable[..., TaskData]:
    def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
        columns = (
            [task.prompt_column, task.response_column]
            if source == "prompt"
            else [task.source_column, task.target_column]
        )
        require_columns(train, columns, "the training data")
        require_columns(held_out, columns, "the held-out data")
        train_features, truncated, dropped = _pairs(task, train, columns, make, tokenizer)
        eval_features, _, _ = _pairs(task, held_out, columns, make, tokenizer)
        if not train_features:
            raise DataError(
                f"No training example keeps a response token within max_length={task.max_length}; "
                "raise task.max_length or shorten the prompts."
            )
        return TaskData(
            train_features, eval_features, truncated=truncated, dropped=dropped,
            tokenizer=tokenizer, max_new_tokens=task.max_new_tokens,
        )  # fmt: skip

    return prepare


def _chat_features(task: TaskConfig, tokenizer: Any, rows: Rows, name: str):
    """Chat features of every row, counting truncations and rows left with no answer token."""
    from peftkit.apps.instructions import chat_feature, to_messages

    features, truncated, dropped = [], 0, 0
    for index, row in enumerate(rows):
        # to_messages names the row and turn of a bad record (unknown role, no final answer).
        messages = to_messages(row, f"{name}, row {index}")
        feature = chat_feature(messages, tokenizer, task.max_length)
        if feature is None:
            dropped += 1
            continue
        truncated += len(feature["input_ids"]) >= task.max_length
        features.append(feature)
    return features, truncated, dropped


def _chat(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """Conversations (chat, Alpaca, ShareGPT or prompt/response records) through the chat
    template, with the loss on assistant turns only; see peftkit.apps.instructions."""
    train_features, truncated, dropped = _chat_features(task, tokenizer, train, "training data")
    eval_features, _, _ = _chat_features(task, tokenizer, held_out, "held-out data")
    if not train_features:
        raise DataError(
            f"No training conversation keeps an assistant token within "
            f"max_length={task.max_length}; raise task.max_length."
        )
    if not eval_features:
        raise DataError(
            f"No held-out conversation keeps an assistant token within "
            f"max_length={task.max_length}; raise task.max_length."
        )
    return TaskData(
        train_features, eval_features, truncated=truncated, dropped=dropped,
        tokenizer=tokenizer, max_new_tokens=task.max_new_tokens,
    )  # fmt: skip


def _batches(features: list[dict[str, Any]], collator: Any, size: int):
    for start in range(0, len(features), size):
        yield collator(features[start : start + size])


def accuracy(model: nn.Module, data: TaskData, collator: Any, batch_size: int) -> dict[str, float]:
    """Classification accuracy on the held-out features, and the majority-class baseline."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in _batches(data.eval, collator, batch_size):
            predicted = model(**batch).logits.argmax(-1)
            correct += int((predicted == batch["labels"]).sum())
    counts = [sum(f["labels"] == i for f in data.eval) for i in range(len(data.labels))]
    total = max(1, len(data.eval))
    return {"accuracy": correct / total, "majority_baseline": max(counts) / total}


def token_loss(
    model: nn.Module, data: TaskData, collator: Any, batch_size: int
) -> dict[str, float]:
    """Mean cross-entropy over the labelled (response) tokens, and its perplexity."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in _batches(data.eval, collator, batch_size):
            labels = batch["labels"]
            # A causal model predicts token t+1 from t: its loss averages over labels[:, 1:].
            scored = labels[:, 1:] if _is_causal(model) else labels
            tokens = max(int((scored != -100).sum()), 1)
            total_loss += float(model(**batch).loss) * tokens
            total_tokens += tokens
    loss = total_loss / max(1, total_tokens)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def generation_scores(
    model: nn.Module, data: TaskData, collator: Any, batch_size: int
) -> dict[str, float]:
    """Greedy generation from each source, scored against its reference text; plus the loss."""
    from peftkit.metrics import score_texts

    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for start in range(0, len(data.eval), batch_size):
            chunk = data.eval[start : start + batch_size]
            batch = collator(chunk)
            generated = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                max_new_tokens=data.max_new_tokens, do_sample=False,
            )  # fmt: skip
            predictions += data.tokenizer.batch_decode(generated, skip_special_tokens=True)
            references += [feature["reference"] for feature in chunk]
    return {**score_texts(predictions, references), **token_loss(model, data, collator, batch_size)}


def _is_causal(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return not getattr(config, "is_encoder_decoder", False)


@dataclass(frozen=True)
class TaskType:
    """How one task type prepares data and which metric it reports first."""

    name: str
    prepare: Callable[[TaskConfig, Any, Rows, Rows], TaskData]
    evaluate: Callable[[nn.Module, TaskData, Any, int], dict[str, float]]
    metric: str
    higher_is_better: bool
    metrics: tuple[str, ...] = ()  # every metric evaluate() reports (a recipe may pick one)


TASK_TYPES = {
    "classification": TaskType(
        "classification", _classification, accuracy, "accuracy", True, ("accuracy",)
    ),
    "causal-lm": TaskType(
        "causal-lm",
        _paired("prompt", tokenize.prompt_response_feature),
        token_loss,
        "eval_loss",
        False,
        ("eval_loss", "perplexity"),
    ),
    "chat": TaskType("chat", _chat, token_loss, "eval_loss", False, ("eval_loss", "perplexity")),
    "seq2seq": TaskType(
        "seq2seq",
        _paired("source", tokenize.seq2seq_feature),
        generation_scores,
        "exact_match",
        True,
        ("exact_match", "token_f1", "rouge_l", "eval_loss", "perplexity"),
    ),
}


def headline_metric(task: TaskConfig) -> str:
    """The metric the summary leads with: the recipe's choice, checked, or the type's default."""
    task_type = TASK_TYPES[task.type]
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
    return TASK_TYPES[task.type].prepare(task, tokenizer, train, held_out)
