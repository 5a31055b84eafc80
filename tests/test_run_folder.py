"""A run folder that holds an earlier run: `peftkit train` refuses it without touching it, and
`--overwrite` replaces it only once the new run has finished (tiny BERT, a few steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

from tiny_runs import write_recipe

from peftkit.cli import main


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder: its bytes and modification time (ns)."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_refused_run_touches_nothing_and_loads_no_model(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, "lora", run, max_steps=2, save_steps=1)
    assert main(["train", str(recipe)]) == 0
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    capsys.readouterr()
    with mock.patch("peftkit.models.load_model", side_effect=AssertionError("a model loaded")):
        assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert f"{run} already holds a finished run" in error
    assert "--output-dir" in error and "--overwrite" in error
    assert snapshot(run) == before
    assert not run.with_name("run.previous").exists()


def test_overwrite_keeps_the_earlier_run_until_the_new_one_finishes(tmp_path, capsys):
    run = tmp_path / "run"
    first = write_recipe(tmp_path, "lora", run, max_steps=2)
    assert main(["train", str(first)]) == 0
    (run / "notes.txt").write_text("mine")  # not the run's: stays where it is throughout
    earlier = {name: data for name, data in snapshot(run).items() if name != "notes.txt"}

    # A new run that fails (its model does not exist) after the earlier one was set aside.
    capsys.readouterr()
    assert main(["train", str(first), "--overwrite", "--model", "no-such-model"]) == 2
    previous = tmp_path / "run.previous"
    assert f"the earlier run in {run} is kept in {previous}" in capsys.readouterr().out
    kept = snapshot(previous)
    assert {name: kept[name] for name in earlier} == earlier  # whole and unchanged
    assert set(kept) - set(earlier) == {"PEFTKIT_PREVIOUS_RUN.txt"}
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]

    # The next --overwrite finishes: the new run is in place and the earlier one is gone.
    second = write_recipe(tmp_path, "lora", run, max_steps=3)
    assert main(["train", str(second), "--overwrite"]) == 0
    assert not previous.exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert (run / "notes.txt").read_text() == "mine"


def test_unfinished_run_is_refused_and_resume_continues_it(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, "lora", run, max_steps=4, save_steps=2)
    assert main(["train", str(recipe)]) == 0
    for name in ("summary.json", "adapter", "recipe.yaml"):  # as if killed after checkpoint 4
        path = run / name
        path.unlink() if path.is_file() else shutil.rmtree(path)
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    assert "already holds an unfinished run" in capsys.readouterr().err
    assert main(["train", str(recipe), "--resume"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == str(run / "checkpoints" / "checkpoint-4")
