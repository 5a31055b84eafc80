"""transformers.Trainer with a method's hooks: one callback runs them around every optimizer step,
and a Trainer subclass adds what no public Trainer API can (each override says why)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices

import peftkit.api as api
from peftkit.method import TrainingHooks
from peftkit.models import chunked_loss
from peftkit.training.distributed import share_random_state


def example_length(example: dict[str, Any]) -> int:
    """An example's token count for length grouping: its input_ids, or the sum of its token id
    lists where a trainer keeps them in parts (TRL's prompt_ids, chosen_ids, rejected_ids)."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return sum(len(value) for key, value in example.items() if key.endswith("_ids"))


class HooksCallback(TrainerCallback):
    """Runs a method's hooks around every optimizer step (after clipping, before the update)."""

    def __init__(self, hooks: TrainingHooks, resume_state: dict[str, Any] | None = None) -> None:
        self.hooks = hooks
        self.resume_state = resume_state

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        """Tell the method the step budget; on resume, then give back its checkpointed state."""
        if self.hooks.begin_training is not None:
            self.hooks.begin_training(model, state.max_steps)
        if self.resume_state is not None and self.hooks.load_state is not None:
            self.hooks.load_state(model, self.resume_state)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        """Before the update: gradients are accumulated and clipped."""
        if self.hooks.before_optimizer_step is not None:
            share_random_state()
            self.hooks.before_optimizer_step(model, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        """After the update (a method restarts or reallocates here)."""
        if self.hooks.after_optimizer_step is not None:
            self.hooks.after_optimizer_step(model, state.global_step)


class EpochSampler(Sampler[int]):
    """Example order from (seed, epoch) alone: the same on every process, for any number of
    processes, and again after a resume. Length grouping works on global batches, so N processes
    of batch B see the same examples per step as one process of batch N x B."""

    def __init__(self, lengths: list[int], seed: int, group_size: int | None) -> None:
        self.lengths = lengths
        self.seed = seed
        self.group_size = group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order __iter__ yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):  # noqa: ANN204
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_size is None:
            return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


class SamplerEpochCallback(TrainerCallback):
    """Tells the sampler which epoch starts (accelerate does not reach a sampler under a sharded
    batch sampler; on resume the epoch comes from the restored state)."""

    def __init__(self, trainer: PeftkitTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        """state.epoch counts finished steps over steps per epoch; its floor is this epoch."""
        if self.trainer.epoch_sampler is not None:
            self.trainer.epoch_sampler.set_epoch(int(state.epoch + 1e-6))


class PeftkitTrainer(Trainer):
    """Trainer whose loss includes a method's extra term, whose optimizer a method may replace,
    whose data order does not depend on the number of processes, whose causal-LM loss never
    holds the whole batch's logits (models/chunked_loss.py), and whose checkpoints hold the
    peftkit adapter."""

    def __init__(
        self,
        *args: Any,
        hooks: TrainingHooks | None = None,
        loss_uses_token_count: bool | None = None,
        chunked_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # Whether a causal LM's training loss goes through the chunked head; why not, once known.
        self.chunked_loss = chunked_loss
        self.chunked_loss_refused: str | None = None
        self._chunked_head: tuple[Any, chunked_loss.Head | None, str] | None = None
        if loss_uses_token_count is not None:
            # Trainer assumes a model whose forward takes **kwargs divides its loss by the token
            # count it passes, and so multiplies the loss by the process count (and skips the
            # division by accumulation steps). Heads that average per batch themselves (sequence
            # classification, T5) would train on a loss N times too large.
            self.model_accepts_loss_kwargs = loss_uses_token_count
        self.method_hooks = hooks or TrainingHooks()
        self.epoch_sampler: EpochSampler | None = None
        self.add_callback(SamplerEpochCallback(self))

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, or the one the method replaces it with (built once)."""
        optimizer = super().create_optimizer(model)
        if self.method_hooks.replace_optimizer is not None:
            self.optimizer = self.method_hooks.replace_optimizer(self.model, optimizer)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        """The task loss plus the method's extra loss, if it has one."""
        result = None
        if not return_outputs:
            result = self._chunked_task_loss(model, inputs, num_items_in_batch)
        if result is None:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        extra_loss = self.method_hooks.extra_loss
        if extra_loss is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + extra_loss(self.model), outputs
        return result + extra_loss(self.model)

    def _chunked_task_loss(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> torch.Tensor | None:
        """A causal LM's training loss through the chunked head (equal to transformers' own), or
        None where it does not apply: evaluation, a custom loss, several processes, or a model
        whose head or logits it cannot follow (said once, by name)."""
        if not (self.chunked_loss and model.training and "labels" in inputs):
            return None
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return None
        if self._chunked_head is None or self._chunked_head[0] is not model:
            self._chunked_head = (model, *chunked_loss.find_head(model))
        _, head, why = self._chunked_head
        if head is not None and self.args.world_size > 1:
            head, why = None, "training runs in several processes"
        if head is None:
            self._refuse_chunked_loss(why)
            return None
        count = num_items_in_batch if self.model_accepts_loss_kwargs else None
        state = chunked_loss.random_state()
        loss = chunked_loss.causal_lm_loss(model, head, inputs, count)
        if loss is None:  # the plain forward draws the dropout masks this one drew
            chunked_loss.restore_random_state(state)
            self._refuse_chunked_loss("the model changes its logits after its output layer")
            return None
        if self.args.average_tokens_across_devices and count is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _refuse_chunked_loss(self, why: str) -> None:
        """Keep the plain loss from now on, saying why once (a causal LM only)."""
        self.chunked_loss = False
        self.chunked_loss_refused = why
        if why != "the model is not a transformers causal LM":
            print(f"peftkit: the loss computes through the full logits: {why}.")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint's model part is the peftkit adapter (only what the method trains), not
        the whole model transformers would write."""
        if self.args.should_save:
            api.save(self.model, output_dir or self.args.output_dir)

    # Private overrides: what no public Trainer API offers.

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        """An EpochSampler: the order depends on the seed and epoch, never on the process count.
        (Trainer's own samplers shard per process before grouping by length, so N processes
        would see other batches than one; get_train_dataloader offers no sampler argument.)"""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        grouped = args.train_sampling_strategy == "group_by_length"
        global_batch = args.train_batch_size * args.world_size * args.gradient_accumulation_steps
        lengths = [example_length(e) for e in dataset] if grouped else [0] * len(dataset)
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.epoch_sampler = EpochSampler(lengths, seed, global_batch if grouped else None)
        return self.epoch_sampler

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Nothing to load: the pipeline built the model from this checkpoint's adapter
        (api.load) before the trainer existed. (Trainer would look for whole-model or PEFT
        weight files, which a peftkit-own method's checkpoint does not hold; resuming offers no
        way to skip it.)"""
