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
TASK_NAMES = ("classification", "causal-lm", "chat", "seq2seq", "preference")


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
    chosen_column: str = field(
        default="chosen", metadata={"help": "preference: the preferred response (text or messages)"}
    )
    rejected_column: str = field(
        default="rejected", metadata={"help": "preference: the dispreferred response"}
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


# The preference objectives peftkit trains through TRL (training/preference.py), and the DPO loss
# variants of TRL's DPOTrainer it offers.
PREFERENCE_ALGORITHMS = ("dpo", "orpo", "simpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass(frozen=True)
class PreferenceConfig:
    """How a preference task learns from its pairs: the recipe's `preference:` section (only
    with task.type: preference). DPO needs a reference model (the policy with its adapter
    switched off); ORPO and SimPO need none."""

    algorithm: str = field(
        default="dpo",
        metadata={
            "help": "dpo (TRL's DPOTrainer) | orpo (ORPOTrainer: SFT loss + odds ratio) | simpo "
            "(CPOTrainer's simpo loss: length-normalised log-probability, target margin)"
        },
    )
    loss_type: str = field(
        default="sigmoid", metadata={"help": "dpo: sigmoid | ipo | hinge | robust"}
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "dpo: how far from the reference (higher: closer; IPO's tau); orpo: the "
            "odds-ratio weight (lambda); simpo: the reward scale (the paper uses about 2)"
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "dpo robust: the probability a preference label is flipped, [0, 0.5)"},
    )
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "simpo: the target reward margin gamma"}
    )

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("algorithm", self.algorithm, PREFERENCE_ALGORITHMS),
            ("loss_type", self.loss_type, DPO_LOSS_TYPES),
        ):
            if value not in choices:
                guess = nearest(str(value), list(choices))
                hint = f" Did you mean '{guess}'?" if guess else ""
                raise ConfigError(
                    f"preference.{key} {value!r} is not known.{hint} Use one of: "
                    f"{', '.join(choices)}."
                )
        if self.loss_type != "sigmoid" and self.algorithm != "dpo":
            raise ConfigError(
                f"preference.loss_type {self.loss_type!r} is a DPO loss; {self.algorithm} has "
                "its own. Leave loss_type out, or use algorithm: dpo."
            )
        if self.beta <= 0:
            raise ConfigError(f"preference.beta must be > 0, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"preference.label_smoothing must lie in [0, 0.5), got {self.label_smoothing}."
            )
        if self.label_smoothing and self.loss_type != "robust":
            raise ConfigError(
                "preference.label_smoothing is the robust DPO loss's flip probability: set "
                "loss_type: robust, or leave label_smoothing at 0."
            )

    @property
    def needs_reference(self) -> bool:
        """Whether the objective compares the policy with a reference model (DPO does)."""
        return self.algorithm == "dpo"
