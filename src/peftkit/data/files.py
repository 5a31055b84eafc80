"""Read user data files (CSV, JSON, JSONL, Parquet) into lists of row dicts, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.errors import DataError

SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


def _read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    """One JSON object a line; names the first bad line."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not valid JSON ({error.msg}).") from None
    return rows


def _read_json(path: Path, text: str) -> list[dict[str, Any]]:
    """A JSON list of objects (or an object holding one list under "data")."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of objects (one per example).")
    return data


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a data file as a dict; refuses missing, empty, undecodable or odd files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    if path.suffix not in SUFFIXES:
        raise DataError(f"Cannot read {path}: use one of {', '.join(SUFFIXES)}.")
    if path.suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path} is not UTF-8 text (bad byte at offset {error.start}); re-save it as UTF-8."
            ) from None
        if path.suffix == ".csv":
            import io

            import pandas as pd

            if not text.strip():
                rows = []
            else:
                rows = pd.read_csv(io.StringIO(text), keep_default_na=False).to_dict("records")
        elif path.suffix == ".jsonl":
            rows = _read_json_lines(path, text)
        else:
            rows = _read_json(path, text)
    if not rows:
        raise DataError(f"{path} holds no examples.")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: example {bad} is not an object with named fields.")
    return rows


def require_columns(rows: list[dict[str, Any]], columns: list[str], source: str) -> None:
    """Refuse data lacking a needed column, listing the columns it does have."""
    present = set(rows[0]) if rows else set()
    for column in columns:
        if column not in present:
            raise DataError(
                f"{source} has no column '{column}'. Its columns are: "
                f"{', '.join(sorted(present)) or '(none)'}. Set the recipe's task column names "
                "to match (text_column, label_column, prompt_column, response_column)."
            )
        missing = [i for i, row in enumerate(rows) if row.get(column) is None]
        if missing:
            raise DataError(
                f"{source}: {len(missing)} rows lack '{column}' (first: row {missing[0]})."
            )
