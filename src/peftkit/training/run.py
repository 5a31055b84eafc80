"""One training run from a resolved plan (plan.py): load, evaluate before, apply the method,
train with transformers.Trainer, evaluate after, save; every run ends with a summary table and
summary.json in the output folder. Generic: never asks which method or task type it holds.

Under `torchrun` or `accelerate launch` every process trains its share of each global batch (DDP)
and the main process alone evaluates, saves and reports (training/distributed.py). Checkpoints
every `save_steps` appear only when complete, and `resume` continues from one exactly
(training/checkpoints.py, docs/distributed.md)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainingArguments, set_seed

import peftkit.api as api
from peftkit.data.collate import Collator
from peftkit.errors import ConfigError, OutputError, PeftkitError
from peftkit.io import write_text_atomically
from peftkit.models import load_model, storage_for
from peftkit.models.precision import stored_bytes
from peftkit.plan import Plan
from peftkit.recipe import Recipe, save_recipe
from peftkit.run_folder import (
    TRAINING_ENTRIES,
    check_output_dir,
    discard_previous,
    record_entries,
    set_aside_earlier_run,
    settle_entries,
    write_failure,
)
from peftkit.tasks.base import BuiltTrainer, TaskData, TrainerParts, read_split
from peftkit.training.checkpoints import (
    CheckpointCallback,
    find_checkpoint,
    method_state,
    staging_root,
)
from peftkit.training.distributed import (
    check_processes_agree,
    gathered_model,
    is_main_process,
    refuse_unsupported_sharding,
)
from peftkit.training.gradient_checkpointing import enable_gradient_checkpointing
from peftkit.training.measure import (
    TrainingMemory,
    estimated_training_memory,
    folder_bytes,
    mib,
    optimizer_state_bytes,
    peak_memory_bytes,
)
from peftkit.training.memory_probe import TensorMemoryProbe
from peftkit.training.sharded_checkpoints import ShardedTrainer, check_resume_sharding
from peftkit.training.sharding import rebuilt_model, refuse_unsupported, shard, sharded
from peftkit.training.step_clock import StepClock
from peftkit.training.summary_table import format_summary
from peftkit.training.task_trainers import trainer_builder
from peftkit.training.trainer import HooksCallback, PeftkitTrainer


def training_arguments(recipe: Recipe, output: Path) -> TrainingArguments:
    """TrainingArguments from the recipe's training section."""
    return TrainingArguments(**training_argument_values(recipe, output))


def training_argument_values(recipe: Recipe, output: Path) -> dict[str, Any]:
    """TrainingArguments' keyword values from the recipe's training section (a task type's own
    trainer passes them to its TrainingArguments subclass)."""
    t = recipe.training
    return dict(
        output_dir=str(staging_root(output)),  # checkpoints are published from here when complete
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
        save_total_limit=t.save_total_limit,  # applied where checkpoints are published
        seed=t.seed,
        report_to=t.report_to,  # TensorBoard writes to output/logs (reporting_environment)
        remove_unused_columns=False,  # features are already exactly what the model takes
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        use_cpu=not torch.cuda.is_available(),
        bf16=t.precision == "bf16",  # autocast; weights and optimizer state stay fp32
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def evaluate(model: Any, plan: Plan, data: TaskData, collator: Collator) -> dict[str, float]:
    """The task's metrics on the held-out features."""
    return plan.task_type.evaluate(model, data, collator, plan.recipe.training.eval_batch_size)


def load_for_plan(plan: Plan) -> tuple[Any, Any, TaskData]:
    """The base model, its tokenizer, and the task's tokenised data."""
    recipe, task_type = plan.recipe, plan.task_type
    # each file's rows checked by the task type
    train_rows, eval_rows = read_split(recipe.task, task_type)
    labels = None
    if task_type.labels is not None:
        labels = task_type.labels(recipe.task, train_rows)
    model, tokenizer = load_model(
        recipe.model, recipe.task.type, num_labels=len(labels) if labels else None,
        seed=recipe.training.seed, dtype=recipe.base.dtype, quantize=recipe.base.quantize,
    )  # fmt: skip
    check_max_length(recipe.task.max_length, model, recipe.model)
    data = task_type.prepare(recipe.task, tokenizer, train_rows, eval_rows)
    if data.labels:
        # Name the classes in the model config, so a merged model's predictions are readable.
        model.config.id2label = dict(enumerate(data.labels))
        model.config.label2id = {name: i for i, name in enumerate(data.labels)}
    return model, tokenizer, data


def check_max_length(max_length: int, model: Any, model_name: str) -> None:
    """Refuse a task.max_length beyond the model's table of learned positions (BERT, GPT-2:
    the first forward pass would fail); rotary or relative positions (Llama, T5) take any."""
    config = model.config
    size = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    words = model.get_input_embeddings()
    tables = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        and module is not words
        and module.num_embeddings == size
    ]
    if not tables:
        return
    offset = tables[0].padding_idx  # RoBERTa's positions start after its padding index
    positions = size - (offset + 1 if offset is not None else 0)
    if max_length > positions:
        raise ConfigError(
            f"task.max_length is {max_length}, but model {model_name} has learned positions for "
            f"only {positions} tokens. Set task.max_length to {positions} or less."
        )


@contextlib.contextmanager
def naming_write_failures(what: str, after: str, output: Path | None = None) -> Iterator[None]:
    """Turn a failed write in the block (disk full, read-only, ...: torch's, safetensors' or the
    OS's error) into one OutputError naming what was being written, the cause and what is kept;
    with `output`, checkpoints left half-built in its staging folder are removed first."""
    try:
        yield
    except PeftkitError:
        raise
    except Exception as error:
        cause = write_failure(error)
        if cause is None:
            raise
        if output is not None:
            for partial in staging_root(output).glob("checkpoint-*"):
                shutil.rmtree(partial, ignore_errors=True)
        raise OutputError(f"{what} failed: {cause}. {after}") from None


def _previous_note(previous: Path | None) -> str:
    """Where --overwrite's earlier run waits, for an error message ('' without one)."""
    return f" The earlier run is kept, whole, in {previous}." if previous else ""


def settle_first_forward(model: Any, features: Any, collator: Collator, batch_size: int) -> None:
    """One forward of the first training examples, in eval mode without gradients, before
    training starts. A method that fixes how it computes on its first forward (LoRA's fast path
    groups the layers that read one input) then computes step 0 of a fresh run and the first
    step of a resumed one alike, so a resumed run ends with the uninterrupted run's adapter bit
    for bit. Eval mode draws no random numbers, so the training steps draw what they did."""
    was_training = model.training
    batch = collator([features[i] for i in range(min(batch_size, len(features)))])
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            model(**{key: value.to(device) for key, value in batch.items()})
    finally:
        model.train(was_training)


def logs_folder(output: Path) -> Path:
    """Where experiment trackers that write files (TensorBoard) put them: inside the run."""
    return output / "logs"


@contextlib.contextmanager
def reporting_environment(output: Path) -> Iterator[None]:
    """TensorBoard's callback takes its folder from TENSORBOARD_LOGGING_DIR when Trainer builds
    it (its default, Trainer's output_dir, is the checkpoint staging folder, which is cleared);
    a folder the user set there is kept."""
    if "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs_folder(output))
    try:
        yield
    finally:
        del os.environ["TENSORBOARD_LOGGING_DIR"]


def check_reporter_installed(name: str) -> None:
    """Refuse, before any model loads, a report_to whose package is not installed."""
    if name == "none":
        return
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    if name not in get_available_reporting_integrations():
        extra = " (pip install 'peftkit[tensorboard]')" if name == "tensorboard" else ""
        raise ConfigError(
            f"training.report_to is {name!r}, but its package is not installed: install it"
            f"{extra}, or set training.report_to: none."
        )


@contextlib.contextmanager
def process_settings_kept() -> Iterator[None]:
    """Put torch's thread count and the random generators (Python's, NumPy's, torch's CPU one)
    back as they were: a run sets them for itself (training.threads, training.seed), and a
    caller in the same process (a notebook, the test suite) must not inherit them."""
    import random

    import numpy

    threads = torch.get_num_threads()
    states = random.getstate(), numpy.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        torch.set_rng_state(states[2])


def run(plan: Plan, resume: str | bool | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train the plan's method on its task; write adapter, recipe and summary.json. `resume`:
    True or "latest" for the run's newest checkpoint, or a checkpoint folder. A folder holding
    an earlier run is refused unless resumed, or replaced with `overwrite` (run_folder.py).
    The process's thread count and random states are as before once it returns or raises."""
    with process_settings_kept():
        return _run(plan, resume, overwrite)


def _run(plan: Plan, resume: str | bool | None, overwrite: bool) -> dict[str, Any]:
    """run()'s work, with the process settings it changes put back by run()."""
    recipe = plan.recipe
    output = plan.output
    main_process = is_main_process()
    check_output_dir(output, resume, overwrite)
    check_reporter_installed(recipe.training.report_to)
    # A base the method cannot train on was refused when the plan was resolved; a quantisation
    # bitsandbytes cannot run here is refused before an earlier run is set aside.
    storage_for(recipe.base.dtype, recipe.base.quantize)
    checkpoint = find_checkpoint(output, resume) if resume else None
    previous = set_aside_earlier_run(output) if overwrite and main_process else None
    if previous is not None:
        print(f"--overwrite: the earlier run in {output} is kept in {previous} until this one "
              "finishes")  # fmt: skip
    if recipe.training.threads:
        torch.set_num_threads(recipe.training.threads)
    set_seed(recipe.training.seed)
    config = plan.method_config
    task_type = plan.task_type
    metric = plan.metric
    model, tokenizer, data = load_for_plan(plan)
    collator = Collator(tokenizer.pad_token_id)
    before = evaluate(model, plan, data, collator) if main_process else {}

    if recipe.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_seed(recipe.training.seed)  # the method's own initialisation is seeded too
    # Resuming rebuilds the adapter from the checkpoint (including what prepare chose).
    model = api.apply(model, config) if checkpoint is None else api.load(model, checkpoint)
    method = api.applied(model)
    hooks = method.method.training_hooks(model, method.config)
    refuse_unsupported_sharding(method.method.name, hooks, recipe, resume)
    if main_process:  # what this run writes is recorded first: --overwrite moves only that
        record_entries(output, TRAINING_ENTRIES)
    own_trainer = trainer_builder(task_type)  # None: PeftkitTrainer on the token loss
    refuse_unsupported(recipe, resume, own_trainer=own_trainer is not None)  # fsdp
    args = training_arguments(recipe, output)  # under torchrun this joins the process group
    check_resume_sharding(checkpoint, sharded(recipe))
    prepare_seconds = 0.0
    if hooks.prepare is not None and checkpoint is None:
        start = time.perf_counter()
        # Every process sees all the batches, of the global batch size: the same choice as one
        # process makes, on each of them.
        batch_size = recipe.training.batch_size * args.world_size
        hooks.prepare(model, DataLoader(data.train, batch_size=batch_size, collate_fn=collator))
        prepare_seconds = time.perf_counter() - start
        check_processes_agree(model)
    # Counted after prepare: a data-driven method builds its parameters there.
    counts = api.summary(model)
    if main_process:
        print(counts)
    if sharded(recipe):  # after prepare: the method's hooks saw whole weights
        shard(model, recipe.training.precision)

    settle_first_forward(model, data.train, collator, recipe.training.batch_size)
    train_collator = Collator(tokenizer.pad_token_id)  # counts only training tokens
    probe = TensorMemoryProbe()  # training memory at the allocator, over the first steps (CPU)
    step_clock = StepClock()  # per-step seconds and tokens (compare's steady-state median)
    callbacks = [
        HooksCallback(hooks, method_state(checkpoint)),
        CheckpointCallback(output, hooks, model),
        probe,
        step_clock,
    ]
    with reporting_environment(output):  # the reporting callbacks are built in Trainer.__init__
        if own_trainer is not None:  # a type with its own trainer (preference: TRL's)
            built = own_trainer(TrainerParts(
                recipe, model, tokenizer, data, training_argument_values(recipe, output),
                callbacks, hooks, resumed=checkpoint is not None,
            ))  # fmt: skip
        else:
            trainer_class = ShardedTrainer if sharded(recipe) else PeftkitTrainer  # DCP
            built = BuiltTrainer(
                trainer_class(
                    model=model,
                    args=args,
                    train_dataset=data.train,
                    data_collator=train_collator,
                    processing_class=tokenizer,
                    callbacks=callbacks,
                    hooks=hooks,
                    # Heads that divide by the token count Trainer gives them: let Trainer
                    # detect them.
                    loss_uses_token_count=None if task_type.loss_per_token else False,
                ),
                lambda: train_collator.tokens_seen,
            )
    trainer = built.trainer
    step_clock.count = built.tokens_seen
    peak_before = peak_memory_bytes()  # TrainingMemory resets the kernel's high-water mark
    kept = (
        "Complete checkpoints written before it are kept; once the cause is fixed, --resume "
        "continues from the newest." + _previous_note(previous)
    )
    with (
        naming_write_failures(f"Writing a checkpoint into {output / 'checkpoints'}", kept, output),
        TrainingMemory() as training_memory,  # the loop alone: not loading, not evaluation
    ):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if sharded(recipe):
        model = rebuilt_model(model, recipe, method.config, trainer.is_world_process_zero())
    else:
        model = gathered_model(trainer, recipe, method.config)
    if model is None:  # not the main process: it trained its share; the main one reports
        return {}
    train_seconds = float(result.metrics["train_runtime"])
    state_bytes = optimizer_state_bytes(trainer.optimizer)
    after = evaluate(model, plan, data, collator)

    adapter_dir = output / "adapter"
    info = {"base_model": recipe.model, "task": recipe.task.type, "labels": data.labels,
            "base_dtype": recipe.base.dtype, "quantize": recipe.base.quantize}  # fmt: skip
    with naming_write_failures(
        f"Saving the adapter into {adapter_dir}",
        "No half-written adapter was left." + _previous_note(previous),
    ):
        api.save(model, adapter_dir, info=info)
        save_recipe(recipe, output / "recipe.yaml")
    summary = {
        "method": plan.method.name,
        "model": recipe.model,
        "task": recipe.task.type,
        **counts.as_dict(),
        "base_dtype": recipe.base.dtype,
        "quantize": recipe.base.quantize,
        "gradient_checkpointing": recipe.training.gradient_checkpointing,
        "weight_memory_mib": mib(stored_bytes(model)),
        "peak_memory_mib": mib(max(peak_before, peak_memory_bytes())),
        **probe.report(training_memory, built.tokens_seen(), train_seconds, result.global_step),
        **estimated_training_memory(recipe, data.train),
        "optimizer_state_mib": mib(state_bytes),
        "train_tokens": built.tokens_seen(),
        "train_seconds": train_seconds,
        "prepare_seconds": prepare_seconds,
        **step_clock.report(),
        "steps": result.global_step,
        "processes": args.world_size,
        "sharding": recipe.training.sharding if args.world_size > 1 else "none",
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
        "dropped_eval_examples": data.dropped_eval,
        "adapter_bytes": folder_bytes(adapter_dir),
        "adapter_dir": str(adapter_dir),
        **built.notes,  # what a task type's own trainer says (preference: its reference model)
    }
    with naming_write_failures(
        f"Writing {output / 'summary.json'}",
        f"The adapter in {adapter_dir} is complete." + _previous_note(previous),
    ):
        write_text_atomically(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    settle_entries(output)
    discard_previous(previous)  # the new run is complete: the one it replaces can go
    print(format_summary(summary))
    print(f"wrote {output / 'summary.json'} and the adapter in {adapter_dir}")
    return summary
