"""A table of bad inputs across recipes, data, models, adapters and the command line: each gets
its own error class and a message that names the problem (and, where it can, what to do)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from contract import tiny
from peftkit.cli import build_parser, main
from peftkit.compare import Entry, load_plan, refuse_earlier_results
from peftkit.data.files import read_rows, require_columns
from peftkit.errors import AdapterError, ConfigError, DataError, ModelNotFoundError, TargetError
from peftkit.models import load_model, tiny_config
from peftkit.plan import resolve
from peftkit.recipe import TaskConfig, apply_overrides, load_recipe, recipe_from_dict, reporters
from peftkit.run_folder import check_output_dir
from peftkit.tasks.types import prepare_task
from peftkit.training.checkpoints import find_checkpoint
from peftkit.training.run import check_reporter_installed

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
    ("misspelt method option", lambda t: resolve(recipe_from_dict({**GOOD_RECIPE, "method": {"name": "lora", "alpah": 2}})),
     ConfigError, r"'alpah' in method 'lora'\. Did you mean 'alpha'"),
    ("unknown method", lambda t: resolve(recipe_from_dict({**GOOD_RECIPE, "method": "lorra"})),
     ConfigError, r"Unknown method 'lorra'\. Did you mean 'lora'"),
    ("method section without name", lambda t: recipe_from_dict({**GOOD_RECIPE, "method": {"rank": 4}}),
     ConfigError, r"needs a 'name'"),
    ("task without data", lambda t: recipe_from_dict({"task": {"type": "classification"}}),
     ConfigError, r"needs a data source"),
    ("max_length too small", lambda t: TaskConfig(dataset="x", max_length=2),
     ConfigError, r"max_length must be at least 8"),
    ("negative learning rate", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"learning_rate": -1}}),
     ConfigError, r"learning_rate must be > 0"),
    # non-finite numbers and out-of-range training numbers: refused when the recipe is read
    *[(f"training.{key}: {value}", lambda t, key=key, value=value: load_recipe(write(t / "r.yaml", _recipe_text(f"training: {{{key}: {value}}}"))),
       ConfigError, rf"'{key}' in training must be a finite number, got {pattern}")
      for key, value, pattern in [("learning_rate", ".inf", "inf"), ("learning_rate", ".nan", "nan"),
                                  ("max_steps", ".inf", "inf"), ("epochs", ".nan", "nan"),
                                  ("weight_decay", "-.inf", "-inf"), ("max_grad_norm", ".nan", "nan"),
                                  ("warmup_ratio", ".nan", "nan")]],
    ("a non-finite method option", lambda t: resolve(recipe_from_dict({**GOOD_RECIPE, "method": {"name": "lora", "alpha": float("inf")}})),
     ConfigError, r"'alpha' in method 'lora' must be a finite number, got inf"),
    ("a non-finite task number", lambda t: recipe_from_dict({**GOOD_RECIPE, "task": {"dataset": "amazon-reviews", "max_length": float("nan")}}),
     ConfigError, r"'max_length' in task must be a finite number"),
    ("a number too large for a float", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"max_steps": 10**400}}),
     ConfigError, r"'max_steps' in training must be a number"),
    *[(f"training.{key}: {value}", lambda t, key=key, value=value: recipe_from_dict({**GOOD_RECIPE, "training": {key: value}}),
       ConfigError, rf"training\.{key} must be {allowed}, got {value}")
      for key, value, allowed in [("eval_batch_size", 0, "at least 1"), ("seed", -1, r"in \[0, 4294967295\]"),
                                  ("seed", 2**32, r"in \[0, 4294967295\]"),
                                  ("threads", -1, "at least 1"), ("threads", 0, "at least 1"),
                                  ("warmup_ratio", -0.5, r"in \[0, 1\)"), ("warmup_ratio", 1.5, r"in \[0, 1\)"),
                                  ("logging_steps", 0, "at least 1"), ("weight_decay", -0.1, "at least 0"),
                                  ("max_grad_norm", -1.0, "at least 0"), ("save_steps", -5, "at least 0"),
                                  ("epochs", -1.0, "at least 0")]],
    *[(f"task.{key}: {value}", lambda t, key=key, value=value: recipe_from_dict({**GOOD_RECIPE, "task": {"dataset": "amazon-reviews", key: value}}),
       ConfigError, rf"task\.{key} must be at least 1, got {value}")
      for key, value in [("max_new_tokens", 0), ("max_train_examples", 0), ("max_eval_examples", -3)]],
    ("zero batch size", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"batch_size": 0}}),
     ConfigError, r"batch_size and gradient_accumulation_steps must be >= 1"),
    ("fractional step count", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"max_steps": 2.5}}),
     ConfigError, r"'max_steps' in training must be a whole number"),
    ("list where a number belongs", lambda t: resolve(recipe_from_dict({**GOOD_RECIPE, "method": {"name": "lora", "rank": [4]}})),
     ConfigError, r"'rank' in method 'lora' must be a number"),
    ("unknown precision", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"precision": "fp8"}}),
     ConfigError, r"training\.precision must be fp32 or bf16, got 'fp8'"),
    ("section that is not a mapping", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": 5}),
     ConfigError, r"training must be a mapping"),
    ("recipe file missing", lambda t: load_recipe(t / "nope.yaml"),
     ConfigError, r"nope\.yaml does not exist"),
    ("recipe path that is a folder", lambda t: load_recipe(t),
     ConfigError, r"Recipe .* is a folder, not a YAML file \(see recipes/ for examples\)"),
    ("recipe path that is a run folder", lambda t: load_recipe(write(t / "recipe.yaml", "model: x\n").parent),
     ConfigError, r"is a folder, not a YAML file; the recipe that run used is .*recipe\.yaml"),
    ("a repeated recipe key", lambda t: load_recipe(write(t / "twice.yaml", "model: tiny-bert\ntask: {dataset: amazon-reviews}\nmodel: tiny-gpt2\n")),
     ConfigError, r"twice\.yaml: key 'model' appears twice, on lines 1 and 3; a YAML mapping holds each key once"),
    ("a repeated key inside a section", lambda t: load_recipe(write(t / "nested.yaml", "model: tiny-bert\ntask: {dataset: amazon-reviews}\nmethod:\n  name: lora\n  rank: 4\n  rank: 8\n")),
     ConfigError, r"nested\.yaml: key 'rank' appears twice, on lines 5 and 6"),
    ("a repeated key in a compare plan", lambda t: load_plan(write(t / "plan.yaml", "recipe: r.yaml\nmethods: [lora]\nrecipe: s.yaml\n")),
     ConfigError, r"plan\.yaml: key 'recipe' appears twice, on lines 1 and 3"),
    ("a repeated key in a --set value", lambda t: apply_overrides({}, ["method={name: lora, name: dora}"]),
     ConfigError, r"override 'method=\{name: lora, name: dora\}': key 'name' appears twice"),
    ("unknown experiment tracker", lambda t: recipe_from_dict({**GOOD_RECIPE, "training": {"report_to": "tensorbord"}}),
     ConfigError, r"report_to 'tensorbord' is not an experiment tracker transformers knows\. Did you mean 'tensorboard'"),
    ("experiment tracker not installed", lambda t: check_reporter_installed(_uninstalled_reporter()),
     ConfigError, r"training\.report_to is '.*', but its package is not installed"),
    # --- the output folder -----------------------------------------------------------------------
    ("training into a finished run", lambda t: main_raising(["train", _recipe(t), "--output-dir", str(_finished_run(t))]),
     ConfigError, r"/done already holds a finished run, which this run would replace\. Train into a new folder \(--output-dir\), or pass --overwrite"),
    ("training into an unfinished run", lambda t: check_output_dir(_unfinished_run(t)),
     ConfigError, r"already holds an unfinished run.*--overwrite.* To continue it from its newest checkpoint instead, pass --resume"),
    ("--resume and --overwrite together", lambda t: main_raising(["train", _recipe(t), "--resume", "--overwrite"]),
     ConfigError, r"--resume continues the run in the output folder and --overwrite replaces it: choose one"),
    ("comparing into earlier results", lambda t: refuse_earlier_results([Entry("lora", {"name": "lora"})], _finished_run(t, "lora").parent, overwrite=False),
     ConfigError, r"already holds runs of lora, which this comparison would replace\. Compare into a new folder \(--output-dir\), or pass --overwrite"),
    # --- the command line: numbers, prompts and flags, refused before any model loads ------------
    ("generate --max-new-tokens 0", lambda t: main_raising([*GENERATE, "--max-new-tokens", "0"]),
     ConfigError, r"max_new_tokens must be at least 1, got 0"),
    ("generate --temperature 0", lambda t: main_raising([*GENERATE, "--do-sample", "--temperature", "0"]),
     ConfigError, r"temperature must be above 0, got 0\.0"),
    ("generate --top-k 0", lambda t: main_raising([*GENERATE, "--do-sample", "--top-k", "0"]),
     ConfigError, r"top_k must be at least 1, got 0"),
    ("generate --top-p 1.5", lambda t: main_raising([*GENERATE, "--do-sample", "--top-p", "1.5"]),
     ConfigError, r"top_p must be in \(0, 1\], got 1\.5"),
    ("generate with an empty prompt", lambda t: main_raising(["generate", "--model", "tiny-llama", "--prompt", "Hi", "--prompt", ""]),
     ConfigError, r"--prompt number 2 is empty: give every prompt some text"),
    ("Proxy-Tuning alpha not finite", lambda t: main_raising([*GENERATE, "--proxy-adapter", "x", "--alpha", "nan"]),
     ConfigError, r"Proxy-Tuning alpha must be a finite number"),
    ("Proxy-Tuning alpha without Proxy-Tuning", lambda t: main_raising([*GENERATE, "--alpha", "2"]),
     ConfigError, r"--alpha sets Proxy-Tuning's strength: give --proxy-adapter, or --proxy-expert"),
    ("Proxy-Tuning expert without anti-expert", lambda t: main_raising([*GENERATE, "--proxy-expert", "tiny-llama"]),
     ConfigError, r"Proxy-Tuning needs both --proxy-expert .* and --proxy-anti-expert"),
    ("Proxy-Tuning with both kinds of expert", lambda t: main_raising([*GENERATE, "--proxy-adapter", "x", "--proxy-expert", "a", "--proxy-anti-expert", "b"]),
     ConfigError, r"either --proxy-adapter .* or --proxy-expert with --proxy-anti-expert, not both"),
    ("an expert adapter without an expert", lambda t: main_raising([*GENERATE, "--expert-adapter", "x"]),
     ConfigError, r"--expert-adapter goes on the expert: give --proxy-expert too"),
    ("app-eval --max-new-tokens 0", lambda t: main_raising(["app-eval", str(t), "--app", "sql", "--max-new-tokens", "0"]),
     ConfigError, r"--max-new-tokens must be at least 1, got 0"),
    ("app-eval --batch-size 0", lambda t: main_raising(["app-eval", str(t), "--app", "sql", "--batch-size", "0"]),
     ConfigError, r"--batch-size must be at least 1, got 0"),
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
     DataError, r"not utf-8 text \(byte 0xff at offset 11\)"),
    ("a Latin-1 CSV read as UTF-8", lambda t: prepare_task(TaskConfig(train_file=str(write(t / "l.csv", LATIN_1_CSV))), None),
     DataError, r"l\.csv is not utf-8 text \(byte 0xe9 at offset 14\)\. Set task\.encoding to the file's encoding \(for example latin-1"),
    ("an encoding Python does not know", lambda t: TaskConfig(train_file="x.csv", encoding="latin-9000"),
     ConfigError, r"task\.encoding 'latin-9000' is not a text encoding Python knows"),
    ("data path that is a folder", lambda t: read_rows(t),
     DataError, r"Data file .* is a folder; give the path of a file inside it"),
    ("a CSV header naming a column twice", lambda t: read_rows(write(t / "twice.csv", "text,label,label\na,pos,neg\n")),
     DataError, r"twice\.csv: the header names column 'label' twice \(columns 2 and 3\)"),
    ("a CSV row with an unquoted comma", lambda t: read_rows(write(t / "comma.csv", "text,label\ngood,pos\nfine, really,pos\n")),
     DataError, r"comma\.csv is not well-formed CSV \(Error tokenizing data\. C error: Expected 2 fields in line 3, saw 3\)\. A text cell holding a comma"),
    ("a .parquet file that is really CSV", lambda t: read_rows(write(t / "d.parquet", "text,label\na,pos\n")),
     DataError, r"d\.parquet is not a readable Parquet file \(it does not start with Parquet's PAR1 mark\).*give it the matching suffix"),
    ("broken JSONL line", lambda t: read_rows(write(t / "j.jsonl", '{"a": 1}\n{"a": \n')),
     DataError, r"j\.jsonl line 2 is not valid JSON"),
    ("JSON that is not a list", lambda t: read_rows(write(t / "o.json", '{"a": 1}')),
     DataError, r"must hold a JSON list of objects"),
    ("missing column", lambda t: require_columns([{"review": "x", "label": 1}], ["text"], "train.csv"),
     DataError, r"train\.csv has no column 'text'\. Its columns are: label, review"),
    ("row lacking a value", lambda t: require_columns([{"text": "a"}, {"text": None}], ["text"], "d"),
     DataError, r"1 rows lack 'text' \(first: row 1\)"),
    ("empty label cells", lambda t: prepare_task(TaskConfig(train_file=str(write(t / "e.csv", EMPTY_LABELS_CSV))), None),
     DataError, r"e\.csv: 7 of 12 rows have an empty 'label' cell \(rows 1, 3, 5, 7, 8 and 2 more, counting from 0\)"),
    ("empty label cells in a held-out file", lambda t: prepare_task(TaskConfig(
        train_file=str(write(t / "tr.jsonl", '{"text":"a","label":"x"}\n{"text":"b","label":"y"}\n')),
        eval_file=str(write(t / "ev.jsonl", '{"text":"c","label":"x"}\n{"text":"d","label":null}\n'))), None),
     DataError, r"ev\.jsonl: 1 of 2 rows have an empty 'label' cell \(row 1, counting from 0\)"),
    ("every text cell empty", lambda t: prepare_task(TaskConfig(train_file=str(write(t / "n.csv", "text,label\n" + ",a\n,b\n" * 10))), tiny("bert")[1]),
     DataError, r"Every training row has an empty 'text' cell: there is no text to classify"),
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
        tiny("llama")[0], write(saved_lora(t) / "adapter_config.json", '{"peft_type": "POLY"}').parent),
     AdapterError, r"peft_type='POLY'"),
    ("adapter config missing a key", lambda t: peftkit.load(
        tiny("llama")[0], write(saved_lora(t) / "adapter_config.json", '{"peft_type": "VERA"}').parent),
     AdapterError, r"vera adapter lacks the key 'r'"),
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


LATIN_1_CSV = "text,label\ncaf\xe9 au lait,good\nna\xefve,bad\n".encode("latin-1")
EMPTY_LABELS_CSV = "text,label\n" + "".join(
    f"row {i},{'' if i in (1, 3, 5, 7, 8, 10, 11) else 'pos' if i % 2 else 'neg'}\n"
    for i in range(12)
)
GENERATE = ["generate", "--model", "tiny-llama", "--prompt", "Hello"]


def main_raising(argv: list[str]) -> int:
    """Run a command as `peftkit` does, but let its error out (main turns it into exit status 2),
    with model loading replaced by a failure: each case must be refused before a model loads."""
    args = build_parser().parse_args(argv)
    with mock.patch("peftkit.models.load_model", side_effect=AssertionError("a model loaded")):
        return args.handler(args)


def _recipe(folder: Path) -> str:
    return str(write(folder / "r.yaml", "model: tiny-bert\ntask: {dataset: amazon-reviews}\n"))


def _recipe_text(extra: str) -> str:
    return f"model: tiny-bert\ntask: {{dataset: amazon-reviews}}\nmethod: lora\n{extra}\n"


def _finished_run(folder: Path, name: str = "done") -> Path:
    run = folder / "runs" / name
    (run / "adapter").mkdir(parents=True)
    write(run / "summary.json", "{}")
    return run


def _unfinished_run(folder: Path) -> Path:
    (folder / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    return folder


def _uninstalled_reporter() -> str:
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    return next(name for name in reporters() if name not in get_available_reporting_integrations())


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


def test_the_no_model_load_harness_catches_a_load(tmp_path):
    # The command-line rows above are refused before a model loads: with good numbers the same
    # call reaches load_model, which main_raising turns into a failure.
    with pytest.raises(AssertionError, match="a model loaded"):
        main_raising(GENERATE)


def test_latin_1_file_reads_with_task_encoding(tmp_path):
    path = write(tmp_path / "l.csv", LATIN_1_CSV)
    rows = read_rows(path, encoding="latin-1")
    assert [row["text"] for row in rows] == ["café au lait", "naïve"]
    task = TaskConfig(train_file=str(path), eval_file=str(path), encoding="latin-1")
    data = prepare_task(task, tiny("bert")[1])
    assert data.labels == ["bad", "good"] and len(data.train) == 2
    # UTF-8 with a byte-order mark (Excel's "CSV UTF-8") reads under the default encoding.
    bom = write(tmp_path / "bom.csv", "\ufefftext,label\ncafé,good\n".encode())
    assert read_rows(bom) == [{"text": "café", "label": "good"}]


def test_labels_differing_only_by_spaces_or_number_type_are_one_class(tmp_path, capsys):
    train = write(tmp_path / "t.csv", "text,label\na,pos\nb, pos\nc,pos \nd,neg\ne, neg\n")
    data = prepare_task(TaskConfig(train_file=str(train), eval_file=str(train)), tiny("bert")[1])
    assert data.labels == ["neg", "pos"]
    assert [f["labels"] for f in data.train] == [1, 1, 1, 0, 0]
    note = capsys.readouterr().err
    assert "peftkit: note: labels are read with surrounding spaces stripped" in note
    assert "' neg' as 'neg'; ' pos', 'pos ' as 'pos'" in note
    rows = ['{"text": "a", "label": 1}', '{"text": "b", "label": "1"}', '{"text": "c", "label": " 1"}',
            '{"text": "d", "label": 1.0}', '{"text": "e", "label": 0}', '{"text": "f", "label": "0"}']  # fmt: skip
    jsonl = write(tmp_path / "t.jsonl", "\n".join(rows) + "\n")
    data = prepare_task(TaskConfig(train_file=str(jsonl), eval_file=str(jsonl)), tiny("bert")[1])
    assert data.labels == ["0", "1"] and [f["labels"] for f in data.train] == [1, 1, 1, 1, 0, 0]


def test_rows_with_empty_text_are_dropped_and_counted(tmp_path):
    lines = [f"{'' if i % 5 == 0 else f'text {i}'},{'pos' if i % 2 else 'neg'}" for i in range(30)]
    train = write(tmp_path / "train.csv", "text,label\n" + "\n".join(lines) + "\n")
    held_out = write(
        tmp_path / "eval.jsonl", '{"text": "a", "label": "pos"}\n{"text": null, "label": "neg"}\n'
    )
    data = prepare_task(TaskConfig(train_file=str(train), eval_file=str(held_out)), tiny("bert")[1])
    empty = sum(1 for i in range(30) if i % 5 == 0)
    assert (data.dropped, len(data.train)) == (empty, 30 - empty)
    assert (data.dropped_eval, len(data.eval)) == (1, 1)
