"""`peftkit train` under torchrun: two CPU processes (gloo, DDP) of batch 4 end with the adapter
one process of batch 8 writes, saved once by the main process; Child-Tuning's Fisher choice and
random masks agree across processes. Methods whose hooks cannot run sharded are refused under FSDP
and DeepSpeed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import adapter_tensors, max_difference, write_recipe
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.models import load_model


@pytest.fixture(scope="module")
def model_without_dropout(tmp_path_factory) -> Path:
    """tiny-bert saved with dropout off: each process draws its own dropout masks, so only a
    model without dropout can match one process bit for bit (up to summation order)."""
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model, tokenizer = load_model("tiny-bert", "classification", num_labels=2)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def torchrun(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`peftkit train` on two local CPU processes."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "peftkit.cli", "train",
               str(recipe), *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _logits(base_folder: Path, adapter: Path) -> torch.Tensor:
    """The base with a run's adapter loaded: its logits on a small fixed batch."""
    model, tokenizer = load_model(str(base_folder), "classification", num_labels=2)
    tuned = peftkit.load(model, adapter).eval()
    batch = tokenizer(["the cat sat", "a dog ran far away", "peft"], return_tensors="pt",
                      padding=True)  # fmt: skip
    with torch.no_grad():
        return tuned(**batch).logits


def without(tensors: dict, names: list[str]) -> dict:
    return {k: v for k, v in tensors.items() if k not in names}


def only(tensors: dict, names: list[str]) -> dict:
    return {k: v for k, v in tensors.items() if k in names}


@pytest.mark.parametrize("method", ["lora", "child_tuning_f", "child_tuning_d"])
def test_two_processes_match_one_process_of_the_same_global_batch(
    method, model_without_dropout, tmp_path
):
    recipe = write_recipe(
        tmp_path, method, tmp_path / "two", model=str(model_without_dropout), save_steps=6
    )
    no_dropout = ["--set", "method.dropout=0.0"] if method == "lora" else []
    result = torchrun(recipe, "--set", "training.batch_size=4", *no_dropout)
    assert result.returncode == 0, result.stderr[-3000:]
    one = ["train", str(recipe), "--output-dir", str(tmp_path / "one"), *no_dropout]
    assert main(one) == 0

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 12
    assert result.stdout.count("summary.json and the adapter") == 1  # reported once
    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint-6"
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }
    two, one = adapter_tensors(tmp_path / "two"), adapter_tensors(tmp_path / "one")
    # An attention key bias adds the same amount to every score of a query, which softmax
    # ignores: its true gradient is zero and what it gets is rounding noise, which Adam turns into
    # steps of about the learning rate, so those tensors may differ. The rest agree, and so do
    # the two models' outputs, the key biases included.
    noise_only = [name for name in one if ".key.bias" in name]
    assert max_difference(*(without(t, noise_only) for t in (two, one))) <= 1e-5
    outputs = [_logits(model_without_dropout, tmp_path / run / "adapter") for run in ("two", "one")]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    untrained = write_recipe(tmp_path, method, tmp_path / "none", model=str(model_without_dropout))
    assert main(["train", str(untrained), "--max-steps", "1", *no_dropout]) == 0
    early = adapter_tensors(tmp_path / "none")
    shared = [k for k in early if k in two and early[k].shape == two[k].shape]
    assert max_difference(only(two, shared), only(early, shared)) > 1e-3  # 12 steps moved it


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_training_refuses_methods_with_weight_hooks(
    variable, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(variable, "true")
    recipe = write_recipe(tmp_path, "child_tuning_f", tmp_path / "run")
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err
    backend = "FSDP" if variable == "ACCELERATE_USE_FSDP" else "DeepSpeed ZeRO"
    assert f"Method 'child_tuning' cannot train under {backend}" in error
    assert "replace_optimizer hook" in error and "plain DDP" in error  # F masks in the step
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_checkpoints_are_refused_where_weights_are_sharded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    recipe = write_recipe(tmp_path, "lora", tmp_path / "run", save_steps=4)
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert "Checkpoints and --resume are not supported where weights are sharded" in error
    assert "save_steps: 0" in error
