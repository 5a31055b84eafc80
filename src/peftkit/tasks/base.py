"""The TaskType record and what every task type shares: reading rows, the tokenised data a run
trains on, batches, and the token-level loss.

A task type is a small record of functions, like a Method: the pipeline, the model loader, the
estimator and the CLI ask the record, never the type's name."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.data.bundled import load_bundled
from peftkit.data.files import read_rows, require_columns
from peftkit.errors import DataError

if TYPE_CHECKING:  # the recipe's section; recipe.py imports this package, not the other way
    from peftkit.tasks.config import TaskConfig

Rows = list[dict[str, Any]]
Features = list[dict[str, Any]]
LOWER_IS_BETTER = ("eval_loss", "perplexity")  # every other metric peftkit reports: higher


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of a metric is better (losses and perplexity: no)."""
    return metric not in LOWER_IS_BETTER


@dataclass
class TaskData:
    """Tokenised train and held-out features, plus what evaluation and saving need to know."""

    train: Features
    eval: Features
    labels: list[str] = field(default_factory=list)
    truncated: int = 0  # examples cut to max_length (counted, reported in the summary)
    # Training examples with nothing to learn: an empty input, or nothing left after truncation.
    dropped: int = 0
    dropped_eval: int = 0  # held-out examples with an empty input (they cannot be scored)
    tokenizer: Any = None  # for evaluations that generate and decode text
    max_new_tokens: int = 32
    # The rows, checked and normalised, for a task type whose trainer tokenises them itself
    # (preference: TRL's prompt/chosen/rejected text); `train` then holds what a method's
    # data-driven prepare hook and the estimator read (causal-LM features).
    train_records: Rows = field(default_factory=list)
    eval_records: Rows = field(default_factory=list)
    # grpo: the task's reward functions and their weights (tasks/rewards.py), which score its
    # held-out generations as they score its training ones.
    rewards: tuple[list[Any], list[float]] = field(default_factory=lambda: ([], []))


@dataclass
class TrainerParts:
    """What the training run hands a task type's own trainer builder (TaskType.trainer)."""

    recipe: Any  # the Recipe
    model: nn.Module  # the applied model (the method's record is on it: peftkit.api.applied)
    tokenizer: Any
    data: TaskData
    arguments: dict[str, Any]  # TrainingArguments' keyword values from the recipe
    callbacks: list[Any]
    hooks: Any  # the method's TrainingHooks
    resumed: bool  # the model was rebuilt from a checkpoint (not at its initialisation)


@dataclass
class BuiltTrainer:
    """A task type's trainer, the training tokens it has seen so far, and what the run's
    summary.json should say about how it trains (the preference reference model, ...)."""

    trainer: Any
    tokens_seen: Callable[[], int]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepShape:
    """How one optimizer step of a task type's own trainer runs, as the memory estimator models
    it (memory/task_step.py): which forward passes, over how many sequences, in which order.
    Every pass covers `sequences` sequences per batch row; a "reference" pass runs the reference
    model (the policy with its adapter switched off where the method's record can switch it
    off, else a frozen copy of the policy, whose weights then stay resident)."""

    # Sequences per batch row the policy forwards with gradient (DPO: chosen and rejected, 2).
    sequences: int = 1
    # No-gradient passes before that forward, in order, each "policy" or "reference" (KTO's
    # policy pass over its mismatched KL pairs; GRPO's reference log-probabilities).
    before: tuple[str, ...] = ()
    # No-gradient passes after it, while its activations are held for the backward pass (DPO's
    # and KTO's reference log-probabilities).
    after: tuple[str, ...] = ()
    # Tokens the policy generates per sequence before the step (GRPO's rollouts: the KV cache of
    # prompt + completion); the step's sequences are then the prompt plus these tokens.
    generated: int = 0

    @property
    def reference(self) -> bool:
        """Whether a reference model runs in the step."""
        return "reference" in self.before + self.after


@dataclass(frozen=True)
class TaskType:
    """Everything peftkit knows about one task type, in one place."""

    name: str
    description: str
    # The transformers Auto class that builds a model for this task (imported when called).
    auto_class: Callable[[], Any]
    # What a model must be to serve this task (for the error when it is not).
    model_needs: str
    # Required columns of a row, given the recipe's task section.
    columns: Callable[[TaskConfig], list[str]]
    # Tokenise rows into features (train, held-out), counting truncations and drops.
    prepare: Callable[[TaskConfig, Any, Rows, Rows], TaskData]
    # Score a model on the held-out features: {metric: value}.
    evaluate: Callable[[nn.Module, TaskData, Any, int], dict[str, float]]
    metric: str  # the headline metric
    metrics: tuple[str, ...]  # every metric evaluate() reports (a recipe may lead with one)
    # The class names a head must predict (classification); None: the model has no label head.
    labels: Callable[[TaskConfig, Rows], list[str]] | None = None
    # transformers' causal-LM heads divide their loss by the token count Trainer passes them;
    # other heads average per batch, and Trainer must then not rescale (see training/trainer.py).
    loss_per_token: bool = False
    # Whether a tuned model of this type answers by generating text (generate, serve, apps).
    generates: bool = False
    # Prompts for generation are rendered through the tokenizer's chat template.
    chat: bool = False
    # Refuse the rows of one data file this type cannot learn from, numbered as in the file
    # (task, rows, where they came from). None: every column() must hold a value in every row.
    row_check: Callable[[TaskConfig, Rows, str], None] | None = None
    # The objective of a type that does not train on its features' token loss, by name
    # ("preference", "kto", "grpo"): the training layer, which sits above the task records and
    # imports them, maps it to the builder of its Trainer (training/task_trainers.py), handing
    # it TrainerParts for a BuiltTrainer. None: PeftkitTrainer on the features' token loss.
    trainer: str | None = None
    # A type with its own trainer: its step as the memory estimator models it, from the recipe's
    # section for the type (its options object, a dict of them, or None for the defaults). It
    # raises ConfigError, naming what, for options whose step is not modelled. None (with a
    # trainer): the estimator refuses the type.
    step: Callable[[Any], StepShape] | None = None

    def check_columns(self, task: TaskConfig, train: Rows, held_out: Rows) -> None:
        """Refuse rows that lack a column this task type reads."""
        columns = self.columns(task)
        require_columns(train, columns, "the training data")
        require_columns(held_out, columns, "the held-out data")

    def check_rows(self, task: TaskConfig, rows: Rows, source: str) -> None:
        """Refuse the rows of one data file (or bundled set) this type cannot learn from."""
        if self.row_check is not None:
            self.row_check(task, rows, source)
        else:
            require_columns(rows, self.columns(task), source)


def section_options(kind: type, options: Any) -> Any:
    """A task type's options object from its recipe section as given: the object itself, a
    dict of its fields, or None (the defaults)."""
    if options is None:
        return kind()
    return kind(**options) if isinstance(options, dict) else options


def read_split(task: TaskConfig, task_type: TaskType) -> tuple[Rows, Rows]:
    """(train rows, held-out rows) from a bundled set or files; 10% held out if no eval file.
    Each file's rows are checked by the task type before the split shuffles them, so an error
    names rows as they are numbered in the file."""
    if task.dataset is not None:
        train, held_out = load_bundled(task.dataset)
        task_type.check_rows(task, train, f"the training rows of {task.dataset}")
        task_type.check_rows(task, held_out, f"the held-out rows of {task.dataset}")
    else:
        train = read_rows(task.train_file, task.encoding)
        task_type.check_rows(task, train, str(task.train_file))
        if task.eval_file is not None:
            held_out = read_rows(task.eval_file, task.encoding)
            task_type.check_rows(task, held_out, str(task.eval_file))
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


def pair_features(
    rows: Rows,
    columns: list[str],
    make: Callable[[Any, str, str, int], dict[str, Any] | None],
    tokenizer: Any,
    max_length: int,
) -> tuple[Features, int, int]:
    """Features from the (input, output) columns of each row: (features, truncated, dropped)."""
    features, truncated, dropped = [], 0, 0
    for row in rows:
        feature = make(tokenizer, str(row[columns[0]]), str(row[columns[1]]), max_length)
        if feature is None:
            dropped += 1
            continue
        truncated += feature.pop("truncated", len(feature["input_ids"]) >= max_length)
        features.append(feature)
    return features, truncated, dropped


def require_training_features(features: Features, what: str, max_length: int) -> None:
    """Refuse a training set that truncation left with nothing to learn."""
    if not features:
        raise DataError(
            f"No training example keeps {what} within max_length={max_length}; raise "
            "task.max_length or shorten the inputs."
        )


def generative_data(
    task: TaskConfig, tokenizer: Any, train: Features, held_out: Features, truncated: int,
    dropped: int,
) -> TaskData:  # fmt: skip
    """The TaskData of a task type whose evaluation may generate (it keeps the tokenizer)."""
    return TaskData(
        train, held_out, truncated=truncated, dropped=dropped, tokenizer=tokenizer,
        max_new_tokens=task.max_new_tokens,
    )  # fmt: skip


def prepare_pairs(
    task: TaskConfig, task_type: TaskType, tokenizer: Any, train: Rows, held_out: Rows,
    make: Callable[[Any, str, str, int], dict[str, Any] | None], what: str,
) -> TaskData:  # fmt: skip
    """Features from each row's (input, output) columns (the task type's two columns), with
    truncations and drops counted; `what` names what a kept example must hold, for the error."""
    task_type.check_columns(task, train, held_out)
    names = task_type.columns(task)
    train_features, truncated, dropped = pair_features(
        train, names, make, tokenizer, task.max_length
    )
    require_training_features(train_features, what, task.max_length)
    eval_features, _, _ = pair_features(held_out, names, make, tokenizer, task.max_length)
    return generative_data(task, tokenizer, train_features, eval_features, truncated, dropped)


def batches(features: Features, collator: Any, size: int) -> Iterator[dict[str, Any]]:
    """Collated batches of `size` features, in order."""
    for start in range(0, len(features), size):
        yield collator(features[start : start + size])


def token_loss(
    model: nn.Module, data: TaskData, collator: Any, batch_size: int
) -> dict[str, float]:
    """Mean cross-entropy over the labelled (response) tokens, and its perplexity."""
    model.eval()
    causal = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches(data.eval, collator, batch_size):
            labels = batch["labels"]
            # A causal model predicts token t+1 from t: its loss averages over labels[:, 1:].
            scored = labels[:, 1:] if causal else labels
            tokens = max(int((scored != -100).sum()), 1)
            total_loss += float(model(**batch).loss) * tokens
            total_tokens += tokens
    loss = total_loss / max(1, total_tokens)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
