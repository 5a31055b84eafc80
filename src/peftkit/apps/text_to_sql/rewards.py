"""The Text-to-SQL execution reward for GRPO (`task.rewards: [sql-execution]`), registered with
the core by `peftkit.apps.register()`.

Each completion's query (`scoring.extract_sql`) runs in the read-only sandbox on the bank
database and is scored by the application's own scorer (`scoring.evaluate`): 1.0 when its result
is the gold query's result set, VALID_SQL (0.1) when it runs but answers otherwise, 0.0 when it
is refused, fails or times out. The gold query comes from the rows' `sql` column (as in
`bank-sql`)."""

from __future__ import annotations

from typing import Any

from peftkit.apps.text_to_sql.database import default_database
from peftkit.apps.text_to_sql.scoring import evaluate, extract_sql
from peftkit.errors import RewardError

CORRECT = 1.0
VALID_SQL = 0.1  # ran, read-only and in time, but not the gold result set
NAME = "sql-execution"


def execution_reward(completions: list[str], sql: list[str] | None = None, **_: Any) -> list[float]:
    """1.0 for the gold result set, 0.1 for other SQL that runs, 0.0 for SQL that does not."""
    if sql is None:
        raise RewardError(
            f"The {NAME} reward needs each row's gold query in a 'sql' column (as bank-sql has)."
        )
    examples = [{"sql": gold, "id": f"completion {i}"} for i, gold in enumerate(sql)]
    predictions = [extract_sql(text) for text in completions]
    records = evaluate(examples, predictions, default_database())["records"]
    return [
        CORRECT if r["execution_match"] else VALID_SQL if r["failure"] is None else 0.0
        for r in records
    ]
