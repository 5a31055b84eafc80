"""GRPO on TRL's GRPOTrainer (`trl` 1.16), as a subclass that is also a PeftkitTrainer (the
method's hooks, optimizer and adapter checkpoints stay peftkit's; TRL's own sampler, which
repeats each prompt once per completion of its group, stays TRL's).

The rewards are the task's (tasks/rewards.py), each checked: one finite number per completion,
or a RewardError naming the function. With grpo.beta > 0 the KL term's reference is the one DPO
uses (training/preference.py): the policy with its adapter switched off where the method can
switch it off, else an explicit frozen copy of the starting policy, named in the summary. With
beta 0 (TRL's default) there is no reference at all."""

from __future__ import annotations

import warnings
from typing import Any

from peftkit.errors import ConfigError
from peftkit.tasks.base import BuiltTrainer, TrainerParts
from peftkit.training.preference import (
    SwitchedOffReference,
    no_telemetry,
    reference_model,
    refuse_wrapped_models,
)
from peftkit.training.trainer import PeftkitTrainer


def grpo_trainer_class() -> tuple[type, type]:
    """(TRL's GRPOConfig, peftkit's subclass of TRL's GRPOTrainer, TRL's sampler kept)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOConfig, GRPOTrainer
    body = {"_get_train_sampler": GRPOTrainer._get_train_sampler}
    return GRPOConfig, type("PeftkitGRPOTrainer", (PeftkitTrainer, GRPOTrainer), body)


def grpo_options(parts: TrainerParts) -> dict[str, Any]:
    """The TRL config's keyword values: the recipe's training arguments plus GRPO's. beta is
    set on the trainer after it is built (with a reference TRL would otherwise load again)."""
    recipe = parts.recipe
    options = recipe.grpo_options
    training = recipe.training
    completions = training.batch_size * training.gradient_accumulation_steps
    if completions % options.num_generations:
        raise ConfigError(
            f"GRPO samples grpo.num_generations={options.num_generations} completions per "
            f"prompt, and a step's completions (training.batch_size x "
            f"gradient_accumulation_steps = {completions}) must hold whole groups: make it a "
            "multiple of num_generations."
        )
    _, weights = parts.data.rewards
    values = dict(parts.arguments)
    values.pop("train_sampling_strategy", None)  # TRL's sampler groups each prompt's completions
    values.update(
        gradient_checkpointing=False, disable_dropout=True, beta=0.0,
        num_generations=options.num_generations,
        max_completion_length=options.max_completion_length, temperature=options.temperature,
        epsilon=options.epsilon, loss_type=options.loss_type,
        scale_rewards=options.scale_rewards, reward_weights=list(weights),
        log_completions=False, seed=recipe.training.seed,
    )  # fmt: skip
    return values


def attach_reference(trainer: Any, parts: TrainerParts, beta: float) -> dict[str, Any]:
    """Give the built trainer its KL coefficient and reference; what the summary says of it."""
    if beta == 0:
        return {"reference": "none (grpo.beta is 0: no KL term)"}
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    reference, notes = reference_model(parts)
    if not isinstance(reference, SwitchedOffReference):  # the policy already has TRL's head
        disable_dropout_in_model(reference)
        add_fused_lm_head(reference, temperature=trainer.temperature)
    trainer.ref_model = reference
    trainer.beta = trainer.args.beta = beta
    return notes


def build_grpo_trainer(parts: TrainerParts) -> BuiltTrainer:
    """TRL's GRPO trainer on the applied model, with the task's rewards."""
    from datasets import Dataset

    if not parts.data.train_records:
        raise ConfigError("A GRPO trainer needs the task's prompt records.")
    refuse_wrapped_models(parts.model)
    config_class, trainer_class = grpo_trainer_class()
    options = parts.recipe.grpo_options
    rewards, weights = parts.data.rewards
    with no_telemetry():
        trainer = trainer_class(
            model=parts.model,
            reward_funcs=rewards,
            args=config_class(**grpo_options(parts)),
            train_dataset=Dataset.from_list(parts.data.train_records),
            processing_class=parts.tokenizer,
            callbacks=parts.callbacks,
            hooks=parts.hooks,
            loss_uses_token_count=False,  # TRL normalises its loss itself
        )
    notes = {
        "grpo": {
            "rewards": [r.name for r in rewards],
            "reward_weights": list(weights),
            "num_generations": options.num_generations,
            "beta": options.beta,
            "loss_type": options.loss_type,
        },  # fmt: skip
        **attach_reference(trainer, parts, options.beta),
    }
    return BuiltTrainer(trainer, lambda: int(trainer.state.num_input_tokens_seen), notes)
