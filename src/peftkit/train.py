"""Training: transformers.Trainer plus one callback that runs the method's hooks; every run ends
with a summary table and summary.json in the output folder. Generic: never asks which method."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import peftkit.api as api
from peftkit.data.tokenize import Collator
from peftkit.measure import folder_bytes, mib, optimizer_state_bytes, peak_memory_bytes
from peftkit.method import TrainingHooks
from peftkit.models import load_model
from peftkit.recipe import Recipe, save_recipe
from peftkit.tasks import TASK_TYPES, TaskData, headline_metric, split_rows


class HooksCallback(TrainerCallback):
    """Runs a method's hooks around every optimizer step (after clipping, before the update)."""

    def __init__(self, hooks: TrainingHooks) -> None:
        self.hooks = hooks

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        """Tell the method the step budget (schedules such as AdaLoRA's depend on it)."""
        if self.hooks.begin_training is not None:
            self.hooks.begin_training(model, state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        """Before the update: gradients are accumulated and clipped (Child-Tuning masks here)."""
        if self.hooks.before_optimizer_step is not None:
            self.hooks.before_optimizer_step(model, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        """After the update (ReLoRA restarts, AdaLoRA reallocates here)."""
        if self.hooks.after_optimizer_step is not None:
            self.hooks.after_optimizer_step(model, state.global_step)


class PeftkitTrainer(Trainer):
    """Trainer whose loss includes a method's explicit extra term (e.g. a regulariser)."""

    def __init__(self, *args: Any, extra_loss: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_loss = extra_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        """The task loss plus the method's extra loss, if it has one."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.extra_loss is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + self.extra_loss(self.model), outputs
        return result + self.extra_loss(self.model)


def training_arguments(recipe: Recipe, output: Path) -> TrainingArguments:
    """TrainingArguments from the recipe's training section."""
    t = recipe.training
    return TrainingArguments(
        output_dir=str(output / "checkpoints"),
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


def run(recipe: Recipe) -> dict[str, Any]:
    """Train the recipe's method on its task; write adapter, recipe and summary.json."""
    if recipe.training.threads:
        torch.set_num_threads(recipe.training.threads)
    set_seed(recipe.training.seed)
    output = Path(recipe.output_dir)
    config = recipe.method_config()
    metric = headline_metric(recipe.task)
    model, tokenizer, data = load_for_recipe(recipe)
    collator = Collator(tokenizer.pad_token_id)
    before = evaluate(model, recipe, data, collator)

    set_seed(recipe.training.seed)  # the method's own initialisation is seeded too
    model = api.apply(model, config)
    counts = api.summary(model)
    print(counts)
    hooks = api.applied(model).method.hooks(model, config)
    prepare_seconds = 0.0
    if hooks.prepare is not None:
        start = time.perf_counter()
        loader = DataLoader(data.train, batch_size=recipe.training.batch_size, collate_fn=collator)
        hooks.prepare(model, loader)
        prepare_seconds = time.perf_counter() - start

    train_collator = Collator(tokenizer.pad_token_id)  # counts only training tokens
    trainer = PeftkitTrainer(
        model=model,
        args=training_arguments(recipe, output),
        train_dataset=data.train,
        data_collator=train_collator,
        processing_class=tokenizer,
        callbacks=[HooksCallback(hooks)],
        extra_loss=hooks.extra_loss,
    )
    result = trainer.train()
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
