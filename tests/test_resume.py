"""Checkpoints and resume: a run killed with SIGKILL mid-run, or crashed while saving, resumes from
its newest complete checkpoint and ends with the adapter an uninterrupted run writes; a crash
while saving leaves the earlier checkpoints intact; a method's own state survives the resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_runs import adapter_tensors, max_difference, write_recipe
from transformers.trainer_utils import get_last_checkpoint

import peftkit.api as api
from peftkit.cli import main
from peftkit.errors import AdapterError
from peftkit.method import TrainingHooks
from peftkit.models import load_model
from peftkit.training.checkpoints import METHOD_STATE_NAME, STAGING
from peftkit.training.trainer import PeftkitTrainer


def crash_saving_at(monkeypatch, step: int) -> None:
    """Make the checkpoint of `step` fail half-way: after its adapter and optimizer are written."""
    original = PeftkitTrainer._save_rng_state

    def failing(self, output_dir):
        if self.state.global_step == step:
            raise RuntimeError("disk full (simulated)")
        original(self, output_dir)

    monkeypatch.setattr(PeftkitTrainer, "_save_rng_state", failing)


# A training child that stops inside the step after checkpoint KILL_AT (written completely, as
# its folder's rename is its last act) and waits there to be killed: SIGKILL lands mid-run at a
# known point, with no race between a polling loop and a fast run.
STOPPING_CHILD = """
import pathlib, sys, time
from peftkit.cli import main
from peftkit.training.trainer import PeftkitTrainer

kill_at, marker, recipe = int(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
original = PeftkitTrainer.training_step

def stopping(self, *args, **kwargs):
    if self.state.global_step == kill_at + 1:
        marker.touch()
        time.sleep(600)
    return original(self, *args, **kwargs)

PeftkitTrainer.training_step = stopping
sys.exit(main(["train", recipe]))
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    kill_at = 15  # mid-run: the fifth of twenty checkpoints
    # LoRA and the model keep their dropout: the resumed run must restore the random state too.
    recipe = write_recipe(tmp_path, "lora", tmp_path / "run", max_steps=60, save_steps=3)
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "whole")]) == 0

    marker = tmp_path / "stopped"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPING_CHILD, str(kill_at), str(marker), str(recipe)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert marker.exists(), f"the child never reached step {kill_at + 2}: {stderr[-2000:]!r}"
    assert process.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / f"checkpoint-{kill_at}").is_dir()
    assert not (checkpoints / f"checkpoint-{kill_at + 3}").exists()
    assert not (tmp_path / "run" / "summary.json").exists()

    assert main(["train", str(recipe), "--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{kill_at}")
    difference = max_difference(
        adapter_tensors(tmp_path / "run"), adapter_tensors(tmp_path / "whole")
    )
    assert difference <= 1e-5, f"killed after step {kill_at}: max difference {difference}"


@pytest.mark.parametrize("method", ["lora", "child_tuning_f", "child_tuning_d"])
def test_crash_while_saving_keeps_the_previous_checkpoint_and_resumes_exactly(
    method, tmp_path, monkeypatch
):
    recipe = write_recipe(tmp_path, method, tmp_path / "run", save_steps=2)
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "whole")]) == 0

    crash_saving_at(monkeypatch, 6)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["train", str(recipe)])
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        STAGING,
        "checkpoint-2",
        "checkpoint-4",
    ]  # the half-written checkpoint-6 is only in the staging folder
    assert get_last_checkpoint(str(checkpoints)) == str(checkpoints / "checkpoint-4")
    for name in (
        "adapter_model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        "trainer_state.json",
    ):
        assert (checkpoints / "checkpoint-4" / name).is_file()

    monkeypatch.undo()
    assert main(["train", str(recipe), "--resume"]) == 0
    assert not any((checkpoints / STAGING).iterdir())  # the leftover was cleaned at the next save
    # Child-Tuning D's mask comes from the checkpoint, F's masks from the restored random state.
    assert (
        max_difference(adapter_tensors(tmp_path / "run"), adapter_tensors(tmp_path / "whole"))
        <= 1e-5
    )


def test_method_state_survives_resume(tmp_path, monkeypatch):
    """A method's state()/load_state() pair is checkpointed and given back after begin_training
    (which, like ReLoRA's, starts its counter from zero)."""
    counter = {"steps": 0}
    hooks = TrainingHooks(
        begin_training=lambda model, total: counter.update(steps=0),
        after_optimizer_step=lambda model, step: counter.update(steps=counter["steps"] + 1),
        state=lambda model: {"steps": counter["steps"], "history": torch.arange(counter["steps"])},
        load_state=lambda model, saved: counter.update(steps=int(saved["history"].numel())),
    )
    real_applied = api.applied

    def applied_with_counter(model):
        found = real_applied(model)
        method = dataclasses.replace(found.method, hooks=lambda model, config: hooks)
        return api.Applied(method, found.config)

    monkeypatch.setattr(api, "applied", applied_with_counter)
    recipe = write_recipe(tmp_path, "lora", tmp_path / "run", save_steps=4)
    crash_saving_at(monkeypatch, 8)
    with pytest.raises(RuntimeError):
        main(["train", str(recipe)])
    saved = torch.load(
        tmp_path / "run" / "checkpoints" / "checkpoint-4" / METHOD_STATE_NAME, weights_only=True
    )
    assert saved["steps"] == 4 and torch.equal(saved["history"], torch.arange(4))

    monkeypatch.setattr(
        PeftkitTrainer, "_save_rng_state", PeftkitTrainer.__mro__[1]._save_rng_state
    )
    assert main(["train", str(recipe), "--resume"]) == 0
    assert counter["steps"] == 12  # 4 restored + 8 resumed; 8 if the state had been lost


@pytest.mark.parametrize("method", ["lora", "lora_peft_forward", "child_tuning_f"])
def test_resume_from_a_clean_checkpoint_is_bit_exact(method, tmp_path):
    # LoRA's fast path groups the layers that share an input on its first forward; run() makes
    # that forward before step 0, fresh or resumed, so both compute every step alike. With the
    # fast path off (PEFT's own forward, which draws dropout masks otherwise) the checkpoint says
    # so, and the resumed run keeps PEFT's forward.
    recipe = write_recipe(tmp_path, method, tmp_path / "run", max_steps=8, save_steps=4)
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "whole")]) == 0
    shutil.copytree(tmp_path / "whole" / "checkpoints", tmp_path / "run" / "checkpoints")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-8")
    assert main(["train", str(recipe), "--resume"]) == 0
    resumed, whole = adapter_tensors(tmp_path / "run"), adapter_tensors(tmp_path / "whole")
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    if method.startswith("lora"):
        saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
        assert saved.get("peftkit_fast_path", True) is (method == "lora")


def test_a_saved_fast_path_flag_that_is_not_a_boolean_is_refused_by_name(tmp_path):
    recipe = write_recipe(tmp_path, "lora_peft_forward", tmp_path / "run", max_steps=2)
    assert main(["train", str(recipe)]) == 0
    config = tmp_path / "run" / "adapter" / "adapter_config.json"
    saved = json.loads(config.read_text())
    assert saved["peftkit_fast_path"] is False
    config.write_text(json.dumps({**saved, "peftkit_fast_path": "no"}))
    base, _ = load_model("tiny-bert", "classification", num_labels=2)
    with pytest.raises(AdapterError, match="peftkit_fast_path must be true or false"):
        api.load(base, tmp_path / "run" / "adapter")
