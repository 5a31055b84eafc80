"""Scoring predicted SQL: exact match of the normalised text, execution accuracy on one database,
and test-suite execution accuracy on several (Zhong et al., 2020, "Semantic Evaluation for
Text-to-SQL with Distilled Test Suites").

Execution accuracy credits a query whose result equals the gold query's on the one database the
questions were generated from; a wrong query can get there by accident (an extra filter that
every row happens to pass, a different count that happens to be equal). Test-suite accuracy
credits it only if it matches on every database of a suite (`suite.py`): other seeds, and edge
rows that break the accidents."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftkit.apps.text_to_sql.sandbox import QueryResult, run_query
from peftkit.apps.text_to_sql.templates import is_informative
from peftkit.errors import DataError

_TOKEN = re.compile(
    r"'(?:[^']|'')*'"  # string literal (kept as written)
    r'|"(?:[^"]|"")*"'  # quoted identifier
    r"|\d+\.\d*|\.\d+|\d+"  # number
    r"|[A-Za-z_][A-Za-z_0-9]*"  # word
    r"|<=|>=|<>|!=|==|\|\||\S"  # operator or punctuation
)


def normalize_sql(sql: str) -> str:
    """SQL as tokens: case-folded outside string literals, single spaces, no trailing ';'."""
    tokens = []
    for token in _TOKEN.findall(sql.strip().rstrip(";").strip()):
        if token.startswith("'"):
            tokens.append(token)
        elif token.startswith('"'):
            tokens.append(token[1:-1].replace('""', '"').lower())
        else:
            tokens.append(token.lower())
    return " ".join(tokens).replace("!=", "<>").replace("==", "=")


def exact_match(predicted: str, gold: str) -> bool:
    """Whether two queries are the same after normalisation (a strict, string-level score)."""
    return normalize_sql(predicted) == normalize_sql(gold)


def has_top_level_order_by(sql: str) -> bool:
    """Whether the outermost query sorts its result (then row order is part of the answer)."""
    depth = 0
    tokens = normalize_sql(sql).split(" ")
    for index, token in enumerate(tokens):
        depth += (token == "(") - (token == ")")
        if depth == 0 and token == "order" and tokens[index + 1 : index + 2] == ["by"]:
            return True
    return False


def _cell(value: Any) -> Any:
    """A result value made comparable: whole floats as ints, other floats to 10 significant digits.

    Summation order changes the last bits of a float SUM or AVG, so exact float equality would
    fail queries that are right."""
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        return float(f"{value:.10g}")
    return value


def _columns_permutations(gold: list[tuple], predicted: list[tuple]) -> list[tuple[int, ...]]:
    """Column orders of the prediction whose column contents match the gold's, column by column."""
    width = len(gold[0]) if gold else 0
    gold_columns = [Counter(row[i] for row in gold) for i in range(width)]
    predicted_columns = [Counter(row[i] for row in predicted) for i in range(width)]
    options = [[j for j in range(width) if predicted_columns[j] == g] for g in gold_columns]
    orders: list[tuple[int, ...]] = [()]
    for choices in options:
        orders = [order + (j,) for order in orders for j in choices if j not in order][:1000]
    return orders


def results_match(predicted: list[tuple], gold: list[tuple], ordered: bool) -> bool:
    """Whether two result sets are the same answer.

    Rows compare as multisets (duplicates count) unless ordered; columns may come in any order,
    as the question fixes which values are asked for, not their order."""
    predicted = [tuple(_cell(v) for v in row) for row in predicted]
    gold = [tuple(_cell(v) for v in row) for row in gold]
    if len(predicted) != len(gold):
        return False
    if not gold:
        return True
    if len(predicted[0]) != len(gold[0]):
        return False
    for order in _columns_permutations(gold, predicted):
        moved = [tuple(row[j] for j in order) for row in predicted]
        if ordered and moved == gold:
            return True
        if not ordered and Counter(moved) == Counter(gold):
            return True
    return False


def extract_sql(generated: str) -> str:
    """The query inside a model's answer: drops code fences and a leading 'SQL:' label."""
    text = generated.strip()
    fence = re.search(r"```(?:sql)?\s*(.*?)(```|$)", text, re.DOTALL | re.IGNORECASE)
    if fence:
        text = fence.group(1).strip()
    return re.sub(r"^sql:\s*", "", text, flags=re.IGNORECASE).strip()


class _Gold:
    """Gold results by (database, query), run once each; a gold query that fails is an error."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.results: dict[tuple[str, str], QueryResult] = {}

    def __call__(self, db_path: str | Path, sql: str, example_id: Any) -> QueryResult:
        key = (str(db_path), sql)
        if key not in self.results:
            self.results[key] = run_query(db_path, sql, timeout_s=self.timeout_s)
        result = self.results[key]
        if not result.ok:
            raise DataError(
                f"Gold SQL of {example_id} fails on {db_path} ({result.message}): {sql}"
            )
        return result


def _matches(result: QueryResult, gold: QueryResult, gold_sql: str) -> bool:
    """Whether a prediction's result is the gold answer (row order counts under ORDER BY)."""
    return result.ok and results_match(result.rows, gold.rows, has_top_level_order_by(gold_sql))


def evaluate(
    examples: list[dict[str, Any]], predictions: list[str], db_path: str | Path,
    timeout_s: float = 2.0, suite: Mapping[str, str | Path] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Execution accuracy on db_path, test-suite accuracy on every database of suite (when
    given; name -> path) and exact match of predicted SQL, with every failure and its reason."""
    if len(examples) != len(predictions):
        raise DataError(
            f"{len(predictions)} predictions for {len(examples)} examples; give one per example."
        )
    gold = _Gold(timeout_s)
    records = []
    for example, predicted in zip(examples, predictions, strict=True):
        gold_sql, example_id = example["sql"], example.get("id")
        result = run_query(db_path, predicted, timeout_s=timeout_s)
        record = {
            "id": example_id, "template": example.get("template"),
            "question": example.get("question"), "gold": gold_sql, "predicted": predicted,
            "execution_match": _matches(result, gold(db_path, gold_sql, example_id), gold_sql),
            "exact_match": exact_match(predicted, gold_sql),
            "failure": result.failure, "message": result.message,
        }  # fmt: skip
        if suite is not None:
            # Every instance is judged, also one where the gold result is empty or zero: the
            # prediction must then be empty or zero too (see suite.py).
            record["suite_matches"] = {
                name: _matches(
                    run_query(path, predicted, timeout_s=timeout_s),
                    gold(path, gold_sql, example_id), gold_sql,
                )
                for name, path in suite.items()
            }  # fmt: skip
            record["test_suite_match"] = all(record["suite_matches"].values())
        records.append(record)
    count = len(records)
    report: dict[str, Any] = {
        "count": count,
        "execution_accuracy": sum(r["execution_match"] for r in records) / count if count else 0.0,
    }
    if suite is not None:
        report["test_suite_accuracy"] = (
            sum(r["test_suite_match"] for r in records) / count if count else 0.0
        )
    report["exact_match"] = sum(r["exact_match"] for r in records) / count if count else 0.0
    report["failures"] = dict(Counter(r["failure"] for r in records if r["failure"]))
    if suite is not None:
        report["suite"] = _suite_summary(suite, records, gold)
    report["records"] = records
    return report


def _suite_summary(
    suite: Mapping[str, str | Path], records: list[dict[str, Any]], gold: _Gold
) -> dict[str, Any]:
    """The suite's instances, and on each how many of the distinct gold queries give an
    uninformative (empty, NULL or zero) answer there, and how many records match there."""
    queries = sorted({r["gold"] for r in records})
    return {
        "instances": list(suite),
        "distinct_gold_queries": len(queries),
        "gold_uninformative": {
            name: sum(not is_informative(gold.results[(str(path), q)].rows) for q in queries)
            for name, path in suite.items()
        },
        "matches": {name: sum(r["suite_matches"][name] for r in records) for name in suite},
    }
