"""`peftkit compare` on a tiny model: each method in its own process, one table, JSON, CSV, PNG."""

import csv
import json
from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.compare import load_plan
from peftkit.errors import ConfigError
from peftkit.plan import resolve


def test_compare_two_methods_writes_table_json_csv_and_chart(tmp_path, capsys):
    rows = [{"text": "good" if i % 2 else "bad", "label": i % 2} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = tmp_path / "base.yaml"
    recipe.write_text(
        f"model: tiny-bert\ntask: {{train_file: {data}, max_length: 16}}\n"
        "method: lora\ntraining: {max_steps: 50, batch_size: 8}\n"
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "recipe: base.yaml\n"
        "methods:\n"
        "  - method: {name: lora, rank: 2}\n"
        "    set: {training.learning_rate: 0.01}\n"
        "  - method: {name: full}\n"
        "    label: full-ft\n"
        "quick: {training.max_steps: 3}\n"
    )
    assert main(["compare", str(plan), "--quick", "--output-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] lora" in printed and "[2/2] full-ft" in printed and "| method" in printed
    results = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [r["method"] for r in results] == ["lora", "full-ft"]
    assert all(r["steps"] == 3 for r in results)  # the quick budget applied to both
    lora, full = results
    assert lora["method_section"] == {"name": "lora", "rank": 2}  # what ran, for recommend
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    assert full["trainable_percent"] == pytest.approx(100.0)
    table = list(csv.reader((tmp_path / "out" / "compare.csv").open()))
    assert table[0][0] == "method" and len(table) == 3
    assert (tmp_path / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"

    # A rerun into the same folder is refused before anything runs, and touches nothing.
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["compare", str(plan), "--quick", "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert "already holds runs of lora, full-ft" in error and "--overwrite" in error
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    # With --overwrite it reruns (here one entry) and replaces that entry's run.
    (out / "lora" / "summary.json").write_text('{"earlier": true}')
    again = [str(plan), "--quick", "--output-dir", str(out), "--overwrite", "--methods", "lora"]
    assert main(["compare", *again]) == 0
    assert json.loads((out / "lora" / "summary.json").read_text())["steps"] == 3
    assert [r["method"] for r in json.loads((out / "compare.json").read_text())] == ["lora"]
    assert not (out / "lora.previous").exists()


def test_plan_errors_name_the_problem(tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("recipe: r.yaml\nmethod: [lora]\n")
    with pytest.raises(ConfigError, match=r"Unknown key 'method'.*Did you mean 'methods'"):
        load_plan(plan)
    plan.write_text("recipe: r.yaml\nmethods: [lora, lora]\n")
    with pytest.raises(ConfigError, match=r"labels must be unique; repeated: \['lora'\]"):
        load_plan(plan)


def test_a_bad_entry_is_refused_before_any_entry_trains(tmp_path, capsys):
    """Every entry is resolved into its plan first: the misspelt option of the second entry
    stops the comparison before the first one trains (no run folder, no log)."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "a b", "label": i % 2}) for i in range(20)))
    (tmp_path / "base.yaml").write_text(
        f"model: tiny-bert\ntask: {{train_file: {data}, max_length: 16}}\nmethod: lora\n"
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text("recipe: base.yaml\nmethods:\n  - lora\n  - method: {name: lora, rnak: 2}\n"
                    "    label: typo\n")  # fmt: skip
    out = tmp_path / "out"
    assert main(["compare", str(plan), "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert "entry 'typo'" in error and "Did you mean 'rank'" in error
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name", ["compare-minilm.yaml", "compare-all.yaml"])
def test_shipped_plan_entries_build_recipes(request, name):
    from peftkit.recipe import load_recipe
    from peftkit.registry import method_for_config

    plan = load_plan(request.config.rootpath / "recipes" / name)
    assert plan.recipe.is_file()
    for entry in plan.entries:  # what run_entry hands `peftkit train`, options checked
        overrides = [f"method={json.dumps(entry.method)}", *plan.quick, *entry.overrides]
        recipe = load_recipe(plan.recipe, overrides)
        assert method_for_config(resolve(recipe).method_config).name == entry.method["name"]


def test_compare_all_extends_the_default_plan(request):
    default = load_plan(request.config.rootpath / "recipes" / "compare-minilm.yaml")
    every = load_plan(request.config.rootpath / "recipes" / "compare-all.yaml")
    assert every.recipe == default.recipe and every.quick == default.quick
    assert [(e.label, e.method) for e in default.entries] == [
        (e.label, e.method) for e in every.entries[: len(default.entries)]
    ]


def test_compare_runs_methods_on_a_preference_task(tmp_path):
    """compare on DPO pairs: each entry scored by preference accuracy, LoRA's reference the
    policy switched off, full fine-tuning's a frozen copy of the weights (named, with its size)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"recipe: {Path('recipes/tiny-dpo-lora.yaml').resolve()}\n"
        "methods:\n"
        "  - method: {name: lora, rank: 4}\n"
        "  - method: {name: full}\n"
        "quick: {training.max_steps: 2, task.max_eval_examples: 8}\n"
    )
    assert main(["compare", str(plan), "--quick", "--output-dir", str(tmp_path / "out")]) == 0
    lora, full = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert lora["metric"] == full["metric"] == "preference_accuracy"
    summaries = [json.loads((tmp_path / "out" / name / "summary.json").read_text())
                 for name in ("lora", "full")]  # fmt: skip
    assert "switched off" in summaries[0]["reference"]
    assert "reference_copy_mib" not in summaries[0]
    assert summaries[1]["reference"].startswith("a frozen copy")
    # The copy holds every weight of the policy in fp32: its size in closed form.
    parameters = summaries[1]["total_parameters"]
    assert summaries[1]["reference_copy_mib"] == pytest.approx(
        parameters * 4 / 2**20, abs=0.005
    )  # kept to 2 decimals
