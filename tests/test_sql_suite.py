"""Test-suite execution accuracy: a query is right only if it matches the gold query on every
database of the suite. The expected outcomes are computed here from the rows in Python."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from peftkit.apps.text_to_sql import database, rescore, scoring, suite
from peftkit.errors import DataError


@pytest.fixture(scope="module")
def suite_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return suite.build_suite(tmp_path_factory.mktemp("suite"))


def _rows(db: Path, table: str) -> list[tuple]:
    connection = sqlite3.connect(db)
    try:
        return connection.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        connection.close()


def _heldout(examples: list[dict], template: str) -> dict:
    return next(e for e in examples if e["template"] == template)


def test_instances_are_deterministic_per_seed(tmp_path: Path, suite_paths: dict) -> None:
    assert list(suite_paths) == [i.name for i in suite.SUITE] and len(suite.SUITE) >= 5
    again = suite.build_instance(tmp_path / "again.db", 3, edge_rows=True)
    for table in database.SCHEMA:
        assert _rows(again, table) == _rows(suite_paths["seed3-edge"], table)
    assert _rows(suite_paths["seed3-edge"], "accounts") != _rows(
        suite_paths["seed4-edge"], "accounts"
    )
    # Seed 0 without edge rows is the database the questions come from, unchanged.
    plain = database.build_database(tmp_path / "plain.db", seed=0)
    for table in database.SCHEMA:
        assert _rows(suite_paths["seed0"], table) == _rows(plain, table)


@pytest.mark.parametrize("name", [i.name for i in suite.SUITE if i.edge_rows])
def test_edge_instances_hold_the_edge_rows(suite_paths: dict, name: str) -> None:
    db = suite_paths[name]
    accounts, transactions = _rows(db, "accounts"), _rows(db, "transactions")
    for account_type in database.ACCOUNT_TYPES:
        balances = [row[4] for row in accounts if row[2] == account_type]
        assert 0.0 in balances and min(balances) < 0
    assert {1000.0, 5000.0, 10000.0, 50000.0} <= {row[4] for row in accounts}
    categories = {row[4] for row in transactions}
    assert len(categories) == len(database.CATEGORIES) - 1  # one category emptied
    assert any(row[2] == 0.0 for row in transactions)
    refunded = {row[4] for row in transactions if row[3] == "credit"}
    assert categories <= refunded  # a credit in every category, spending ones included
    cards = _rows(db, "cards")
    assert any(row[3] == "credit" and row[4] is None for row in cards)
    assert any(row[3] == "debit" and row[4] > 20000 for row in cards if row[4] is not None)
    assert any(row[6] == 0 and row[4] > 20000 for row in cards if row[4] is not None)
    assert any(row[3] == "credit" and row[4] != "salary" and row[2] > 1000 for row in transactions)
    customers = _rows(db, "customers")
    owners = {row[1] for row in accounts}
    assert any(row[0] not in owners for row in customers)
    people = [(row[1], row[2], row[3], row[5]) for row in customers]
    assert len(set(people)) < len(people)  # namesakes in one segment and city


def test_always_true_filter_passes_seed_0_but_fails_the_suite(
    suite_paths: dict, examples: list[dict]
) -> None:
    gold = _heldout(examples, "total_balance_type")
    account_type = gold["sql"].split("'")[1]
    predicted = gold["sql"] + " AND balance > 0"
    # Python: every seed-0 balance is positive, so the filter changes nothing there; on an
    # instance with a zero or negative balance of this type the sums differ.
    expected = {
        name: all(row[4] > 0 for row in _rows(db, "accounts") if row[2] == account_type)
        for name, db in suite_paths.items()
    }
    assert expected["seed0"] and not all(expected.values())
    report = scoring.evaluate([gold], [predicted], suite_paths["seed0"], suite=suite_paths)
    record = report["records"][0]
    assert record["execution_match"] and not record["test_suite_match"]
    assert record["suite_matches"] == expected
    assert report["execution_accuracy"] == 1.0 and report["test_suite_accuracy"] == 0.0


def test_coincidentally_equal_number_fails_the_suite(
    suite_paths: dict, examples: list[dict]
) -> None:
    gold_sql = "SELECT COUNT(*) FROM loans WHERE status = 'active'"
    gold = next(e for e in examples if e["sql"] == gold_sql)
    other = "SELECT COUNT(*) FROM accounts WHERE strftime('%Y', opened_date) = '2022'"

    def counts(db: Path) -> tuple[int, int]:
        loans = sum(row[6] == "active" for row in _rows(db, "loans"))
        return loans, sum(row[5].startswith("2022") for row in _rows(db, "accounts"))

    expected = {name: len(set(counts(db))) == 1 for name, db in suite_paths.items()}
    assert expected["seed0"] and not all(expected.values())  # equal on seed 0 by accident
    report = scoring.evaluate([gold], [other], suite_paths["seed0"], suite=suite_paths)
    assert report["records"][0]["execution_match"]
    assert report["records"][0]["suite_matches"] == expected
    assert report["test_suite_accuracy"] == 0.0


def test_gold_and_reordered_filters_pass_every_instance(
    suite_paths: dict, examples: list[dict]
) -> None:
    heldout = [e for e in examples if e["split"] == "heldout"]
    report = scoring.evaluate(
        heldout, [e["sql"] for e in heldout], suite_paths["seed0"], suite=suite_paths
    )
    assert report["test_suite_accuracy"] == report["execution_accuracy"] == 1.0
    assert all(all(r["suite_matches"].values()) for r in report["records"])
    # Gold answers that are empty or zero on an instance are counted, not dropped.
    queries = sorted({e["sql"] for e in heldout})
    for name, db in suite_paths.items():
        connection = sqlite3.connect(db)
        empty = sum(
            not any(v not in (None, 0) for row in connection.execute(q) for v in row)
            for q in queries
        )
        connection.close()
        assert report["suite"]["gold_uninformative"][name] == empty
    assert report["suite"]["gold_uninformative"]["seed0"] == 0

    gold = _heldout(examples, "names_segment_city")
    segment, city = gold["sql"].split("'")[1], gold["sql"].split("'")[3]
    reordered = (
        f"SELECT last_name, first_name FROM customers WHERE city = '{city}' "
        f"AND segment = '{segment}'"
    )
    report = scoring.evaluate([gold], [reordered], suite_paths["seed0"], suite=suite_paths)
    assert report["test_suite_accuracy"] == 1.0 and report["exact_match"] == 0.0


def test_a_gold_query_that_fails_on_an_instance_is_an_error(
    tmp_path: Path, suite_paths: dict, examples: list[dict]
) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    broken = {"seed0": suite_paths["seed0"], "empty": empty}
    with pytest.raises(DataError, match="fails on .*empty.db"):
        scoring.evaluate(examples[:1], [examples[0]["sql"]], suite_paths["seed0"], suite=broken)


def _report(tmp_path: Path, examples: list[dict], predictions: list[str]) -> Path:
    records = [
        {"id": e["id"], "template": e["template"], "gold": e["sql"], "predicted": p}
        for e, p in zip(examples, predictions, strict=True)
    ]
    path = tmp_path / "app_eval_sql.json"
    tuned = {"execution_accuracy": 1.0, "exact_match": 0.5, "records": records}
    path.write_text(json.dumps({"app_eval": {"app": "sql", "tuned": tuned}}))
    return path


def test_rescore_scores_committed_predictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, examples: list[dict]
) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    gold = _heldout(examples, "total_balance_type")
    path = _report(tmp_path, [gold, gold], [gold["sql"], gold["sql"] + " AND balance > 0"])
    assert rescore.main([str(path)]) == 0
    result = json.loads((tmp_path / "app_eval_sql-testsuite.json").read_text())
    tuned = result["tuned"]
    assert tuned["recorded"] == {"execution_accuracy": 1.0, "exact_match": 0.5}
    assert (tuned["execution_accuracy"], tuned["test_suite_accuracy"]) == (1.0, 0.5)
    assert tuned["per_template"]["total_balance_type"] == {
        "questions": 2, "execution": 2, "test_suite": 1, "exact": 1,
    }  # fmt: skip
    assert "base" not in result and result["command"].endswith(str(path.as_posix()))


def test_rescore_refuses_a_file_without_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"accuracy": 0.5}))
    assert rescore.main([str(path)]) == 2
    assert "no app-eval report" in capsys.readouterr().err
    assert not (tmp_path / "other-testsuite.json").exists()
