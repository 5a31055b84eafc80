"""What a careless or hostile input must not do to a run's files (issue 30): every case feeds the
bad input through the command line or the API and checks the files it must not touch."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from tiny_runs import write_recipe

import peftkit
from contract import tiny
from peftkit.cli import main
from peftkit.errors import AdapterError


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path, with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def no_model_loads() -> mock._patch:
    """Model loading replaced by a failure: what is refused must be refused before it."""
    return mock.patch("peftkit.models.load_model", side_effect=AssertionError("a model loaded"))


@pytest.mark.parametrize(
    "training, message",
    [
        ("{learning_rate: .inf}", "'learning_rate' in training must be a finite number, got inf"),
        ("{learning_rate: .nan}", "'learning_rate' in training must be a finite number, got nan"),
        ("{max_steps: .inf}", "'max_steps' in training must be a finite number, got inf"),
        ("{max_steps: 0, epochs: .nan}", "'epochs' in training must be a finite number, got nan"),
        ("{eval_batch_size: 0}", "training.eval_batch_size must be at least 1, got 0"),
        ("{seed: -1}", "training.seed must be in [0, 4294967295], got -1"),
        ("{threads: -1}", "training.threads must be at least 1, got -1"),
        ("{warmup_ratio: -0.5}", "training.warmup_ratio must be in [0, 1), got -0.5"),
        ("{logging_steps: 0}", "training.logging_steps must be at least 1, got 0"),
    ],
)
def test_bad_training_numbers_are_refused_before_anything_is_written(
    tmp_path, capsys, training, message
):
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: tiny-bert\ntask: {{dataset: amazon-reviews}}\nmethod: lora\n"
        f"training: {training}\noutput_dir: {run}\n"
    )
    with no_model_loads():
        assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err == f"peftkit: error: {message}.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no run folder, nothing


def test_an_adapter_with_non_finite_weights_is_not_saved(tmp_path):
    model, _ = tiny("llama")
    model = peftkit.apply(model, peftkit.LoraConfig(rank=4))
    folder = tmp_path / "adapter"
    peftkit.save(model, folder)
    earlier = snapshot(folder)
    weight = next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
        weight[1, 1] = float("inf")
    with pytest.raises(AdapterError) as raised:
        peftkit.save(model, folder)
    message = str(raised.value)
    assert "holds 2 non-finite values (nan or inf)" in message and "Nothing was written" in message
    assert "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'" in message
    assert snapshot(folder) == earlier  # the earlier adapter is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging left behind
    with pytest.raises(AdapterError, match="Not saving the adapter"):
        peftkit.save(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_home_in_output_dir_is_expanded_once_for_every_file_of_the_run(
    tmp_path, monkeypatch, capsys
):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    recipe = write_recipe(tmp_path, "lora", Path("~/runs/x"), max_steps=2, save_steps=1)
    recipe.write_text(recipe.read_text().replace(f"train_file: {tmp_path}", "train_file: ~/.."))
    assert main(["train", str(recipe)]) == 0
    run = home / "runs" / "x"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    assert f"output_dir: {run}\n" in (run / "recipe.yaml").read_text()  # expanded, as it ran
    assert list(work.iterdir()) == []  # no literal ./~ folder
    capsys.readouterr()
    # from the command line too: --output-dir=~/... (no shell expands it) and --set
    assert main(["train", str(recipe), "--output-dir=~/runs/y", "--max-steps", "1"]) == 0
    assert (home / "runs" / "y" / "summary.json").is_file() and list(work.iterdir()) == []


def test_merge_into_an_existing_file_is_refused_before_a_model_loads(tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"mine")
    with no_model_loads():
        assert main(["merge", str(tmp_path / "any-adapter"), "--output", str(target)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"peftkit: error: merge --output {target} is an existing file")
    assert target.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_merge_expands_home_in_its_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    model, _ = tiny("llama")
    peftkit.save(peftkit.apply(model, peftkit.LoraConfig(rank=4)), tmp_path / "adapter")
    argv = ["merge", "~/adapter", "--model", "tiny-llama", "--output", "~/merged"]
    assert main(argv) == 0
    assert f"wrote the merged model to {tmp_path / 'merged'}" in capsys.readouterr().out
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "~").exists()
