"""Shared set-up for the tests of the task types that train on TRL's trainers (preference, KTO,
GRPO): the seeded tiny Llama, a trainer built through peftkit's own builder on a few rows, and an
adapter moved off its initialisation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import peftkit
from peftkit.models import load_model
from peftkit.recipe import Recipe, TrainConfig
from peftkit.tasks.base import BuiltTrainer, TrainerParts
from peftkit.tasks.config import TaskConfig
from peftkit.tasks.types import get_task_type


def base_model() -> torch.nn.Module:
    """The tiny Llama, seeded: every call gives the same weights."""
    return load_model("tiny-llama", "causal-lm", seed=0)[0]


def built_trainer(
    tmp_path: Path, builder: Callable[[TrainerParts], BuiltTrainer], task: TaskConfig,
    rows: list[dict], method: Any, options: Any, steps: int = 1, batch_size: int = 4,
) -> tuple[Any, dict, torch.nn.Module, Any]:  # fmt: skip
    """(trainer, notes, applied model, task data) through peftkit's builder on `rows` (train and
    held out the same); `options` is the recipe's section named as the task type (preference,
    kto, grpo)."""
    from peftkit.training.run import training_argument_values

    model, tokenizer = load_model("tiny-llama", "causal-lm", seed=0)
    recipe = Recipe(
        model="tiny-llama", task=task, method={"name": "lora"}, **{task.type: options},
        training=TrainConfig(max_steps=steps, batch_size=batch_size, learning_rate=0.05,
                             warmup_ratio=0.0, logging_steps=1, group_by_length=False),
        output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    data = get_task_type(task.type).prepare(task, tokenizer, rows, rows)
    torch.manual_seed(0)
    model = peftkit.apply(model, method)
    state = peftkit.api.applied(model)
    hooks = state.method.training_hooks(model, state.config)
    arguments = training_argument_values(recipe, tmp_path / "run")
    arguments.update(report_to="none", disable_tqdm=True)
    built = builder(
        TrainerParts(recipe, model, tokenizer, data, arguments, [], hooks, resumed=False)
    )
    return built.trainer, built.notes, model, data


def perturb_adapter(model: torch.nn.Module) -> None:
    """Move every trainable tensor off its initialisation, so the policy is not the base."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
