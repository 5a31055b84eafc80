"""Score committed predictions again, without generating: execution accuracy on seed 0, test-suite
accuracy on the suite, exact match, overall and per template, for each model in the file.

    python -m peftkit.apps.text_to_sql.rescore docs/results/app-sql-composed.json

The input is an `app-eval --app sql` report (`app_eval_sql.json`, or a results JSON holding one
under `app_eval`), whose records keep each question's gold and predicted SQL. The output JSON
(default: the input's name with `-testsuite`) holds the new scores beside the recorded ones and
a record per question with the instances it matched on."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from peftkit.apps.text_to_sql.database import default_database
from peftkit.apps.text_to_sql.scoring import evaluate
from peftkit.apps.text_to_sql.suite import EDGE_ROWS_VERSION, default_suite
from peftkit.errors import DataError, PeftkitError
from peftkit.io import write_text_atomically
from peftkit.tables import markdown_table

MODELS = ("base", "tuned")


def read_report(path: Path) -> dict[str, Any]:
    """The app-eval report in a file: its models' records, each with gold and predicted SQL."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read {path} as JSON ({error}).") from None
    report = data.get("app_eval", data) if isinstance(data, dict) else None
    if not isinstance(report, dict) or not any(m in report for m in MODELS):
        raise DataError(
            f"{path} holds no app-eval report: expected 'base' or 'tuned' (or 'app_eval' holding "
            "them), as `peftkit app-eval RUN --app sql` writes."
        )
    for model in (m for m in MODELS if m in report):
        records = report[model].get("records")
        if not records or any("gold" not in r or "predicted" not in r for r in records):
            raise DataError(
                f"{path}: the '{model}' report needs records with 'gold' and 'predicted' SQL."
            )
    return report


def per_template(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per template: questions, and how many are right on seed 0, on the suite, and exactly."""
    counts: dict[str, dict[str, int]] = defaultdict(
        lambda: {"questions": 0, "execution": 0, "test_suite": 0, "exact": 0}
    )
    for record in records:
        row = counts[record["template"]]
        row["questions"] += 1
        row["execution"] += record["execution_match"]
        row["test_suite"] += record["test_suite_match"]
        row["exact"] += record["exact_match"]
    return dict(counts)


def rescore(report: dict[str, Any], db_path: Path, suite: dict[str, Path]) -> dict[str, Any]:
    """Each model's records scored again on db_path and the suite, beside what was recorded."""
    scored = {}
    for model in (m for m in MODELS if m in report):
        old = report[model]
        examples = [{**r, "sql": r["gold"]} for r in old["records"]]
        new = evaluate(examples, [r["predicted"] for r in old["records"]], db_path, suite=suite)
        scored[model] = {
            "recorded": {k: old.get(k) for k in ("execution_accuracy", "exact_match")},
            **new,
            "per_template": per_template(new["records"]),
        }
    return scored


def main(argv: list[str] | None = None) -> int:
    """Command line: rescore one file, print a table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m peftkit.apps.text_to_sql.rescore")
    parser.add_argument("file", type=Path, help="an app-eval --app sql report (JSON)")
    parser.add_argument("--output", type=Path, help="default: FILE's name with -testsuite")
    args = parser.parse_args(argv)
    try:
        report = read_report(args.file)
        scored = rescore(report, default_database(0), default_suite())
    except PeftkitError as error:
        print(f"rescore: error: {error}", file=sys.stderr)
        return 2
    rows = [
        [model, f"{s['recorded']['execution_accuracy']:.3f}", f"{s['execution_accuracy']:.3f}",
         f"{s['test_suite_accuracy']:.3f}", f"{s['exact_match']:.3f}"]
        for model, s in scored.items()
    ]  # fmt: skip
    header = ["model", "recorded execution", "execution (seed 0)", "test suite", "exact match"]
    print(markdown_table(header, rows))
    output = args.output or args.file.with_name(f"{args.file.stem}-testsuite.json")
    source = args.file.as_posix()
    result = {
        "source": source,
        "command": f"python -m peftkit.apps.text_to_sql.rescore {source}",
        "edge_rows_version": EDGE_ROWS_VERSION,
        **scored,
    }
    write_text_atomically(output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
