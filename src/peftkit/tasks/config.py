"""What a recipe's task section says: the task type, where its examples come from, its columns
and lengths. Reading it imports no torch; the type's record (tasks/__init__.py) does the work."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

from peftkit.checks import check_task_numbers
from peftkit.config import nearest
from peftkit.errors import ConfigError

# Every task type's name, in the order `peftkit methods` and the UI list them; each has its record
# in TASK_TYPES (tasks/__init__.py), which checks the two agree.
TASK_NAMES = ("classification", "causal-lm", "chat", "seq2seq", "preference", "kto", "grpo")
# The format reward's default pattern (tasks/rewards.py): DeepSeek-R1's reasoning then answer.
DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


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
    completion_column: str = field(
        default="completion", metadata={"help": "kto: the response the label judges"}
    )
    rewards: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "grpo: reward functions by name (format, or one an application registers, "
            "such as sql-execution) or import path 'module:function'"
        },
    )
    reward_weights: tuple[float, ...] = field(
        default=(), metadata={"help": "grpo: one weight per reward (default: all 1)"}
    )
    format_pattern: str = field(
        default=DEFAULT_FORMAT_PATTERN,
        metadata={"help": "grpo: the format reward's regular expression (the whole completion)"},
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
        self._check_rewards()

    def _check_rewards(self) -> None:
        """A GRPO task names at least one reward, one weight each if weighted; others none."""
        if self.type != "grpo":
            if self.rewards or self.reward_weights:
                raise ConfigError(
                    f"task.rewards and task.reward_weights are for task.type: grpo, not "
                    f"{self.type}; remove them."
                )
            return
        if not self.rewards:
            raise ConfigError(
                "A grpo task needs task.rewards: a list of reward functions (format, one an "
                "application registers such as sql-execution, or 'module:function')."
            )
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"task.reward_weights has {len(self.reward_weights)} values for "
                f"{len(self.rewards)} rewards; give one weight per reward, or none."
            )
        try:
            re.compile(self.format_pattern)
        except re.error as error:
            raise ConfigError(
                f"task.format_pattern {self.format_pattern!r} is not a regular expression "
                f"({error})."
            ) from None


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


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class KTOConfig:
    """How a kto task learns from its unpaired examples: the recipe's `kto:` section (only with
    task.type: kto), TRL's KTOTrainer. The reference is the policy with its adapter switched
    off."""

    beta: float = field(
        default=0.1, metadata={"help": "how far from the reference (higher: closer)"}
    )
    desirable_weight: float = field(
        default=1.0, metadata={"help": "the weight of a desirable (label true) example's loss"}
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "the weight of an undesirable (label false) example's loss"}
    )
    loss_type: str = field(
        default="kto", metadata={"help": "kto | apo_zero_unpaired (no KL estimate)"}
    )

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            guess = nearest(str(self.loss_type), list(KTO_LOSS_TYPES))
            hint = f" Did you mean '{guess}'?" if guess else ""
            raise ConfigError(
                f"kto.loss_type {self.loss_type!r} is not known.{hint} Use one of: "
                f"{', '.join(KTO_LOSS_TYPES)}."
            )
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"kto.{key} must be > 0, got {getattr(self, key)}.")


GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
GRPO_ROLLOUTS = ("peftkit", "trl")  # who generates the completions (training/rollouts.py)


@dataclass(frozen=True)
class GRPOConfig:
    """How a grpo task learns from its rewards: the recipe's `grpo:` section (only with
    task.type: grpo), TRL's GRPOTrainer. With beta > 0 the KL term's reference is the policy
    with its adapter switched off."""

    num_generations: int = field(
        default=4, metadata={"help": "completions sampled per prompt (a group); batch_size x "
                                     "gradient_accumulation_steps must be a multiple"}
    )  # fmt: skip
    max_completion_length: int = field(
        default=32, metadata={"help": "most tokens generated per completion"}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    beta: float = field(
        default=0.0, metadata={"help": "KL coefficient to the reference (0: no reference)"}
    )
    epsilon: float = field(default=0.2, metadata={"help": "the ratio's clipping range"})
    loss_type: str = field(
        default="dapo", metadata={"help": "dapo | grpo | dr_grpo | bnpo (TRL's definitions)"}
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "advantages divided by the std of: group | batch | none"}
    )
    rollouts: str = field(
        default="peftkit",
        metadata={"help": "who samples the completions: peftkit (batched decoding with the live "
                          "adapter) | trl (TRL's default: transformers' generate)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("loss_type", self.loss_type, GRPO_LOSS_TYPES),
            ("scale_rewards", self.scale_rewards, GRPO_SCALE_REWARDS),
            ("rollouts", self.rollouts, GRPO_ROLLOUTS),
        ):
            if value not in choices:
                guess = nearest(str(value), list(choices))
                hint = f" Did you mean '{guess}'?" if guess else ""
                raise ConfigError(
                    f"grpo.{key} {value!r} is not known.{hint} Use one of: {', '.join(choices)}."
                )
        if self.num_generations < 2:
            raise ConfigError(
                f"grpo.num_generations must be at least 2 (advantages compare completions "
                f"within a group), got {self.num_generations}."
            )
        if self.max_completion_length < 1:
            raise ConfigError(
                f"grpo.max_completion_length must be >= 1, got {self.max_completion_length}."
            )
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature must be > 0, got {self.temperature}.")
        if self.beta < 0 or self.epsilon <= 0:
            raise ConfigError(
                f"grpo.beta must be >= 0 and grpo.epsilon > 0, got {self.beta} and {self.epsilon}."
            )
