"""Shared set-up for the multi-process, resume and determinism tests: a small classification task
on disk, recipes for it, and adapter comparison."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

METHODS = {
    "lora": "{name: lora, rank: 4}",
    "lora_peft_forward": "{name: lora, rank: 4, fast_path: false}",
    "child_tuning_f": "{name: child_tuning, mode: F, reserve_ratio: 0.3}",
    "child_tuning_d": "{name: child_tuning, mode: D, reserve_ratio: 0.3}",
}


def write_task(folder: Path, examples: int = 64) -> tuple[Path, Path]:
    """Training and held-out files of short positive/negative texts of several lengths (the
    lengths make length grouping matter); `examples` a multiple of every global batch used."""
    words = {"pos": "good fine great nice", "neg": "bad awful poor sad"}
    rows = []
    for i in range(examples):
        label = "pos" if i % 2 else "neg"
        rows.append({"text": " ".join(words[label].split()[: 1 + i % 4]), "label": label})
    train, held_out = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows[:16]))
    return train, held_out


def write_recipe(
    folder: Path, method: str, output: Path, model: str = "tiny-bert", **training
) -> Path:
    """A recipe file for the task in `folder`; training options override the small defaults."""
    train, held_out = write_task(folder)
    options = {"max_steps": 12, "batch_size": 8, "learning_rate": 0.01, "logging_steps": 4,
               "threads": 1, **training}  # fmt: skip
    training_text = ", ".join(f"{key}: {value}" for key, value in options.items())
    recipe = folder / f"{method}-{output.name}.yaml"
    recipe.write_text(
        f"model: {model}\n"
        f"task: {{type: classification, train_file: {train}, eval_file: {held_out}, "
        f"max_length: 32}}\n"
        f"method: {METHODS[method]}\n"
        f"training: {{{training_text}}}\n"
        f"output_dir: {output}\n"
    )
    return recipe


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's final adapter."""
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two adapters with the same tensors."""
    assert first.keys() == second.keys()
    assert all(first[k].shape == second[k].shape for k in first)
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first)
