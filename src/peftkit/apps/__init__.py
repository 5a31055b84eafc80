"""Worked applications: each builds its data as plain records and scores a model's answers.

- `text_to_sql/`: a synthetic banking SQLite database, template and composed questions, a
  read-only sandbox, execution accuracy and test-suite accuracy over several databases.
- `tabular`: TabLLM-style rows-as-text on scikit-learn's bundled tables, few-shot sampling, and a
  logistic-regression baseline.
- `instructions`: chat and Alpaca data rendered with a chat template, loss on assistant turns only.

Records are lists of dicts ("prompt"/"response", "text"/"label" or "messages") that the training
pipeline in `peftkit.data` consumes; `write_jsonl` stores them.

The core never names the applications: `register()` adds their data sets to the bundled ones
(`peftkit.data.bundled.register_dataset`) and their GRPO rewards to the reward names
(`peftkit.tasks.rewards.register_reward`: `sql-execution`), so recipes name them by
`task.dataset` and `task.rewards` like the core's own. The command line calls it
(`peftkit.cli.applications`, the one core-side module that imports this package); Python code
that trains on an application's set calls it first. It imports no application module: each
set's loader does that when the set is read."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from peftkit.io import write_text_atomically

Rows = list[dict[str, Any]]


def _bank_sql() -> tuple[Rows, Rows]:
    """SYNTHETIC Text-to-SQL over a generated bank database (docs/applications.md)."""
    from peftkit.apps.text_to_sql.examples import bank_sql

    return bank_sql()


def _dialogues() -> tuple[Rows, Rows]:
    """chatterbot-corpus English dialogues as {"topic", "messages"}: 1,736 train / 289 held out."""
    from peftkit.apps.instructions import bundled_instructions

    return bundled_instructions()


def _tabllm(table: str, k: int | str) -> tuple[Rows, Rows]:
    """TabLLM-style (k training rows, fixed test rows) of a scikit-learn table, seed 0."""
    from peftkit.apps.tabular import bundled_split

    return bundled_split(table, k)


# The applications' bundled data sets: name -> loader (made once, so registering is idempotent).
DATASETS: dict[str, Callable[[], tuple[Rows, Rows]]] = {
    "bank-sql": _bank_sql,
    "chatterbot-dialogues": _dialogues,
    **{
        f"{table.replace('_', '-')}-tabllm-k{k}": functools.partial(_tabllm, table, k)
        for table in ("breast_cancer", "wine", "iris")
        for k in (4, 16, 64, "all")
    },
}


def _sql_execution(**columns: Any) -> list[float]:
    """The Text-to-SQL execution reward (text_to_sql/rewards.py), imported when first called."""
    from peftkit.apps.text_to_sql.rewards import execution_reward

    return execution_reward(**columns)


# The applications' GRPO rewards: name -> function (task.rewards names them).
REWARDS: dict[str, Callable[..., list[float]]] = {"sql-execution": _sql_execution}


def register() -> None:
    """Add the applications' data sets to peftkit's bundled ones and their rewards to the
    GRPO reward names (safe to call again)."""
    from peftkit.data.bundled import register_dataset
    from peftkit.tasks.rewards import register_reward

    for name, loader in DATASETS.items():
        register_dataset(name, loader)
    for name, function in REWARDS.items():
        register_reward(name, function)


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSON lines, atomically (temporary file, then rename)."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return write_text_atomically(path, lines)
