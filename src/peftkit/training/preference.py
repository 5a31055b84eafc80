"""Preference tuning on TRL's trainers (`trl` 1.16): DPO (DPOTrainer: sigmoid, IPO, hinge and
robust losses), ORPO (ORPOTrainer) and SimPO (CPOTrainer's simpo loss, its SFT term off), each
as a subclass that is also a PeftkitTrainer (the method's hooks, optimizer, sampler and adapter
checkpoints stay peftkit's).

The reference model DPO compares with is the policy at its start. For a method whose record can
switch its adapter off (Method.switch_off) it is the policy itself called with the adapter
switched off: no second copy of the weights. Before training, one training example checks that
switching off gives what the policy computes at its start (an initialisation that changes the
base, such as a principal-component one, does not); where it does not, or where the method has
no switch (methods that train or change the base's own weights), the reference is an explicit
frozen copy of the starting policy. The run's summary says which, and the copy's size."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import peftkit.api as api
from peftkit.errors import ConfigError
from peftkit.tasks.base import BuiltTrainer, TrainerParts
from peftkit.training.trainer import PeftkitTrainer

SWITCHED_OFF = "the policy with its adapter switched off (the method's switch_off): no copy"
FROZEN_COPY = "a frozen copy of the starting policy"


class SwitchedOffReference(nn.Module):
    """The policy called with its adapter switched off, as TRL's `ref_model`. It holds no
    weights: the policy is kept outside the module tree, so TRL's `.eval()`, device moves and
    dropout changes on the reference never reach the policy through it."""

    def __init__(self, policy: nn.Module, off: Callable[[], Any]) -> None:
        super().__init__()
        self.policy_holder = [policy]  # a list: not registered as a submodule
        self.off = off
        self.config = policy.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The policy's output with the adapter switched off. (__call__, not forward: TRL
        replaces a reference model's forward with its fused LM head; the policy's own forward
        already has it, so the whole call goes to the policy.)"""
        with self.off():
            return self.policy_holder[0](*args, **kwargs)


def switch_off_gives_start(model: nn.Module, off: Callable[[], Any], feature: dict) -> bool:
    """Whether the switched-off policy computes what the policy computes now, on one example."""
    training = model.training
    model.eval()
    ids = torch.tensor([feature["input_ids"]], device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            on = model(input_ids=ids).logits.float()
            with off():
                switched = model(input_ids=ids).logits.float()
    finally:
        model.train(training)
    return torch.allclose(on, switched, rtol=1e-4, atol=1e-5)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the starting policy, as a transformers model (a PEFT wrapper's inner
    model, its adapter layers included: TRL adds its fused LM head to a transformers model)."""
    reference = copy.deepcopy(model)
    if hasattr(reference, "get_base_model"):
        reference = reference.get_base_model()
    reference.requires_grad_(False)
    return reference.eval()


def tensor_mib(model: nn.Module) -> float:
    """MiB of a model's parameters and buffers as stored."""
    tensors = [*model.parameters(), *model.buffers()]
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2)


def reference_model(parts: TrainerParts) -> tuple[nn.Module, dict[str, Any]]:
    """The reference DPO compares with, and what the summary says about it."""
    model = parts.model
    switch_off = api.applied(model).method.switch_off
    if switch_off is not None:
        off = switch_off(model)
        if parts.resumed or switch_off_gives_start(model, off, parts.data.train[0]):
            return SwitchedOffReference(model, off), {"reference": SWITCHED_OFF}
        why = "switching the adapter off does not give the starting policy (its initialisation "
        why += "changes the base)"
    else:
        why = "the method has no switch to turn its update off"
    if parts.resumed:
        raise ConfigError(
            "This preference run's reference model is a frozen copy of the policy at its start "
            f"({why}); a resumed run no longer has that policy. Start the run again instead "
            "of resuming it."
        )
    reference = frozen_copy(model)
    return reference, {"reference": f"{FROZEN_COPY} ({why})",
                       "reference_copy_mib": tensor_mib(reference)}  # fmt: skip


@contextlib.contextmanager
def no_telemetry() -> Iterator[None]:
    """TRL's trainers ping the hub when built unless told not to; peftkit runs offline."""
    before = os.environ.get("HF_HUB_DISABLE_TELEMETRY")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_DISABLE_TELEMETRY"]
        else:
            os.environ["HF_HUB_DISABLE_TELEMETRY"] = before


class CountingCollator:
    """TRL's collator, counting the real tokens of every batch it builds (summary's tokens)."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner
        self.tokens_seen = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.tokens_seen += sum(
            int(value.sum()) for key, value in batch.items() if key.endswith("attention_mask")
        )
        return batch


def trl_trainer(algorithm: str) -> tuple[type, type]:
    """(TRL's config class, peftkit's subclass of TRL's trainer) for an algorithm."""
    with warnings.catch_warnings():  # ORPO and CPO live in trl.experimental, which warns
        warnings.simplefilter("ignore")
        if algorithm == "dpo":
            from trl import DPOConfig as Config
            from trl import DPOTrainer as Trainer
        elif algorithm == "orpo":
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as Trainer
        else:
            from trl.experimental.cpo import CPOConfig as Config
            from trl.experimental.cpo import CPOTrainer as Trainer
    return Config, type(f"Peftkit{Trainer.__name__}", (PeftkitTrainer, Trainer), {})


def trl_options(parts: TrainerParts) -> dict[str, Any]:
    """The TRL config's keyword values: the recipe's training arguments plus the objective's."""
    recipe = parts.recipe
    options = recipe.preference_options
    values = dict(parts.arguments)
    # peftkit turned checkpointing on itself if asked (TRL's default is on); dropout off in
    # policy and reference, so the reference is deterministic (TRL's default).
    values.update(max_length=recipe.task.max_length, gradient_checkpointing=False,
                  disable_dropout=True, beta=options.beta)  # fmt: skip
    if options.algorithm == "dpo":
        values.update(loss_type=[options.loss_type], label_smoothing=options.label_smoothing)
    elif options.algorithm == "simpo":
        values.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=options.simpo_gamma)
    return values


def refuse_wrapped_models(model: nn.Module) -> None:
    """Refuse a method that wraps the transformers model in a module of its own: TRL computes
    log-probabilities by calling the transformers backbone and output layer directly (its fused
    LM head), which would skip what such a wrapper adds around them."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel | PeftModel):
        method = api.applied(model).method.name
        raise ConfigError(
            f"{method} wraps the model in a {type(model).__name__}; TRL's preference trainers "
            "call the transformers model's backbone and output layer directly, so its additions "
            "would be skipped. Choose a method that adapts the model's own layers."
        )


def build_preference_trainer(parts: TrainerParts) -> BuiltTrainer:
    """The recipe's preference trainer on the applied model, its reference where it has one."""
    from datasets import Dataset

    if not parts.data.train_records:
        raise ConfigError("A preference trainer needs the task's preference records.")
    refuse_wrapped_models(parts.model)
    options = parts.recipe.preference_options
    config_class, trainer_class = trl_trainer(options.algorithm)
    said = {"algorithm": options.algorithm, "loss_type": options.loss_type, "beta": options.beta}
    notes: dict[str, Any] = {"preference": said}
    extra: dict[str, Any] = {}
    if options.needs_reference:
        extra["ref_model"], reference_notes = reference_model(parts)
        notes.update(reference_notes)
    else:
        notes["reference"] = f"none ({options.algorithm} needs no reference model)"
    with no_telemetry():
        trainer = trainer_class(
            model=parts.model,
            args=config_class(**trl_options(parts)),
            train_dataset=Dataset.from_list(parts.data.train_records),
            processing_class=parts.tokenizer,
            callbacks=parts.callbacks,
            hooks=parts.hooks,
            loss_uses_token_count=False,  # TRL's losses average per batch themselves
            **extra,
        )
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    return BuiltTrainer(trainer, lambda: collator.tokens_seen, notes)
