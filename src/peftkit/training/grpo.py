"""GRPO on TRL's GRPOTrainer (`trl` 1.16), as a subclass that is also a PeftkitTrainer (the
method's hooks, optimizer and adapter checkpoints stay peftkit's; TRL's own sampler, which
repeats each prompt once per completion of its group, stays TRL's). Its completions are sampled
by peftkit's rollouts (training/rollouts.py: batched decoding with the live adapter, TRL's
sampling) unless grpo.rollouts is trl, which keeps TRL's default path (transformers' generate).

The rewards are the task's (tasks/rewards.py), each checked: one finite number per completion,
or a RewardError naming the function. With grpo.beta > 0 the KL term's reference is the one DPO
uses (training/preference.py): the policy with its adapter switched off where the method can
switch it off, else an explicit frozen copy of the starting policy, named in the summary. With
beta 0 (TRL's default) there is no reference at all."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from peftkit.errors import ConfigError
from peftkit.tasks.base import BuiltTrainer, TrainerParts
from peftkit.tasks.config import GRPO_ROLLOUTS as ROLLOUTS
from peftkit.training.preference import (
    SwitchedOffReference,
    no_telemetry,
    reference_model,
    refuse_wrapped_models,
)
from peftkit.training.rollouts import check_model, rollout, trl_sampler
from peftkit.training.trainer import PeftkitTrainer


def grpo_trainer_class(rollouts: str = "peftkit") -> tuple[type, type]:
    """(TRL's GRPOConfig, peftkit's subclass of TRL's GRPOTrainer, TRL's sampler kept); with
    rollouts "peftkit" its completions come from training/rollouts.py, with "trl" from TRL."""
    if rollouts not in ROLLOUTS:
        raise ConfigError(
            f"grpo.rollouts {rollouts!r} is not known. Use one of: {', '.join(ROLLOUTS)}."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOConfig, GRPOTrainer
    body: dict[str, Any] = {"_get_train_sampler": GRPOTrainer._get_train_sampler}
    if rollouts == "peftkit":
        body["_generate_single_turn"] = _peftkit_single_turn
    return GRPOConfig, type("PeftkitGRPOTrainer", (PeftkitTrainer, GRPOTrainer), body)


def _peftkit_single_turn(
    self: Any,
    prompt_ids: list[list[int]],
    images: Any,
    multimodal_fields: dict[str, Any],
    num_generations: int,
    has_tool_images: bool = False,
) -> tuple[list[list[int]], None]:
    """TRL's `_generate_single_turn` through peftkit's rollouts: the same completion ids (each
    up to and including its first EOS) and, as TRL's default path, no sampling log-probs."""
    from trl.extras.profiling import profiling_context
    from trl.models import unwrap_model_for_generation

    if images is not None or multimodal_fields:
        raise ConfigError(
            "grpo.rollouts: peftkit generates from text prompts only; this batch holds images or "
            "other multimodal inputs. Set grpo.rollouts: trl."
        )
    if not hasattr(self, "_peftkit_sampler"):
        self._peftkit_sampler = trl_sampler(self)
    with (
        profiling_context(self, "peftkit.rollout"),
        unwrap_model_for_generation(
            self.model_wrapped, self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            generation_kwargs=self.generation_kwargs,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as model,
        torch.no_grad(),
        self._dist.summon_full_params(self.model_wrapped, recurse=False),
    ):  # fmt: skip
        result = rollout(
            model, [list(ids) for ids in prompt_ids], self._peftkit_sampler,
            self.max_completion_length, list(self.eos_token_ids), self._tokenizer.pad_token_id,
        )  # fmt: skip
    return result.completion_ids, None


ROLLOUT_NOTES = {
    "peftkit": "peftkit (training/rollouts.py: batched, the live adapter, in-place cache)",
    "trl": "trl (TRL's default path: transformers' generate)",
}


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
    options = parts.recipe.grpo_options
    config_class, trainer_class = grpo_trainer_class(options.rollouts)
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
    if options.rollouts == "peftkit":
        trainer._peftkit_sampler = trl_sampler(trainer)
        check_model(parts.model, trainer._tokenizer.pad_token_id)
    notes = {
        "grpo": {
            "rewards": [r.name for r in rewards],
            "reward_weights": list(weights),
            "num_generations": options.num_generations,
            "beta": options.beta,
            "loss_type": options.loss_type,
            "rollouts": ROLLOUT_NOTES[options.rollouts],
        },  # fmt: skip
        **attach_reference(trainer, parts, options.beta),
    }
    return BuiltTrainer(trainer, lambda: int(trainer.state.num_input_tokens_seen), notes)
