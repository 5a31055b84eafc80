"""How many accidental agreements the Text-to-SQL test suite catches.

Every two different gold queries of the question set (templated and composed, 661 queries) whose
results are the same answer on the seed-0 database stand for a wrong prediction that execution
accuracy would credit. This counts those pairs, how many each instance of the suite tells apart,
how many the whole suite tells apart, and lists the pairs it does not. Prints a table and writes
JSON.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/sql_suite_power.py
    .venv/bin/python benchmarks/sql_suite_power.py --smoke    # 60 queries, JSON to a temp path
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from common import add_smoke_flag, machine, parse_with_smoke

from peftkit.apps.text_to_sql.examples import generate_examples
from peftkit.apps.text_to_sql.sandbox import run_query
from peftkit.apps.text_to_sql.scoring import has_top_level_order_by, results_match
from peftkit.apps.text_to_sql.suite import EDGE_ROWS_VERSION, default_suite
from peftkit.tables import markdown_table

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "app-sql-suite-power.json"


def main() -> None:
    """Count the pairs, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="JSON to write")
    parser.add_argument("--limit", type=int, default=None, help="only the first N queries")
    add_smoke_flag(parser)
    args = parse_with_smoke(parser, limit=60)
    args.output = Path(args.output)
    suite = default_suite()
    examples = generate_examples(suite["seed0"])
    queries = sorted({e["sql"] for e in examples})[: args.limit]
    heldout = {e["sql"] for e in examples if e["split"] == "heldout"}
    results = {name: {q: run_query(path, q).rows for q in queries} for name, path in suite.items()}

    def same(name: str, a: str, b: str) -> bool:
        return results_match(results[name][b], results[name][a], has_top_level_order_by(a))

    # Only queries with equal row counts can agree: group by that first (661 queries).
    by_size = defaultdict(list)
    for query in queries:
        by_size[len(results["seed0"][query])].append(query)
    pairs = [
        (a, b)
        for group in by_size.values()
        for i, a in enumerate(group)
        for b in group[i + 1 :]
        if same("seed0", a, b)
    ]
    separated_by = {name: sum(not same(name, a, b) for a, b in pairs) for name in suite}
    left = [(a, b) for a, b in pairs if all(same(name, a, b) for name in suite)]
    report = {
        "command": "python benchmarks/sql_suite_power.py"
        + (f" --limit {args.limit}" if args.limit else ""),
        "machine": machine(),
        "edge_rows_version": EDGE_ROWS_VERSION,
        "queries": len(queries),
        "pairs_agreeing_on_seed0": len(pairs),
        "separated_by_instance": separated_by,
        "separated_by_suite": len(pairs) - len(left),
        "heldout_queries_with_a_partner": len({q for pair in pairs for q in pair if q in heldout}),
        "heldout_pairs_left": sum(a in heldout or b in heldout for a, b in left),
        "pairs_left": [list(pair) for pair in left],
    }
    rows = [[name, str(count)] for name, count in separated_by.items()]
    rows.append(["whole suite", str(report["separated_by_suite"])])
    print(f"{len(pairs)} pairs of different queries agree on seed0; separated by:")
    print(markdown_table(["instance", "pairs separated"], rows))
    for a, b in left:
        print(f"  still agreeing: {a}  |  {b}")
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
