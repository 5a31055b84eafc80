"""Text-to-SQL: the synthetic database, the question set, the read-only sandbox and the metrics."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from peftkit.apps.text_to_sql import database, sandbox, scoring, templates
from peftkit.apps.text_to_sql import examples as sql_examples
from peftkit.errors import DataError


def _rows(db: Path, table: str) -> list[tuple]:
    connection = sqlite3.connect(db)
    try:
        return connection.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        connection.close()


def test_database_is_seeded_and_consistent(db: Path, tmp_path: Path) -> None:
    counts = {table: len(_rows(db, table)) for table in database.SCHEMA}
    assert 3000 <= sum(counts.values()) <= 10000  # "a few thousand" rows
    assert all(count > 0 for count in counts.values())
    # Foreign keys hold (checked here in Python, not by the builder's own SQL).
    customers = {row[0] for row in _rows(db, "customers")}
    accounts = {row[0] for row in _rows(db, "accounts")}
    assert {row[1] for row in _rows(db, "accounts")} <= customers
    assert {row[1] for row in _rows(db, "transactions")} <= accounts
    assert {row[1] for row in _rows(db, "cards")} <= accounts
    assert {row[1] for row in _rows(db, "loans")} <= customers
    # Same seed, same rows; another seed, other rows.
    again = database.build_database(tmp_path / "again.db", seed=0)
    other = database.build_database(tmp_path / "other.db", seed=1)
    assert _rows(again, "transactions") == _rows(db, "transactions")
    assert _rows(other, "transactions") != _rows(db, "transactions")


def test_schema_rendering_matches_the_file(db: Path) -> None:
    rendered = database.render_schema(db)
    assert rendered == database.render_schema()
    assert rendered.count("CREATE TABLE") == len(database.SCHEMA)
    assert "\n" not in rendered.splitlines()[0] and "  " not in rendered
    prompt = sql_examples.sql_prompt("How many loans are active?", rendered)
    assert rendered in prompt and prompt.endswith("SQL:")


def test_question_set_holds_out_whole_templates(db: Path, examples: list[dict]) -> None:
    splits = Counter(example["split"] for example in examples)
    assert splits["train"] > 200 and splits["heldout"] > 50
    train_templates = {e["template"] for e in examples if e["split"] == "train"}
    heldout_templates = {e["template"] for e in examples if e["split"] == "heldout"}
    assert heldout_templates == set(templates.HELDOUT_TEMPLATES)
    assert not train_templates & heldout_templates
    hand = {t for t in train_templates if not t.startswith("composed:")}
    assert len(hand | heldout_templates) == len(templates.TEMPLATES) >= 20
    train_sql = {e["sql"] for e in examples if e["split"] == "train"}
    assert not train_sql & {e["sql"] for e in examples if e["split"] == "heldout"}
    assert all("{" not in e["question"] for e in examples)
    assert len({e["id"] for e in examples}) == len(examples)
    assert len({e["sql"] for e in examples}) == len({(e["sql"], e["template"]) for e in examples})
    # Several paraphrases per hand-written query.
    per_query = Counter(e["sql"] for e in examples if not e["template"].startswith("composed:"))
    assert min(per_query.values()) >= 3
    assert sql_examples.generate_examples(db, seed=0) == examples


def test_every_gold_query_runs_and_says_something(db: Path, examples: list[dict]) -> None:
    for sql in {example["sql"] for example in examples}:
        result = sandbox.run_query(db, sql)
        assert result.ok, (sql, result.message)
        assert result.rows and any(v not in (None, 0) for row in result.rows for v in row)


def test_gold_answers_agree_with_python(db: Path, examples: list[dict]) -> None:
    customers, accounts = _rows(db, "customers"), _rows(db, "accounts")
    transactions = _rows(db, "transactions")
    by_id = {e["template"]: e for e in examples}
    city_example = by_id["count_customers_city"]
    city = next(c for c in database.CITIES if f"'{c}'" in city_example["sql"])
    expected = sum(1 for row in customers if row[3] == city)
    assert sandbox.run_query(db, city_example["sql"]).rows == [(expected,)]

    top = by_id["top_accounts_balance"]
    n = int(top["sql"].rsplit(" ", 1)[1])
    expected_top = sorted(((row[0], row[4]) for row in accounts), key=lambda r: -r[1])[:n]
    assert sandbox.run_query(db, top["sql"]).rows == expected_top

    spend = by_id["spend_per_category_year"]
    year = next(y for y in templates.YEARS if f"'{y}'" in spend["sql"])
    totals: Counter = Counter()
    for row in transactions:
        if row[3] == "debit" and row[6].startswith(year):
            totals[row[4]] += row[2]
    got = sandbox.run_query(db, spend["sql"]).rows
    assert scoring.results_match(got, list(totals.items()), ordered=False)


def test_prompt_records_carry_schema_and_answer(examples: list[dict]) -> None:
    records = sql_examples.prompt_records(examples[:3], database.render_schema())
    assert records[0]["response"] == examples[0]["sql"]
    assert examples[0]["question"] in records[0]["prompt"]
    assert "CREATE TABLE loans" in records[0]["prompt"]


ATTACKS = [
    ("DROP TABLE customers", "refused"),
    ("SELECT 1; DROP TABLE customers", "refused"),
    ("select 1 ;\n DELETE FROM accounts", "refused"),
    ("ATTACH DATABASE 'elsewhere.db' AS other", "refused"),
    ("SELECT 1; ATTACH DATABASE 'elsewhere.db' AS other", "refused"),
    ("PRAGMA journal_mode = WAL", "refused"),
    ("PRAGMA user_version = 7", "refused"),
    ("SELECT 1; PRAGMA user_version = 7", "refused"),
    ("WITH x AS (SELECT 1) DELETE FROM customers", "refused"),
    ("WITH x AS (SELECT 1) UPDATE accounts SET balance = 0", "refused"),
    ("WITH x AS (SELECT 1) INSERT INTO branches VALUES (99, 'x', 'y', 2000)", "refused"),
    ("/* hidden */ CREATE TABLE evil (x)", "refused"),
    ("SELECT load_extension('evil')", "refused"),
    ("", "refused"),
    ("SELECT * FROM no_such_table", "error"),
    ("SELEC * FROM customers", "refused"),
    ("SELECT zeroblob(100000000)", "error"),
    ("SELECT * FROM transactions a, transactions b", "too_large"),
]


@pytest.mark.parametrize(("sql", "failure"), ATTACKS)
def test_sandbox_refuses_and_records(db: Path, sql: str, failure: str) -> None:
    before = sandbox.file_digest(db)
    result = sandbox.run_query(db, sql)
    assert result.failure == failure, result.message
    assert result.message
    assert sandbox.file_digest(db) == before
    assert not list(db.parent.glob("*-wal")) and not list(db.parent.glob("*-journal"))
    assert not (db.parent / "elsewhere.db").exists()


def test_endless_recursion_times_out(db: Path) -> None:
    endless = (
        "WITH RECURSIVE counter(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM counter) "
        "SELECT COUNT(*) FROM counter"
    )
    before = sandbox.file_digest(db)
    start = time.monotonic()
    result = sandbox.run_query(db, endless, timeout_s=0.3)
    assert time.monotonic() - start < 3
    assert result.failure == "timeout"
    assert sandbox.file_digest(db) == before
    # A bounded recursive query is still fine.
    bounded = endless.replace("FROM counter)", "FROM counter WHERE x < 10)")
    assert sandbox.run_query(db, bounded).rows == [(10,)]


def test_the_connection_itself_is_read_only(db: Path) -> None:
    # Even with no authorizer, the sandbox's connection cannot write.
    with sandbox.read_only(db) as connection, pytest.raises(sqlite3.OperationalError):
        connection.execute("DELETE FROM customers")


def test_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="build_database"):
        sandbox.run_query(tmp_path / "absent.db", "SELECT 1")


def test_results_match_rules() -> None:
    match = scoring.results_match
    assert match([(2,), (1,)], [(1,), (2,)], ordered=False)
    assert not match([(2,), (1,)], [(1,), (2,)], ordered=True)
    assert not match([(1,), (1,)], [(1,)], ordered=False)  # duplicates count
    assert not match([(1,), (1,), (2,)], [(1,), (2,), (2,)], ordered=False)
    assert match([(0.1 + 0.2,)], [(0.3,)], ordered=False)  # summation-order noise
    assert match([(3.0,)], [(3,)], ordered=False)
    assert not match([(0.3001,)], [(0.3,)], ordered=False)
    assert match([("Ana", 1), ("Ben", 2)], [(1, "Ana"), (2, "Ben")], ordered=False)
    assert not match([("Ana", 2), ("Ben", 1)], [(1, "Ana"), (2, "Ben")], ordered=False)
    assert not match([(1, 2)], [(1,)], ordered=False)
    assert match([], [], ordered=True)
    assert match([(None,)], [(None,)], ordered=False)


def test_order_by_detection_and_exact_match() -> None:
    assert scoring.has_top_level_order_by("SELECT a FROM t ORDER BY a")
    assert not scoring.has_top_level_order_by("SELECT a FROM (SELECT a FROM t ORDER BY a) LIMIT 3")
    assert not scoring.has_top_level_order_by("SELECT 'order by' FROM t")
    assert scoring.exact_match(
        "select  COUNT(*) from Customers ;", "SELECT COUNT(*) FROM customers"
    )
    assert scoring.exact_match("SELECT a FROM t WHERE b != 1", "SELECT a FROM t WHERE b<>1")
    assert not scoring.exact_match(
        "SELECT * FROM t WHERE c = 'Oslo'", "SELECT * FROM t WHERE c = 'oslo'"
    )


def test_evaluate_scores_and_records_failures(db: Path, examples: list[dict]) -> None:
    picked = [e for e in examples if e["template"] == "count_customers_city"][:2]
    picked.append(next(e for e in examples if e["template"] == "top_accounts_balance"))
    city = next(c for c in database.CITIES if f"'{c}'" in picked[0]["sql"])
    predictions = [
        f"```sql\nselect count(customer_id) from customers where city = '{city}'\n```",
        "DROP TABLE customers",
        picked[2]["sql"].replace("DESC", "ASC"),  # right rows, wrong order: ORDER BY counts
    ]
    before = sandbox.file_digest(db)
    report = scoring.evaluate(picked, [scoring.extract_sql(p) for p in predictions], db)
    assert sandbox.file_digest(db) == before
    assert [r["execution_match"] for r in report["records"]] == [True, False, False]
    assert report["execution_accuracy"] == pytest.approx(1 / 3)
    assert report["exact_match"] == 0.0
    assert report["failures"] == {"refused": 1}
    assert report["records"][1]["message"]
    perfect = scoring.evaluate(picked, [e["sql"] for e in picked], db)
    assert perfect["execution_accuracy"] == perfect["exact_match"] == 1.0


def test_evaluate_refuses_misaligned_predictions(db: Path, examples: list[dict]) -> None:
    with pytest.raises(DataError, match="one per example"):
        scoring.evaluate(examples[:2], ["SELECT 1"], db)


def test_extract_sql() -> None:
    assert scoring.extract_sql("SQL: SELECT 1") == "SELECT 1"
    assert scoring.extract_sql("```sql\nSELECT 2;\n```\nThis counts.") == "SELECT 2;"
    assert scoring.extract_sql("  SELECT 3 ") == "SELECT 3"


def test_bundled_split_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    train, heldout = sql_examples.bundled_split(seed=0)
    assert (tmp_path / "text-to-sql" / "bank-seed0.db").is_file()
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in heldout} == {"heldout"}
    assert all(r["prompt"].endswith("SQL:") and r["response"] == r["sql"] for r in train + heldout)
