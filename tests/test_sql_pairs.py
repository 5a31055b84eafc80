"""On-policy Text-to-SQL preference pairs (apps/text_to_sql/pairs.py): each sample is judged by
the sandbox and the test suite, chosen is a right sample (else the gold query), rejected a wrong
or invalid one, and the written file is preference data the DPO task reads."""

from __future__ import annotations

import json

import pytest

from peftkit.apps.text_to_sql.examples import bank_sql
from peftkit.apps.text_to_sql.pairs import build_pairs, label_samples, make_pair, write_pairs
from peftkit.apps.text_to_sql.sandbox import run_query
from peftkit.apps.text_to_sql.suite import default_suite
from peftkit.data.files import read_rows
from peftkit.errors import ConfigError
from peftkit.models import load_model
from peftkit.tasks.config import TaskConfig
from peftkit.tasks.preference import row_check


@pytest.fixture(scope="module")
def record() -> dict:
    train, _ = bank_sql()
    gold = "SELECT COUNT(*) FROM customers WHERE city = 'Dublin'"
    return next(r for r in train if r["sql"] == gold)


def test_samples_are_judged_on_every_suite_instance(record: dict) -> None:
    suite = default_suite()
    # Right everywhere (the filter written another way); right on seed 0 only where every
    # customer has an id above 0 is not a test the suite could fail, so use a count that differs.
    samples = [
        "SELECT COUNT(customer_id) FROM customers WHERE 'Dublin' = city",
        "SELECT COUNT(*) FROM customers",
        "DELETE FROM customers",
        "SELECT COUNT(*) FROM no_such_table",
    ]
    [labelled] = label_samples([record], [samples], suite)
    # The independent judge: run each query and the gold one on every instance ourselves.
    for sample, label in zip(samples, labelled, strict=True):
        results = [(run_query(db, sample), run_query(db, record["sql"])) for db in suite.values()]
        same = all(p.failure is None and p.rows == g.rows for p, g in results)
        assert label["right"] == same, (sample, label)
    assert [s["right"] for s in labelled] == [True, False, False, False]
    assert labelled[1]["failure"] is None  # wrong, but it ran
    assert labelled[2]["failure"] == "refused" and labelled[3]["failure"] == "error"

    pair = make_pair(record, labelled)
    assert pair["chosen"] == samples[0] and pair["chosen_source"] == "sample"
    assert pair["rejected"] == samples[1] and pair["rejected_failure"] == "wrong result"
    assert (pair["samples_right"], pair["samples"]) == (1, 4)


def test_all_right_gives_no_pair_and_none_right_takes_the_gold_query(record: dict) -> None:
    right = {"sql": record["sql"], "right": True, "failure": None}
    wrong = {"sql": "SELECT 1", "right": False, "failure": None}
    assert make_pair(record, [right, right]) is None
    pair = make_pair(record, [wrong, dict(wrong, sql="SELECT 2")])
    assert pair["chosen"] == record["sql"] and pair["chosen_source"] == "gold"
    assert pair["rejected"] == "SELECT 1"


def test_build_refuses_held_out_questions_and_bad_numbers(record: dict) -> None:
    model, tokenizer = load_model("tiny-llama", "causal-lm", seed=0)
    _, held_out = bank_sql()
    with pytest.raises(ConfigError, match="training questions only"):
        build_pairs(model, tokenizer, [record, held_out[0]], samples=2, max_new_tokens=2)
    with pytest.raises(ConfigError, match="samples must be at least 2"):
        build_pairs(model, tokenizer, [record], samples=1)
    with pytest.raises(ConfigError, match="temperature must be above 0"):
        build_pairs(model, tokenizer, [record], temperature=0.0)


def test_built_pairs_are_preference_data(tmp_path, record: dict) -> None:
    model, tokenizer = load_model("tiny-llama", "causal-lm", seed=0)
    # A short prompt keeps the tiny model inside its 256 positions; the gold query is the real one.
    records = [dict(record, prompt="SQL:"), dict(record, prompt="Query:", id="second")]
    pairs, report = build_pairs(model, tokenizer, records, samples=2, max_new_tokens=6, seed=3)
    # A random byte-level model writes no right SQL: every question gives a pair from the gold.
    assert len(pairs) == 2 and report["pairs"] == 2
    assert all(p["chosen"] == record["sql"] and p["chosen_source"] == "gold" for p in pairs)
    assert report["chosen_from_gold"] == 2 and report["sample_right_rate"] == 0.0
    assert sum(report["sample_failures"].values()) <= 4
    output = tmp_path / "pairs.jsonl"
    report_path = write_pairs(pairs, report, output)
    rows = read_rows(output)
    assert rows == pairs and json.loads(report_path.read_text())["pairs"] == 2
    row_check(TaskConfig(type="preference", train_file=str(output)), rows, str(output))


def test_a_run_trained_on_pairs_is_scored_on_the_apps_questions(
    tmp_path, record: dict, capsys: pytest.CaptureFixture
) -> None:
    """app-eval --dataset scores a preference run (trained on pairs, whose held-out rows are
    pairs) on the bundled set's held-out questions, which the pairs never contain."""
    from peftkit.cli import main

    wrong = {"sql": "SELECT 1", "right": False, "failure": None}
    pairs = [dict(make_pair(record, [wrong, wrong]), prompt=f"Q{i} SQL:") for i in range(8)]
    write_pairs(pairs, {"pairs": 8}, tmp_path / "pairs.jsonl")
    run = tmp_path / "run"
    settings = [
        "--model", "tiny-llama", "--max-steps", "1", "--output-dir", str(run),
        "--set", "task.dataset=null", "--set", f"task.train_file={tmp_path / 'pairs.jsonl'}",
        "--set", "task.max_length=96", "--set", "training.batch_size=4",
    ]  # fmt: skip
    assert main(["train", "recipes/tiny-dpo-lora.yaml", *settings]) == 0
    options = ["--app", "sql", "--dataset", "bank-sql", "--max-new-tokens", "2",
               "--max-examples", "3", "--skip-base"]  # fmt: skip
    assert main(["app-eval", str(run), *options]) == 0
    report = json.loads((run / "app_eval_sql.json").read_text())
    _, held_out = bank_sql()
    assert report["dataset"] == "bank-sql" and "base" not in report
    assert [r["id"] for r in report["tuned"]["records"]] == [r["id"] for r in held_out[:3]]
    capsys.readouterr()
    assert main(["app-eval", str(run), "--app", "sql", "--dataset", "bank-sq"]) == 2
    assert "Unknown bundled dataset 'bank-sq'. Did you mean 'bank-sql'?" in capsys.readouterr().err


def test_the_chain_recipes_start_from_the_merged_supervised_model() -> None:
    """Both recipes of the SFT -> DPO / GRPO chain read as written: the merged supervised model,
    the pairs file or the app's questions with the execution reward."""
    from peftkit.recipe import load_recipe

    dpo = load_recipe("recipes/app-sql-smollm2-dpo.yaml")
    grpo = load_recipe("recipes/app-sql-smollm2-grpo.yaml")
    assert dpo.model == grpo.model == "runs/app-sql-sft-merged"
    assert (dpo.task.type, dpo.task.train_file) == ("preference", "runs/sql-pairs.jsonl")
    assert (grpo.task.type, grpo.task.dataset, grpo.task.rewards) == (
        "grpo",
        "bank-sql",
        ("sql-execution",),
    )
