"""KTO on TRL's KTOTrainer (`trl` 1.16), as a subclass that is also a PeftkitTrainer (the
method's hooks, optimizer and adapter checkpoints stay peftkit's).

The reference is the one DPO uses (training/preference.py): the policy with its adapter switched
off where the method's record can switch it off and that gives the starting policy; otherwise an
explicit frozen copy of the starting policy, which the run's summary names with its size.

KTO's KL estimate pairs each example with its batch neighbour's completion, so TRL needs its
batches in dataset order: the rows are shuffled once with the run's seed, then read in order."""

from __future__ import annotations

import random
import warnings
from typing import Any

from torch.utils.data import Sampler, SequentialSampler

from peftkit.errors import ConfigError
from peftkit.tasks.base import BuiltTrainer, TrainerParts
from peftkit.training.preference import (
    CountingCollator,
    no_telemetry,
    reference_model,
    refuse_wrapped_models,
)
from peftkit.training.trainer import PeftkitTrainer


def _in_order(self: Any, train_dataset: Any = None) -> Sampler:
    """The rows in order (KTO's KL pairs are built from batch neighbours)."""
    return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def kto_trainer_class() -> tuple[type, type]:
    """(TRL's KTOConfig, peftkit's subclass of TRL's KTOTrainer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import KTOConfig, KTOTrainer
    body = {"_get_train_sampler": _in_order}
    return KTOConfig, type("PeftkitKTOTrainer", (PeftkitTrainer, KTOTrainer), body)


def kto_options(parts: TrainerParts) -> dict[str, Any]:
    """The TRL config's keyword values: the recipe's training arguments plus KTO's."""
    recipe = parts.recipe
    options = recipe.kto_options
    if options.loss_type == "kto" and recipe.training.batch_size < 2:
        raise ConfigError(
            "KTO's KL estimate pairs each example with another in its batch: set "
            "training.batch_size to 2 or more (or kto.loss_type: apo_zero_unpaired)."
        )
    values = dict(parts.arguments)
    values.update(
        max_length=recipe.task.max_length, gradient_checkpointing=False, disable_dropout=True,
        beta=options.beta, desirable_weight=options.desirable_weight,
        undesirable_weight=options.undesirable_weight, loss_type=options.loss_type,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    return values


def build_kto_trainer(parts: TrainerParts) -> BuiltTrainer:
    """TRL's KTO trainer on the applied model, with its reference."""
    from datasets import Dataset

    if not parts.data.train_records:
        raise ConfigError("A KTO trainer needs the task's unpaired records.")
    refuse_wrapped_models(parts.model)
    config_class, trainer_class = kto_trainer_class()
    options = parts.recipe.kto_options
    reference, notes = reference_model(parts)
    notes = {"kto": {"beta": options.beta, "desirable_weight": options.desirable_weight,
                     "undesirable_weight": options.undesirable_weight,
                     "loss_type": options.loss_type}, **notes}  # fmt: skip
    records = list(parts.data.train_records)
    random.Random(parts.recipe.training.seed).shuffle(records)
    with no_telemetry():
        trainer = trainer_class(
            model=parts.model,
            ref_model=reference,
            args=config_class(**kto_options(parts)),
            train_dataset=Dataset.from_list(records),
            processing_class=parts.tokenizer,
            callbacks=parts.callbacks,
            hooks=parts.hooks,
            loss_uses_token_count=False,  # TRL's losses average per batch themselves
        )
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    return BuiltTrainer(trainer, lambda: collator.tokens_seen, notes)
