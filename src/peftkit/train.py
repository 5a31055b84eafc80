"""Training: transformers.Trainer plus one callback that runs the method's hooks; every run ends
with a summary table and summary.json in the output folder. Generic: never asks which method.

Under `torchrun` or `accelerate launch` every process trains its share of each global batch (DDP)
and the main process alone evaluates, saves and reports. Checkpoints every `save_steps` hold the
adapter, optimizer, scheduler, RNG, data position and the method's own state, and appear only when
complete; `resume` continues from one exactly (see docs/distributed.md)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import get_last_checkpoint

import peftkit.api as api
from peftkit import io
from peftkit.data.tokenize import Collator
from peftkit.errors import ConfigError
from peftkit.measure import folder_bytes, mib, optimizer_state_bytes, peak_memory_bytes
from peftkit.method import TrainingHooks
from peftkit.models import load_model
from peftkit.recipe import Recipe, save_recipe
from peftkit.tasks import TASK_TYPES, TaskData, headline_metric, split_rows

CHECKPOINTS = "checkpoints"
STAGING = ".incomplete"  # checkpoints are built here and renamed into place once complete
METHOD_STATE_NAME = "method_state.pt"
# What `accelerate launch` sets for a sharded run (and the name the refusal message uses).
SHARDING_VARIABLES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed ZeRO"}


def distributed() -> bool:
    """True inside a process group of more than one process (torchrun, accelerate launch)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wait_for_everyone() -> None:
    """A barrier across processes; nothing in a single process."""
    if distributed():
        torch.distributed.barrier()


def finish_distributed() -> None:
    """Wait for every process, then tear the process group down. A process that left with its
    group still up (the non-main ones return as soon as training ends) could abort at exit
    ("terminate called without an active exception" from the gloo threads), failing the run."""
    if distributed():
        # The trainer is in reference cycles (its callbacks hold it), so the DDP wrapper and its
        # reducer, which hold the group too, would otherwise outlive destroy_process_group and be
        # torn down at interpreter exit (a rarer abort, about one CI run in four, was still seen).
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def share_random_state() -> None:
    """Give every process the main process's random state, so hooks that draw random numbers
    (Child-Tuning F's masks) draw the same ones everywhere and the replicas stay equal."""
    if distributed():
        from accelerate.utils import synchronize_rng_states

        synchronize_rng_states(["torch", "cuda"] if torch.cuda.is_available() else ["torch"])


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
        """Before the update: gradients are accumulated and clipped (Child-Tuning masks here)."""
        if self.hooks.before_optimizer_step is not None:
            share_random_state()
            self.hooks.before_optimizer_step(model, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        """After the update (ReLoRA restarts, AdaLoRA reallocates here)."""
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
    """Trainer whose loss includes a method's explicit extra term (e.g. a regulariser), whose data
    order does not depend on the number of processes, and whose checkpoints hold the peftkit
    adapter and the method's state and are written atomically."""

    def __init__(
        self,
        *args: Any,
        extra_loss: Any = None,
        hooks: TrainingHooks | None = None,
        loss_uses_token_count: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss_uses_token_count is not None:
            # Trainer assumes a model whose forward takes **kwargs divides its loss by the token
            # count it passes, and so multiplies the loss by the process count (and skips the
            # division by accumulation steps). Heads that average per batch themselves (sequence
            # classification, T5) would train on a loss N times too large.
            self.model_accepts_loss_kwargs = loss_uses_token_count
        self.extra_loss = extra_loss
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
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.extra_loss is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + self.extra_loss(self.model), outputs
        return result + self.extra_loss(self.model)

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        """An EpochSampler: the order depends on the seed and epoch, never on the process count."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        grouped = args.train_sampling_strategy == "group_by_length"
        global_batch = args.train_batch_size * args.world_size * args.gradient_accumulation_steps
        lengths = (
            [len(example["input_ids"]) for example in dataset] if grouped else [0] * len(dataset)
        )
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.epoch_sampler = EpochSampler(lengths, seed, global_batch if grouped else None)
        return self.epoch_sampler

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint's model part: the peftkit adapter (only what the method trains)."""
        if self.args.should_save:
            api.save(self.model, output_dir or self.args.output_dir)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Build the checkpoint beside the others, add the method's state, then rename it into
        place: a crash while saving leaves the earlier checkpoints as they were."""
        final_root = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging = final_root / STAGING / name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
        wait_for_everyone()
        self.args.output_dir = str(final_root / STAGING)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(final_root)
        if self.args.should_save and self.method_hooks.state is not None:
            torch.save(self.method_hooks.state(self.model), staging / METHOD_STATE_NAME)
        wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            publish(staging, final_root / name)
        wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Load a checkpoint's adapter into the (already adapted) model."""
        target = model if model is not None else self.model
        tensors = io.read_tensors(Path(resume_from_checkpoint))
        api.applied(target).method.load_state_dict(target, tensors)


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files to disk, so the rename below publishes complete files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def publish(staging: Path, final: Path) -> None:
    """Rename a complete checkpoint into place (replacing one of the same step, from a run that
    went past it before being resumed from an earlier one)."""
    _fsync_tree(staging)
    if final.exists():
        retired = staging.with_name(f"{staging.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)


def find_checkpoint(output: Path, resume: str | bool) -> Path:
    """The checkpoint to resume from: the newest complete one in the run folder, or a given one."""
    if resume is True or resume == "latest":
        folder = output / CHECKPOINTS
        found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if found is None:
            raise ConfigError(
                f"Nothing to resume: no complete checkpoint in {folder}. Checkpoints are written "
                "every training.save_steps steps (set it above 0), or pass --resume PATH."
            )
        return Path(found)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() or not (path / io.CONFIG_NAME).is_file():
        raise ConfigError(
            f"{path} is not a complete peftkit checkpoint (it needs trainer_state.json and "
            f"{io.CONFIG_NAME}); pass a checkpoint-N folder from a run's {CHECKPOINTS}/ folder."
        )
    return path


def sharding_backend() -> str | None:
    """'FSDP' or 'DeepSpeed ZeRO' when `accelerate launch` set one up, else None."""
    found = (name for var, name in SHARDING_VARIABLES.items() if os.environ.get(var) == "true")
    return next(found, None)


def parameters_sharded() -> bool:
    """FSDP and ZeRO-3 keep only a shard of each weight on a process (ZeRO-1/2 keep them whole)."""
    zero_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return sharding_backend() == "FSDP" or (sharding_backend() is not None and zero_stage == "3")


def refuse_unsupported_sharding(
    method_name: str, hooks: TrainingHooks, recipe: Recipe, resume: Any
) -> None:
    """FSDP and DeepSpeed ZeRO shard weights, gradients and the optimizer step across processes:
    a method whose hooks read or rewrite whole weights or gradients cannot run under them, and
    peftkit's checkpoints need whole weights on the main process."""
    backend = sharding_backend()
    if backend is None:
        return
    names = ("prepare", "before_optimizer_step", "after_optimizer_step", "replace_optimizer")
    used = [name for name in names if getattr(hooks, name) is not None]
    if used:
        raise ConfigError(
            f"Method '{method_name}' cannot train under {backend}: its {', '.join(used)} hook(s) "
            f"read or change whole weights and gradients, which {backend} shards across "
            "processes. Launch it with plain DDP instead (torchrun, or accelerate launch with "
            "distributed_type: MULTI_GPU / MULTI_CPU); docs/distributed.md lists what each "
            "backend supports."
        )
    if parameters_sharded() and (recipe.training.save_steps > 0 or resume):
        raise ConfigError(
            "Checkpoints and --resume are not supported where weights are sharded (FSDP, "
            "DeepSpeed ZeRO-3): set training.save_steps: 0, or use DDP or ZeRO-1/2."
        )


def gathered_model(trainer: PeftkitTrainer, recipe: Recipe, config: Any) -> Any:
    """The trained model, whole, on the main process (None elsewhere). Under FSDP or ZeRO-3 every
    process joins accelerate's gather and the main one rebuilds the model from it: methods
    allowed there have no prepare hook, so apply() gives the same structure again."""
    if not parameters_sharded():
        return trainer.model if trainer.is_world_process_zero() else None
    engine = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model_wrapped
    state = trainer.accelerator.get_state_dict(engine)  # a collective: every process calls it
    if not trainer.is_world_process_zero():
        return None
    base, _ = load_model(recipe.model, recipe.task.type, num_labels=trainer.model.config.num_labels)
    rebuilt = api.apply(base, config)
    rebuilt.load_state_dict(state)
    return rebuilt


def check_processes_agree(model: Any) -> None:
    """Refuse to train when processes prepared different adapters: DDP would average unrelated
    weights. Compares each saved tensor's shape and sum across processes."""
    if not distributed():
        return
    tensors = api.applied(model).method.state_dict(model)
    fingerprint = [(k, tuple(v.shape), float(v.double().sum())) for k, v in sorted(tensors.items())]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, fingerprint)
    if any(other != gathered[0] for other in gathered):
        raise ConfigError(
            "The processes prepared different adapters (the method's prepare step saw different "
            "data or random numbers on each). Give every process the same data and seed."
        )


def training_arguments(recipe: Recipe, output: Path) -> TrainingArguments:
    """TrainingArguments from the recipe's training section."""
    t = recipe.training
    return TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        seed=t.seed,
        report_to="none",
        remove_unused_columns=False,  # features are already exactly what the model takes
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        use_cpu=not torch.cuda.is_available(),
        bf16=t.precision == "bf16",  # autocast; weights and optimizer state stay fp32
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def evaluate(model: Any, recipe: Recipe, data: TaskData, collator: Collator) -> dict[str, float]:
    """The task's metrics on the held-out features."""
    task_type = TASK_TYPES[recipe.task.type]
    return task_type.evaluate(model, data, collator, recipe.training.eval_batch_size)


def load_for_recipe(recipe: Recipe) -> tuple[Any, Any, TaskData]:
    """The base model, its tokenizer, and the task's tokenised data."""
    task_type = TASK_TYPES[recipe.task.type]
    train_rows, eval_rows = split_rows(recipe.task)
    labels = sorted({str(row.get(recipe.task.label_column)) for row in train_rows})
    num_labels = len(labels) if recipe.task.type == "classification" else None
    model, tokenizer = load_model(
        recipe.model, recipe.task.type, num_labels=num_labels, seed=recipe.training.seed
    )
    data = task_type.prepare(recipe.task, tokenizer, train_rows, eval_rows)
    if data.labels:
        # Name the classes in the model config, so a merged model's predictions are readable.
        model.config.id2label = dict(enumerate(data.labels))
        model.config.label2id = {name: i for i, name in enumerate(data.labels)}
    return model, tokenizer, data


def run(recipe: Recipe, resume: str | bool | None = None) -> dict[str, Any]:
    """Train the recipe's method on its task; write adapter, recipe and summary.json. `resume`:
    True or "latest" for the run's newest checkpoint, or a checkpoint folder."""
    if recipe.training.threads:
        torch.set_num_threads(recipe.training.threads)
    set_seed(recipe.training.seed)
    output = Path(recipe.output_dir)
    main_process = os.environ.get("RANK", "0") == "0"  # set by torchrun and accelerate launch
    checkpoint = find_checkpoint(output, resume) if resume else None
    config = recipe.method_config()
    metric = headline_metric(recipe.task)
    model, tokenizer, data = load_for_recipe(recipe)
    collator = Collator(tokenizer.pad_token_id)
    before = evaluate(model, recipe, data, collator) if main_process else {}

    set_seed(recipe.training.seed)  # the method's own initialisation is seeded too
    # Resuming rebuilds the adapter from the checkpoint (including what prepare chose).
    model = api.apply(model, config) if checkpoint is None else api.load(model, checkpoint)
    method = api.applied(model)
    hooks = method.method.hooks(model, method.config)
    refuse_unsupported_sharding(method.method.name, hooks, recipe, resume)
    args = training_arguments(recipe, output)  # under torchrun this joins the process group
    prepare_seconds = 0.0
    if hooks.prepare is not None and checkpoint is None:
        start = time.perf_counter()
        # Every process sees all the batches, of the global batch size: the same choice as one
        # process makes, on each of them.
        batch_size = recipe.training.batch_size * args.world_size
        hooks.prepare(model, DataLoader(data.train, batch_size=batch_size, collate_fn=collator))
        prepare_seconds = time.perf_counter() - start
        check_processes_agree(model)
    # Counted after prepare: a data-driven method (Child-Tuning D) builds its parameters there.
    counts = api.summary(model)
    if main_process:
        print(counts)
    resume_state = None
    if checkpoint is not None and (checkpoint / METHOD_STATE_NAME).is_file():
        resume_state = torch.load(checkpoint / METHOD_STATE_NAME, weights_only=True)

    train_collator = Collator(tokenizer.pad_token_id)  # counts only training tokens
    trainer = PeftkitTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=train_collator,
        processing_class=tokenizer,
        callbacks=[HooksCallback(hooks, resume_state)],
        extra_loss=hooks.extra_loss,
        hooks=hooks,
        # transformers' causal-LM heads divide by the token count given (Trainer detects them);
        # classification and seq2seq heads average per batch.
        loss_uses_token_count=None if recipe.task.type == "causal-lm" else False,
    )
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    model = gathered_model(trainer, recipe, method.config)
    if model is None:  # not the main process: it trained its share; the main one reports
        return {}
    train_seconds = float(result.metrics["train_runtime"])
    state_bytes = optimizer_state_bytes(trainer.optimizer)
    after = evaluate(model, recipe, data, collator)

    adapter_dir = output / "adapter"
    info = {"base_model": recipe.model, "task": recipe.task.type, "labels": data.labels}
    api.save(model, adapter_dir, info=info)
    save_recipe(recipe, output / "recipe.yaml")
    summary = {
        "method": recipe.method["name"],
        "model": recipe.model,
        "task": recipe.task.type,
        **counts.as_dict(),
        "peak_memory_mib": mib(peak_memory_bytes()),
        "optimizer_state_mib": mib(state_bytes),
        "train_tokens": train_collator.tokens_seen,
        "tokens_per_second": train_collator.tokens_seen / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "prepare_seconds": prepare_seconds,
        "steps": result.global_step,
        "processes": args.world_size,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "final_train_loss": float(result.training_loss),
        "metric": metric,
        "metric_before": before[metric],
        "metric_after": after[metric],
        "eval_before": before,
        "eval_after": after,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "truncated_examples": data.truncated,
        "dropped_examples": data.dropped,
        "adapter_bytes": folder_bytes(adapter_dir),
        "adapter_dir": str(adapter_dir),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {output / 'summary.json'} and the adapter in {adapter_dir}")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The run's summary as an aligned two-column table."""
    metric = summary["metric"]
    rows = [
        ("method", summary["method"]),
        ("model", summary["model"]),
        (
            "trainable params",
            f"{summary['trainable_parameters']:,} ({summary['trainable_percent']:.3f}%)",
        ),
        ("peak memory", f"{summary['peak_memory_mib']:.0f} MiB"),
        ("optimizer state", f"{summary['optimizer_state_mib']:.2f} MiB"),
        ("tokens/s (train)", f"{summary['tokens_per_second']:.0f}"),
        ("train time", f"{summary['train_seconds']:.1f} s ({summary['steps']} steps)"),
        (f"{metric} before", f"{summary['metric_before']:.4f}"),
        (f"{metric} after", f"{summary['metric_after']:.4f}"),
    ]
    if "majority_baseline" in summary["eval_after"]:
        rows.append(("majority baseline", f"{summary['eval_after']['majority_baseline']:.4f}"))
    rows.append(("adapter size", f"{summary['adapter_bytes'] / 1024:.1f} KiB"))
    if summary["truncated_examples"]:
        rows.append(("truncated examples", str(summary["truncated_examples"])))
    width = max(len(name) for name, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 32 + "+"
    body = [f"| {name:<{width}} | {value:<30} |" for name, value in rows]
    return "\n".join([line, *body, line])
