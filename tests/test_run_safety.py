"""What a careless or hostile input must not do to a run's files (issue 30): every case feeds the
bad input through the command line or the API and checks the files it must not touch."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
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


def test_overwrite_moves_only_what_the_run_recorded_never_the_users_files(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)  # the user's own, under names a run may also use
    (run / "logs" / "mine.txt").write_text("my notes")
    (run / "eval.json").write_text('{"mine": 1}')
    (run / "app_eval_sql.json").write_text('{"mine": 2}')
    own = snapshot(run)
    recipe = write_recipe(tmp_path, "lora", run, max_steps=2)
    assert main(["train", str(recipe)]) == 0
    # checkpoints/ holds the staging folder Trainer writes to; logs/ is the user's, not claimed
    recorded = json.loads((run / "peftkit-run.json").read_text())["entries"]
    assert recorded == ["adapter", "summary.json", "recipe.yaml", "checkpoints"]
    assert {name: snapshot(run)[name] for name in own} == own
    second = write_recipe(tmp_path, "lora", run, max_steps=3)
    assert main(["train", str(second), "--overwrite"]) == 0
    assert {name: snapshot(run)[name] for name in own} == own  # kept, unchanged
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert not (tmp_path / "run.previous").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_overwrite_moves_the_reports_the_run_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, "lora", run, max_steps=2)
    assert main(["train", str(recipe)]) == 0
    assert main(["eval", str(run)]) == 0  # eval.json: the run's, recorded
    assert "eval.json" in json.loads((run / "peftkit-run.json").read_text())["entries"]
    (run / "notes.txt").write_text("mine")
    assert main(["train", str(recipe), "--overwrite", "--model", "no-such-model"]) == 2
    moved = sorted(p.name for p in (tmp_path / "run.previous").iterdir())
    assert moved == [
        "PEFTKIT_PREVIOUS_RUN.txt", "adapter", "checkpoints", "eval.json", "peftkit-run.json",
        "recipe.yaml", "summary.json",
    ]  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_a_run_folder_without_a_record_is_replaced_by_its_fixed_names(tmp_path):
    from peftkit.run_folder import record_entries, set_aside_earlier_run

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for name in ("summary.json", "recipe.yaml", "eval.json", "notes.txt"):
        (run / name).write_text(name)
    # an eval on such a run records the run's fixed names first, then its own report
    assert record_entries(run, ["app_eval_sql.json"]) == [
        "adapter", "summary.json", "recipe.yaml", "eval.json", "app_eval_sql.json"
    ]  # fmt: skip
    previous = set_aside_earlier_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in previous.iterdir()) == [
        "PEFTKIT_PREVIOUS_RUN.txt", "adapter", "eval.json", "peftkit-run.json", "recipe.yaml",
        "summary.json",
    ]  # fmt: skip


def test_a_doctored_record_moves_nothing_outside_the_folder(tmp_path):
    from peftkit.run_folder import set_aside_earlier_run

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (tmp_path / "precious.txt").write_text("keep")
    (run / "peftkit-run.json").write_text('{"entries": ["adapter", "../precious.txt", "/etc"]}')
    previous = set_aside_earlier_run(run)
    assert (tmp_path / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in previous.iterdir()) == [
        "PEFTKIT_PREVIOUS_RUN.txt", "adapter", "peftkit-run.json"
    ]  # fmt: skip


@pytest.mark.parametrize("which", ["recipe file", "training data file"])
def test_an_output_folder_that_is_an_input_file_is_refused_before_a_model_loads(
    tmp_path, capsys, which
):
    recipe = write_recipe(tmp_path, "lora", tmp_path / "run", max_steps=2)
    target = recipe if which == "recipe file" else tmp_path / "train.jsonl"
    before = snapshot(tmp_path)
    with no_model_loads():
        assert main(["train", str(recipe), "--output-dir", str(target)]) == 2
    assert capsys.readouterr().err.startswith(
        f"peftkit: error: The output folder {target} is an existing file (it is the {which})"
    )
    assert snapshot(tmp_path) == before and sorted(tmp_path.iterdir()) == sorted(
        tmp_path / name for name in before
    )


def test_an_empty_output_folder_is_refused_before_a_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, "lora", tmp_path / "run", max_steps=2)
    before = snapshot(tmp_path)
    with no_model_loads():
        assert main(["train", str(recipe), "--set", 'output_dir=""']) == 2
    assert capsys.readouterr().err.startswith("peftkit: error: output_dir is empty")
    assert snapshot(tmp_path) == before


def test_a_read_only_output_folder_is_refused_before_a_model_loads(tmp_path, capsys):
    # As root a chmod does not stop writes, so the file system's refusal is simulated at the
    # one call that probes it.
    recipe = write_recipe(tmp_path, "lora", tmp_path / "ro" / "run", max_steps=2)
    (tmp_path / "ro").mkdir()
    refusal = PermissionError(13, "Permission denied")
    with no_model_loads(), mock.patch("tempfile.mkdtemp", side_effect=refusal):
        assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err == (
        f"peftkit: error: Cannot write into the output folder {tmp_path / 'ro' / 'run'}: "
        f"{tmp_path / 'ro'} refuses new files (Permission denied). Give a folder you can write "
        "to (--output-dir).\n"
    )
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_folder_is_refused_for_real(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "lora", tmp_path / "ro" / "run", max_steps=2)
    (tmp_path / "ro").mkdir(mode=0o555)
    with no_model_loads():
        assert main(["train", str(recipe)]) == 2
    assert "refuses new files (Permission denied)" in capsys.readouterr().err


def _damaged_model(folder: Path, damage: str) -> Path:
    """A saved tiny Llama (model and tokenizer) with one part damaged."""
    model, tokenizer = tiny("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = folder / "config.json"
    if damage == "no tokenizer":
        for path in folder.glob("tokenizer*"):
            path.unlink()
    elif damage == "unknown model_type":
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "nosuch"}))
    elif damage == "empty config.json":
        config.write_text("")
    elif damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no tokenizer", "holds no usable tokenizer (Couldn't instantiate the backend tokenizer"),
        ("unknown model_type", "has a config.json transformers cannot use (The checkpoint you "
         "are trying to load has model type `nosuch`"),
        ("empty config.json", "has a config.json transformers cannot use (It looks like the "
         "config file at"),
        ("truncated weights", "has weights that cannot be loaded (missing, truncated or "
         "damaged) (Error while deserializing header"),
    ],
)  # fmt: skip
def test_a_damaged_model_folder_gets_one_error_line(tmp_path, capsys, damage, message):
    folder = _damaged_model(tmp_path / "model", damage)
    recipe = write_recipe(tmp_path, "lora", tmp_path / "run", model=str(folder), max_steps=2)
    before = snapshot(folder)
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"peftkit: error: The model folder {folder} {message}")
    assert error.count("\n") == 1  # one line, no traceback
    assert snapshot(folder) == before and not (tmp_path / "run").exists()


def test_max_length_beyond_the_position_table_is_refused_before_training(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "lora", tmp_path / "run", max_steps=2)
    with mock.patch("peftkit.training.run.PeftkitTrainer", side_effect=AssertionError("trains")):
        assert main(["train", str(recipe), "--set", "task.max_length=300"]) == 2
    assert capsys.readouterr().err == (
        "peftkit: error: task.max_length is 300, but model tiny-bert has learned positions for "
        "only 256 tokens. Set task.max_length to 256 or less.\n"
    )
    assert not (tmp_path / "run").exists()
    # at the limit it trains (BERT's table is exactly max_position_embeddings long)
    assert main(["train", str(recipe), "--set", "task.max_length=256"]) == 0


@pytest.mark.parametrize(
    "rank, message",
    [
        (0, r"adapter_config\.json does not describe a valid lora adapter: rank must be at "
         r"least 1"),
        (1_000_000_000, r"does not fit this base model \(8 problems\): '.*q_proj\.lora_A\.weight': "
         r"adapter \(4, 32\) vs model \(1000000000, 32\)"),
    ],
)  # fmt: skip
def test_a_doctored_adapter_rank_is_refused_before_anything_is_built(tmp_path, rank, message):
    model, _ = tiny("llama")
    folder = tmp_path / "adapter"
    peftkit.save(peftkit.apply(model, peftkit.LoraConfig(rank=4)), folder)
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": rank}))
    before = snapshot(folder)
    base, _ = tiny("llama")
    modules = [name for name, _ in base.named_modules()]
    # r: 1e9 built for real would ask for 128 GB for its first matrix (a RuntimeError)
    with pytest.raises(AdapterError, match=message):
        peftkit.load(base, folder)
    assert [name for name, _ in base.named_modules()] == modules  # nothing built into the base
    assert snapshot(folder) == before


def _interrupt_at_step(step: int) -> mock._patch:
    """Ctrl-C during the given optimizer step (a KeyboardInterrupt from its training_step)."""
    from peftkit.training.trainer import PeftkitTrainer

    original = PeftkitTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    return mock.patch.object(PeftkitTrainer, "training_step", training_step)


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, "lora", run, max_steps=4, save_steps=1)
    with _interrupt_at_step(3):
        assert main(["train", str(recipe), "--set", "training.seed=1"]) == 130
    error = capsys.readouterr().err
    assert "Traceback" not in error and "KeyboardInterrupt" not in error
    command = f"peftkit train {recipe} --set training.seed=1 --resume"
    assert error.endswith(
        f"peftkit: interrupted. Kept: the checkpoint of step 2 in {run / 'checkpoints'} "
        f"(checkpoints are written whole or not at all). Continue from it with: {command}\n"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        ".incomplete", "checkpoint-1", "checkpoint-2"
    ]  # fmt: skip
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert main(command.split()[1:]) == 0  # the command it gave continues the run
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_ctrl_c_without_a_checkpoint_says_nothing_was_kept_and_where_the_earlier_run_is(
    tmp_path, capsys
):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, "lora", run, max_steps=2)
    assert main(["train", str(recipe)]) == 0
    earlier = snapshot(run)
    capsys.readouterr()
    with _interrupt_at_step(1):
        assert main(["train", str(recipe), "--overwrite"]) == 130
    error = capsys.readouterr().err
    assert error.endswith(
        f"peftkit: interrupted. No checkpoint was written yet (every training.save_steps steps), "
        f"so this run kept nothing to continue from in {run}; start it again to train. The "
        f"earlier run that --overwrite replaces is kept, whole, in {tmp_path / 'run.previous'}.\n"
    )
    kept = snapshot(tmp_path / "run.previous")
    assert {name: kept[name] for name in earlier} == earlier


def _other_file_system() -> Path | None:
    """A writable folder on a file system other than the temporary folder's (/dev/shm), or None."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        return None
    if os.stat(shm).st_dev == os.stat(tempfile.gettempdir()).st_dev:
        return None
    return shm


@pytest.mark.skipif(_other_file_system() is None, reason="needs /dev/shm on another file system")
def test_overwrite_through_a_symlink_to_another_file_system(tmp_path, capsys):
    target = Path(tempfile.mkdtemp(dir=_other_file_system())) / "run"
    try:
        target.mkdir()
        run = tmp_path / "run"
        run.symlink_to(target)
        recipe = write_recipe(tmp_path, "lora", run, max_steps=2)
        assert main(["train", str(recipe)]) == 0
        (target / "notes.txt").write_text("mine")
        second = write_recipe(tmp_path, "lora", run, max_steps=3)
        assert main(["train", str(second), "--overwrite"]) == 0
        assert json.loads((target / "summary.json").read_text())["steps"] == 3
        assert (target / "notes.txt").read_text() == "mine"
        assert sorted(p.name for p in target.parent.iterdir()) == ["run"]  # no .previous left
        assert sorted(p.name for p in tmp_path.iterdir() if "previous" in p.name) == []
    finally:
        shutil.rmtree(target.parent, ignore_errors=True)


def _finished(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "summary.json").write_text("{}")
    (run / "recipe.yaml").write_text("model: x\n")
    return run


def test_overwrite_on_a_full_disk_changes_nothing_and_leaves_no_staging(tmp_path):
    from peftkit.errors import OutputError
    from peftkit.run_folder import set_aside_earlier_run

    run = _finished(tmp_path)
    before = snapshot(run)
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch.object(Path, "write_text", side_effect=full), pytest.raises(OutputError) as e:
        set_aside_earlier_run(run)
    assert str(e.value) == (
        f"--overwrite could not set the earlier run in {run} aside in {run}.previous: the disk "
        "is full (No space left on device). Nothing was changed: the earlier run is where it was."
    )
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_failing_midway_puts_the_earlier_run_back(tmp_path):
    from peftkit.errors import OutputError
    from peftkit.run_folder import set_aside_earlier_run

    run = _finished(tmp_path)
    before = snapshot(run)
    rename = os.replace
    calls = []

    def replace(source, destination):
        calls.append(source)
        if len(calls) == 2:  # the second entry: as a rename across file systems fails
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))
        return rename(source, destination)

    with mock.patch("os.replace", replace), pytest.raises(OutputError, match="different file"):
        set_aside_earlier_run(run)
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_full_disk_at_the_final_save_is_named_and_leaves_nothing_half_written(tmp_path, capsys):
    from safetensors import SafetensorError

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, "lora", run, max_steps=2)
    full = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })'
    )
    with mock.patch("safetensors.torch.save_file", side_effect=full):
        assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    error = err[err.index("peftkit: error: ") :]  # after the progress bar
    assert error.startswith(
        f"peftkit: error: Saving the adapter into {run / 'adapter'} failed: the disk is full "
        "(Error while serializing"
    ) and error.endswith("No half-written adapter was left.\n")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "peftkit-run.json"]


def test_a_full_disk_while_checkpointing_is_named_and_keeps_the_complete_checkpoints(
    tmp_path, capsys
):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, "lora", run, max_steps=4, save_steps=1)
    save = torch.save

    def full_at_step_3(obj, path, *args, **kwargs):
        if "checkpoint-3" in str(path):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                "file data/0: file write failed"
            )
        return save(obj, path, *args, **kwargs)

    with mock.patch("torch.save", full_at_step_3):
        assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    error = err[err.index("peftkit: error: ") :]  # after the progress bar
    assert error.startswith(
        f"peftkit: error: Writing a checkpoint into {run / 'checkpoints'} failed: a file could "
        "not be written (is the disk full?) ("
    )
    assert error.endswith("once the cause is fixed, --resume continues from the newest.\n")
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".incomplete", "checkpoint-1", "checkpoint-2"
    ]  # fmt: skip
    assert list((checkpoints / ".incomplete").iterdir()) == []  # the partial one is gone
