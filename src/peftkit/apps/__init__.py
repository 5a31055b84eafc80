"""Worked applications: each builds its data as plain records and scores a model's answers.

- `text_to_sql/`: a synthetic banking SQLite database, template and composed questions, a
  read-only sandbox, execution accuracy and test-suite accuracy over several databases.
- `tabular`: TabLLM-style rows-as-text on scikit-learn's bundled tables, few-shot sampling, and a
  logistic-regression baseline.
- `instructions`: chat and Alpaca data rendered with a chat template, loss on assistant turns only.

Records are lists of dicts ("prompt"/"response", "text"/"label" or "messages") that the training
pipeline in `peftkit.data` consumes; `write_jsonl` stores them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftkit.io import write_text_atomically


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSON lines, atomically (temporary file, then rename)."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return write_text_atomically(path, lines)
