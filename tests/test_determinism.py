"""The same recipe and seed give bit-identical adapters on one machine and thread count (dropout,
data order, LoRA's initialisation, Child-Tuning's Fisher pass and random masks all follow the
seed); another seed gives another adapter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_runs import adapter_tensors, write_recipe

from peftkit.cli import main


def train_twice(tmp_path, method: str, *overrides: str) -> tuple[dict, dict]:
    """Two runs of one recipe in separate folders; their adapters."""
    recipe = write_recipe(tmp_path, method, tmp_path / "first")
    assert main(["train", str(recipe), *overrides]) == 0
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "second"), *overrides]) == 0
    return adapter_tensors(tmp_path / "first"), adapter_tensors(tmp_path / "second")


@pytest.mark.parametrize(
    ("method", "threads"),
    [("lora", 1), ("lora", 2), ("child_tuning_f", 1), ("child_tuning_d", 1)],
)
def test_same_recipe_and_seed_give_identical_adapters(method, threads, tmp_path):
    first, second = train_twice(tmp_path, method, "--set", f"training.threads={threads}")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_another_seed_gives_another_adapter(tmp_path):
    recipe = write_recipe(tmp_path, "lora", tmp_path / "first")
    assert main(["train", str(recipe)]) == 0
    other = ["--output-dir", str(tmp_path / "other"), "--set", "training.seed=1"]
    assert main(["train", str(recipe), *other]) == 0
    first, second = adapter_tensors(tmp_path / "first"), adapter_tensors(tmp_path / "other")
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_a_first_child_tuning_f_step_keeps_torchs_thread_count():
    """numba's thread pool starts at the first compiled step and (OpenMP layer) used to reset the
    OpenMP thread count torch shares to every core, undoing `training.threads` for the rest of the
    process: the first F run in a process then differed from later ones. A fresh process, since
    the pool starts once per process."""
    script = textwrap.dedent(
        """
        import torch
        torch.set_num_threads(1)
        import peftkit
        from contract import batch_for, tiny
        from peftkit.methods.child_tuning import ChildTuningConfig
        model, tokenizer = tiny("bert")
        config = ChildTuningConfig(mode="F")
        model = peftkit.apply(model, config)
        hooks = peftkit.api.applied(model).method.training_hooks(model, config)
        optimizer = hooks.replace_optimizer(model, torch.optim.AdamW(model.parameters()))
        model(**batch_for("bert", tokenizer)).loss.backward()
        optimizer.step()
        print(torch.get_num_threads())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_a_run_leaves_the_process_thread_count_and_random_state_as_it_found_them(
    tmp_path, monkeypatch, fails
):
    # A run sets torch's threads (training.threads) and seeds every generator for itself; the
    # test suite, a notebook or any caller then carried on with one thread and a fixed seed.
    import random

    import numpy

    from peftkit.training.trainer import PeftkitTrainer

    if fails:

        def failing(self, *args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        monkeypatch.setattr(PeftkitTrainer, "train", failing)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2  # a count unlike the caller's, so a leak shows
    recipe = write_recipe(tmp_path, "lora", tmp_path / "run", threads=want, max_steps=2)
    torch.manual_seed(123)
    random.seed(123)
    numpy.random.seed(123)
    expected = torch.rand(3), random.random(), numpy.random.random()
    torch.manual_seed(123)
    random.seed(123)
    numpy.random.seed(123)
    if fails:
        with pytest.raises(RuntimeError, match="simulated"):
            main(["train", str(recipe)])
    else:
        assert main(["train", str(recipe)]) == 0
        summary = (tmp_path / "run" / "summary.json").read_text()
        assert '"steps": 2' in summary  # it really trained
    assert torch.get_num_threads() == before
    after = torch.rand(3), random.random(), numpy.random.random()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
