"""YAML recipes: one file says model, task, method and training budget; each section maps one to one
onto a config dataclass, and `--set section.key=value` overrides any key from the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from peftkit.checks import check_finite, check_range
from peftkit.config import (
    apply_overrides,
    from_dict,
    nearest,
    read_yaml_file,
    to_dict,
    unknown_key_message,
)
from peftkit.errors import ConfigError, DataError
from peftkit.tasks.config import GRPOConfig, KTOConfig, PreferenceConfig, TaskConfig

# The base's storage choices (peftkit.models.precision and .quantize map them onto torch and
# bitsandbytes; kept here as names so reading a recipe imports neither).
BASE_DTYPES = ("fp32", "bf16", "fp16")
BASE_QUANTIZATIONS = ("nf4", "int8")


def _check_choice(value: Any, choices: tuple[str, ...], key: str) -> None:
    """Refuse a value outside `choices`, suggesting the nearest."""
    if value not in choices:
        guess = nearest(str(value), list(choices))
        hint = f" Did you mean '{guess}'?" if guess else ""
        raise ConfigError(f"{key} {value!r} is not known.{hint} Use one of: {', '.join(choices)}.")


@dataclass(frozen=True)
class BaseConfig:
    """How the base model is stored: its precision, and optionally its linear layers quantised.
    Whatever the choice, trainable parameters are float32 (peftkit.models.precision)."""

    dtype: str = field(
        default="fp32",
        metadata={
            "help": "fp32 | bf16 | fp16: the base's weights as loaded (whatever dtype the "
            "checkpoint was saved in); the quantised layers compute in it"
        },
    )
    quantize: str | None = field(
        default=None,
        metadata={
            "help": "none | nf4 | int8: store the base's linear layers in 4 bits (NF4, QLoRA) or "
            "8 bits (LLM.int8) through bitsandbytes; the output layer and a new head stay"
        },
    )

    def __post_init__(self) -> None:
        _check_choice(self.dtype, BASE_DTYPES, "base.dtype")
        if isinstance(self.quantize, str) and self.quantize.lower() == "none":
            object.__setattr__(self, "quantize", None)
        if self.quantize is not None:
            _check_choice(self.quantize, BASE_QUANTIZATIONS, "base.quantize")


def reporters() -> list[str]:
    """The experiment trackers transformers.Trainer can report to (training.report_to)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(INTEGRATION_TO_CALLBACK)


def check_reporter(name: str) -> None:
    """Refuse a report_to that transformers does not know (transformers is imported only then)."""
    if name == "none":
        return
    known = reporters()
    if name not in known:
        guess = nearest(str(name), known)
        hint = f" Did you mean '{guess}'?" if guess else ""
        raise ConfigError(
            f"training.report_to {name!r} is not an experiment tracker transformers knows.{hint} "
            f"Use none or one of: {', '.join(known)}."
        )


# How several processes hold the model (training.sharding; the estimator's `sharding` too).
SHARDINGS = ("none", "fsdp")


def check_sharding(sharding: str) -> None:
    """Refuse a sharding peftkit does not know."""
    if sharding not in SHARDINGS:
        raise ConfigError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}.")


@dataclass(frozen=True)
class TrainConfig:
    """The training budget and optimiser settings (passed on to transformers.Trainer)."""

    max_steps: int = field(default=100, metadata={"help": "optimizer steps (0: use epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data if max_steps=0"})
    batch_size: int = field(default=16, metadata={"help": "examples per device per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches a step"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per evaluation batch"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps warming up"})
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: never)"})
    save_total_limit: int | None = field(
        default=None,
        metadata={"help": "keep only the newest N checkpoints (default: keep every one)"},
    )
    group_by_length: bool = field(
        default=True, metadata={"help": "batch examples of similar length (less padding)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for data order and initialisation"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: torch's)"})
    precision: str = field(
        default="fp32",
        metadata={"help": "fp32, or bf16 (mixed precision; on CPU needs AVX512-BF16 or AMX)"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "keep only each layer's input during the forward pass and recompute the "
            "rest in the backward pass: less activation memory, about a third more compute"
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment tracking: none, or a transformers integration (tensorboard: "
            "event files in output_dir/logs; mlflow, wandb, ...: their own settings)"
        },
    )
    sharding: str = field(
        default="none",
        metadata={
            "help": "none (each process holds the whole model: DDP) or fsdp (FSDP2 shards "
            "weights, gradients and optimizer state across torchrun's processes)"
        },
    )

    def __post_init__(self) -> None:
        check_reporter(self.report_to)
        check_sharding(self.sharding)
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"training.precision must be fp32 or bf16, got {self.precision!r}.")
        check_finite("training.max_steps", self.max_steps)
        check_finite("training.epochs", self.epochs)
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ConfigError("Set training.max_steps > 0, or max_steps: 0 with epochs > 0.")
        check_range("training.epochs", self.epochs, 0)
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("training.batch_size and gradient_accumulation_steps must be >= 1.")
        check_finite("training.learning_rate", self.learning_rate)
        if self.learning_rate <= 0:
            raise ConfigError(f"training.learning_rate must be > 0, got {self.learning_rate}.")
        check_range("training.eval_batch_size", self.eval_batch_size, 1)
        check_range("training.weight_decay", self.weight_decay, 0)
        # transformers reads a warmup value of 1 or more as a step count, not a fraction
        check_range("training.warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        check_range("training.max_grad_norm", self.max_grad_norm, 0)  # 0: no clipping
        check_range("training.logging_steps", self.logging_steps, 1)
        check_range("training.save_steps", self.save_steps, 0)  # 0: no checkpoints
        check_range("training.save_total_limit", self.save_total_limit, 1)  # None: keep all
        check_range("training.seed", self.seed, 0, 2**32 - 1)  # numpy's seed range
        check_range("training.threads", self.threads, 1)  # None: torch's default


# Task types whose options have a recipe section of the same name.
TASK_SECTIONS = ("preference", "kto", "grpo")


@dataclass(frozen=True)
class Recipe:
    """A whole run: model, task, method (name plus its options) and training budget."""

    model: str = field(default="minilm", metadata={"help": "bundled name, local folder, or hub id"})
    task: TaskConfig = field(default_factory=lambda: TaskConfig(dataset="amazon-reviews"))
    # Empty: the registry's DEFAULT_METHOD, chosen when the plan is resolved (plan.py), so that
    # reading a recipe imports no method.
    method: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "name: the method; other keys: its config options"},
    )
    training: TrainConfig = field(default_factory=TrainConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    output_dir: str = field(default="runs/latest", metadata={"help": "where results are written"})
    # Only with task.type: preference (None there: PreferenceConfig's defaults, DPO sigmoid).
    preference: PreferenceConfig | None = field(
        default=None, metadata={"help": "preference tuning: algorithm, loss_type, beta, ..."}
    )
    # Only with task.type: kto (None there: KTOConfig's defaults).
    kto: KTOConfig | None = field(
        default=None, metadata={"help": "kto: beta, desirable_weight, undesirable_weight"}
    )
    # Only with task.type: grpo (None there: GRPOConfig's defaults).
    grpo: GRPOConfig | None = field(
        default=None, metadata={"help": "grpo: num_generations, max_completion_length, beta, ..."}
    )

    @property
    def task_options(self) -> Any:
        """The recipe's section for its task type (preference, kto, grpo), or None: what the
        memory estimate reads for a task type with its own trainer."""
        return getattr(self, self.task.type) if self.task.type in TASK_SECTIONS else None

    @property
    def preference_options(self) -> PreferenceConfig:
        """The preference section, or its defaults where the recipe has none."""
        return self.preference if self.preference is not None else PreferenceConfig()

    @property
    def kto_options(self) -> KTOConfig:
        """The kto section, or its defaults where the recipe has none."""
        return self.kto if self.kto is not None else KTOConfig()

    @property
    def grpo_options(self) -> GRPOConfig:
        """The grpo section, or its defaults where the recipe has none."""
        return self.grpo if self.grpo is not None else GRPOConfig()

    def __post_init__(self) -> None:
        for section in TASK_SECTIONS:
            if getattr(self, section) is not None and self.task.type != section:
                raise ConfigError(
                    f"The recipe has a {section} section but task.type is {self.task.type!r}: "
                    f"set task.type: {section}, or remove the {section} section."
                )
        if not str(self.output_dir).strip():
            raise ConfigError(
                "output_dir is empty: name the folder the run writes to (for example runs/x)."
            )
        # `~` is expanded here, once, so the adapter, the checkpoints and the logs all go to the
        # same folder (Python's file functions do not expand it; some libraries do).
        object.__setattr__(self, "output_dir", expand_home(self.output_dir))
        object.__setattr__(self, "model", expand_home(self.model))
        files = {
            key: expand_home(getattr(self.task, key))
            for key in ("train_file", "eval_file")
            if getattr(self.task, key, None)
        }
        if any(files[key] != getattr(self.task, key) for key in files):
            object.__setattr__(self, "task", replace(self.task, **files))


def expand_home(path: str) -> str:
    """A user path with a leading `~` or `~user` expanded; anything else unchanged."""
    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


SECTIONS = {
    "task": TaskConfig, "training": TrainConfig, "base": BaseConfig, "preference": PreferenceConfig,
    "kto": KTOConfig, "grpo": GRPOConfig,
}  # fmt: skip
TOP_LEVEL = ("model", "base", "task", "method", "training", "preference", "kto", "grpo",
             "output_dir")  # fmt: skip


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """A Recipe from the plain dict of a YAML file; every key is checked."""
    if not isinstance(data, dict):
        raise ConfigError("A recipe must be a YAML mapping with model, task, method, training.")
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(unknown_key_message(key, TOP_LEVEL, "the recipe"))
    values: dict[str, Any] = {}
    if "model" in data:
        values["model"] = str(data["model"])
    if "output_dir" in data:
        values["output_dir"] = str(data["output_dir"])
    for section, cls in SECTIONS.items():
        if section in data:
            values[section] = from_dict(cls, data[section], where=section)
    if "method" in data:
        method = data["method"]
        values["method"] = {"name": method} if isinstance(method, str) else dict(method)
    if "method" in data and not values["method"].get("name"):
        raise ConfigError(
            "The recipe's method section needs a 'name': a registered method (peftkit methods "
            "lists them)."
        )
    return Recipe(**values)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data: what `recipe_from_dict` reads back to an equal Recipe."""
    data = {
        "model": recipe.model,
        "base": to_dict(recipe.base),
        "task": to_dict(recipe.task),
        "method": dict(recipe.method),
        "training": to_dict(recipe.training),
        "output_dir": recipe.output_dir,
    }
    if not recipe.method:  # the registry's default, as a recipe without a method section says
        del data["method"]
    for section in ("preference", "kto", "grpo"):
        if getattr(recipe, section) is not None:
            data[section] = to_dict(getattr(recipe, section))
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe file, apply overrides, and validate it."""
    path = Path(path)
    hint = " (see recipes/ for examples)"
    if (path / "recipe.yaml").is_file():  # a run folder: it keeps the recipe it ran
        hint = f"; the recipe that run used is {path / 'recipe.yaml'}"
    data = read_yaml_file(path, "Recipe", hint) or {}
    return recipe_from_dict(apply_overrides(data, overrides or []))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write a recipe as YAML (the run folder keeps the one it ran)."""
    import yaml

    from peftkit.io import write_text_atomically

    write_text_atomically(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def with_output_dir(recipe: Recipe, output_dir: str) -> Recipe:
    """The same recipe writing elsewhere."""
    return replace(recipe, output_dir=output_dir)


def check_data_files(recipe: Recipe) -> None:
    """Refuse a task data file that is not there, naming it (cheap: before anything loads)."""
    for key in ("train_file", "eval_file"):
        name = getattr(recipe.task, key)
        path = Path(name).expanduser() if name is not None else None
        if path is not None and not path.is_file():
            raise DataError(
                f"Data file {path} does not exist (task.{key}, looked for {path.absolute()}): "
                f"fix the path in the recipe, or pass --set task.{key}=PATH."
            )
