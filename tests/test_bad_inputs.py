"""A table of bad inputs across recipes, data, models, adapters and the command line: each gets
its own error class and a message that names the problem (and, where it can, what to do)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from contract import tiny
from peftkit.cli import main
from peftkit.data.files import read_rows, require_columns
from peftkit.errors import AdapterError, ConfigError, DataError, ModelNotFoundError, TargetError
from peftkit.models import load_model, tiny_config
from peftkit.recipe import TaskConfig, apply_overrides, load_recipe, recipe_from_dict
from peftkit.tasks import prepare_task
from peftkit.training.checkpoints import find_checkpoint

GOOD_RECIPE = {"model": "tiny-bert", "task": {"dataset": "amazon-reviews"}, "method": "lora"}


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def saved_lora(tmp_path: Path, family: str = "llama", **options) -> Path:
    model, _ = tiny(family)
    peftkit.save(peftkit.apply(model, peftkit.LoraConfig(**options)), tmp_path / "adapter")
    return tmp_path / "adapter"


# --- recipes and configs -------------------------------------------------------------------------
CASES = [
    ("misspelt top-level key", lambda t: recipe_from_dict({**GOOD_RECIPE, "modle": "x"}),
     ConfigError, r"Unknown key 'modle' in the recipe\. Did you mean 'model'"),
    ("misspelt method option", lambda t: recipe_from_dict({**GOOD_RECIPE, "method": {"name": "lora", "alpah": 2}}),
     ConfigError, r"'alpah' in method 'lora'\. Did you mean 'alpha'"),
    ("unknown method", lambda t: recipe_from_dict({**GOOD_RECIPE, "method": "lorra"}),
     ConfigError, r"Unknown method 'lorra'\. Did you mean 'lora'"),
    ("method section without name", lambda t: recipe_from_dict({**GOOD_RECIPE, "method": {"rank": 4}}),
     ConfigError, r"needs a 'name'"),
    ("task without data", lambda t: recipe_from_dict({"task": {"type": "classification"}}),
     ConfigError, r"needs a data source"),
    ("max_length too small", lambda t: TaskConfig(dataset="x", max_length=2),
     ConfigError, r"max_length must be at least 8"),
    ("negative learning rate", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"learning_rate": -1}}),
     ConfigError, r"learning_rate must be > 0"),
    ("zero batch size", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"batch_size": 0}}),
     ConfigError, r"batch_size and gradient_accumulation_steps must be >= 1"),
    ("fractional step count", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"max_steps": 2.5}}),
     ConfigError, r"'max_steps' in training must be a whole number"),
    ("list where a number belongs", lambda t: recipe_from_dict({**GOOD_RECIPE, "method": {"name": "lora", "rank": [4]}}),
     ConfigError, r"'rank' in method 'lora' must be a number"),
    ("unknown precision", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"precision": "fp8"}}),
     ConfigError, r"training\.precision must be fp32 or bf16, got 'fp8'"),
    ("section that is not a mapping", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": 5}),
     ConfigError, r"training must be a mapping"),
    ("recipe file missing", lambda t: load_recipe(t / "nope.yaml"),
     ConfigError, r"nope\.yaml does not exist"),
    ("recipe not YAML", lambda t: load_recipe(write(t / "bad.yaml", "model: [unclosed")),
     ConfigError, r"is not valid YAML"),
    ("override without '='", lambda t: apply_overrides({}, ["training.max_steps"]),
     ConfigError, r"must look like section\.key=value"),
    ("dropout out of range", lambda t: peftkit.config_for("lora", dropout=1.5),
     ConfigError, r"dropout must be in \[0, 1\)"),
    # --- models ----------------------------------------------------------------------------------
    ("model neither bundled nor local", lambda t: load_model("no-such-model-here", "causal-lm"),
     ModelNotFoundError, r"not a bundled name, not a local folder.*minilm, smollm2-135m"),
    ("local folder without config.json", lambda t: load_model(str(t), "causal-lm"),
     ModelNotFoundError, r"holds no config\.json"),
    ("unknown task type for a model", lambda t: load_model("tiny-llama", "regression"),
     ConfigError, r"Unknown task type 'regression'"),
    ("unknown tiny family", lambda t: load_model("tiny-mamba", "causal-lm"),
     ModelNotFoundError, r"No tiny config for 'mamba'.*bert, t5, gpt2, llama, qwen2"),
    # --- data ------------------------------------------------------------------------------------
    ("data file missing", lambda t: read_rows(t / "none.csv"),
     DataError, r"none\.csv does not exist"),
    ("data file of unknown type", lambda t: read_rows(write(t / "d.txt", "x")),
     DataError, r"use one of \.csv, \.json, \.jsonl, \.parquet"),
    ("empty data file", lambda t: read_rows(write(t / "e.jsonl", "")),
     DataError, r"e\.jsonl holds no examples"),
    ("non-UTF-8 bytes", lambda t: read_rows(write(t / "b.csv", b"text,label\n\xff\xfe,1\n")),
     DataError, r"not UTF-8 text \(bad byte at offset 11\)"),
    ("broken JSONL line", lambda t: read_rows(write(t / "j.jsonl", '{"a": 1}\n{"a": \n')),
     DataError, r"j\.jsonl line 2 is not valid JSON"),
    ("JSON that is not a list", lambda t: read_rows(write(t / "o.json", '{"a": 1}')),
     DataError, r"must hold a JSON list of objects"),
    ("missing column", lambda t: require_columns([{"review": "x", "label": 1}], ["text"], "train.csv"),
     DataError, r"train\.csv has no column 'text'\. Its columns are: label, review"),
    ("row lacking a value", lambda t: require_columns([{"text": "a"}, {"text": None}], ["text"], "d"),
     DataError, r"1 rows lack 'text' \(first: row 1\)"),
    ("unknown bundled dataset", lambda t: prepare_task(TaskConfig(dataset="amazon-review"), None),
     DataError, r"Unknown bundled dataset 'amazon-review'\. Did you mean 'amazon-reviews'"),
    ("held-out label never seen in training", lambda t: prepare_task(
        TaskConfig(train_file=str(write(t / "tr.jsonl", '{"text":"a","label":"x"}\n{"text":"b","label":"y"}\n')),
                   eval_file=str(write(t / "ev.jsonl", '{"text":"c","label":"z"}\n'))), tiny("bert")[1]),
     DataError, r"Held-out labels \['z'\] never occur in the training data"),
    ("a single label", lambda t: prepare_task(
        TaskConfig(train_file=str(write(t / "one.jsonl", '{"text":"a","label":"x"}\n' * 20))), tiny("bert")[1]),
     DataError, r"at least 2 labels"),
    # --- adapters --------------------------------------------------------------------------------
    ("adapter folder missing", lambda t: peftkit.load(tiny("llama")[0], t / "nowhere"),
     AdapterError, r"No adapter_config\.json at .*nowhere"),
    ("adapter config not JSON", lambda t: peftkit.load(
        tiny("llama")[0], write(saved_lora(t) / "adapter_config.json", "{oops").parent),
     AdapterError, r"adapter_config\.json is not valid JSON"),
    ("truncated safetensors", lambda t: peftkit.load(tiny("llama")[0], _truncate(saved_lora(t))),
     AdapterError, r"adapter_model\.safetensors is truncated or corrupted"),
    ("pickle-only adapter", lambda t: peftkit.load(tiny("llama")[0], _pickle_only(saved_lora(t))),
     AdapterError, r"holds only a pickle file.*allow_pickle=True"),
    ("adapter of an unknown kind", lambda t: peftkit.load(
        tiny("llama")[0], write(saved_lora(t) / "adapter_config.json", '{"peft_type": "VERA"}').parent),
     AdapterError, r"peft_type='VERA'"),
    ("adapter for another architecture",
     lambda t: peftkit.load(tiny("bert")[0], saved_lora(t, "llama")),
     TargetError, r"\['q_proj', 'v_proj'\] matched no linear layer of this bert model.*query"),
    ("save without a method", lambda t: peftkit.save(tiny("llama")[0], t / "a"),
     ConfigError, r"no peftkit method applied: call peftkit\.apply first"),
    # --- checkpoints and resume ------------------------------------------------------------------
    ("resume without any checkpoint", lambda t: find_checkpoint(t, "latest"),
     ConfigError, r"Nothing to resume: no complete checkpoint in .*checkpoints.*save_steps"),
    ("resume from a folder that is not a checkpoint", lambda t: find_checkpoint(t, str(t)),
     ConfigError, r"is not a complete peftkit checkpoint \(it needs trainer_state\.json"),
]  # fmt: skip


def _truncate(folder: Path) -> Path:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    return folder


def _pickle_only(folder: Path) -> Path:
    (folder / "adapter_model.safetensors").unlink()
    torch.save({}, folder / "adapter_model.bin")
    return folder


@pytest.mark.parametrize("name, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(name, call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_adapter_for_other_shapes_names_tensor_and_shapes_and_leaves_model_unchanged(tmp_path):
    folder = saved_lora(tmp_path, "llama", rank=4)
    config = tiny_config("llama")
    config.hidden_size = 48  # the same family, another width: every LoRA tensor is off
    wider = AutoModelForCausalLM.from_config(config)
    before = {n: p.clone() for n, p in wider.named_parameters()}
    names_before = [n for n, _ in wider.named_modules()]
    with pytest.raises(
        AdapterError, match=r"lora_A\.weight': adapter \(4, 32\) vs model \(4, 48\)"
    ):
        peftkit.load(wider, folder)
    assert [n for n, _ in wider.named_modules()] == names_before  # no LoRA layers left behind
    assert all(torch.equal(before[n], p) for n, p in wider.named_parameters())


def test_adapter_saved_with_another_target_set_is_refused(tmp_path):
    folder = saved_lora(tmp_path, "llama")
    saved = json.loads((folder / "adapter_config.json").read_text())
    saved["target_modules"] = ["q_proj", "v_proj", "k_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(AdapterError, match=r"k_proj\.lora_A\.weight' is missing from the adapter"):
        peftkit.load(tiny("llama")[0], folder)


def test_cli_reports_peftkit_errors_in_one_line(tmp_path, capsys):
    recipe = write(
        tmp_path / "r.yaml",
        "model: tiny-bert\ntask: {dataset: amazon-reviews}\nmethod: {name: lora, rnak: 4}\n",
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: Unknown key 'rnak'") and "Did you mean 'rank'" in err


def test_cli_missing_recipe_argument_exits_with_usage():
    result = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "train"], capture_output=True, text=True
    )
    assert (
        result.returncode == 2 and "the following arguments are required: recipe" in result.stderr
    )
