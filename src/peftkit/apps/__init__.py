"""Worked applications: each builds its data as plain records and scores a model's answers.

- `text_to_sql`: a synthetic banking SQLite database, template questions, a read-only sandbox and
  execution accuracy.
- `tabular`: TabLLM-style rows-as-text on scikit-learn's bundled tables, few-shot sampling, and a
  logistic-regression baseline.
- `instructions`: chat and Alpaca data rendered with a chat template, loss on assistant turns only.

Records are lists of dicts ("prompt"/"response", "text"/"label" or "messages") that the training
pipeline in `peftkit.data` consumes; `write_jsonl` stores them."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSON lines, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            for record in records:
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path
