"""Read user data files (CSV, JSON, JSONL, Parquet) into lists of row dicts, with clear errors."""

from __future__ import annotations

import codecs
import json
import math
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


def _read_text(path: Path, encoding: str) -> str:
    """The file's text in the given encoding (UTF-8 may start with a byte-order mark, as Excel
    writes it); an undecodable byte names its offset and how to say the right encoding."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(
            f"Cannot read {path}: {encoding!r} is not a text encoding Python knows (use a name "
            "such as utf-8, latin-1 or cp1252)."
        ) from None
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not {encoding} text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}). Set task.encoding to the file's encoding (for example latin-1 "
            "or cp1252 for files saved by older Windows and Excel), or re-save it as UTF-8."
        ) from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """A Parquet file's rows; a file that is not Parquet (a CSV renamed) says so."""
    import pandas as pd

    try:
        return pd.read_parquet(path).to_dict("records")
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        start = path.read_bytes()[:4]
        hint = "" if start == b"PAR1" else " (it does not start with Parquet's PAR1 mark)"
        raise DataError(
            f"{path} is not a readable Parquet file{hint}: {error}. If it holds CSV or JSON "
            "text, give it the matching suffix (.csv, .json, .jsonl)."
        ) from None


def _read_csv(path: Path, text: str) -> list[dict[str, Any]]:
    """A CSV file's rows: a header naming a column twice, or a row with more fields than the
    header (an unquoted comma), is refused, naming the column or the line."""
    import csv
    import io

    import pandas as pd

    header = next(csv.reader(io.StringIO(text)), [])
    seen: dict[str, int] = {}
    for number, name in enumerate(header, start=1):
        if name in seen:
            raise DataError(
                f"{path}: the header names column '{name}' twice (columns {seen[name]} and "
                f"{number}); which one holds the data is ambiguous. Rename or remove one."
            )
        seen[name] = number
    try:
        return pd.read_csv(io.StringIO(text), keep_default_na=False).to_dict("records")
    except (pd.errors.ParserError, csv.Error) as error:
        raise DataError(
            f"{path} is not well-formed CSV ({str(error).strip()}). A text cell holding a comma, "
            'a quote or a line break must be quoted ("like, this").'
        ) from None


def read_rows(path: str | Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Every row of a data file as a dict; refuses missing, empty, undecodable or odd files.
    `encoding` is the text encoding of CSV, JSON and JSONL files (Parquet carries its own)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"Data file {path} is a folder; give the path of a file inside it.")
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    if path.suffix not in SUFFIXES:
        raise DataError(f"Cannot read {path}: use one of {', '.join(SUFFIXES)}.")
    if path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        text = _read_text(path, encoding)
        if path.suffix == ".csv":
            rows = _read_csv(path, text) if text.strip() else []
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


def is_blank(value: Any) -> bool:
    """Whether a cell holds nothing: None, NaN (pandas' empty cell) or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def name_rows(indices: list[int], shown: int = 5) -> str:
    """'rows 2, 5 and 9' (the first few of many: '... and 12 more'); rows count from 0."""
    words = [str(i) for i in indices[:shown]]
    if len(indices) > shown:
        return f"rows {', '.join(words)} and {len(indices) - shown} more"
    if len(words) == 1:
        return f"row {words[0]}"
    return f"rows {', '.join(words[:-1])} and {words[-1]}"


def require_columns(
    rows: list[dict[str, Any]], columns: list[str], source: str, values: bool = True
) -> None:
    """Refuse data lacking a needed column, listing the columns it does have; with `values`,
    also refuse rows that hold no value (None) in one."""
    present = set(rows[0]) if rows else set()
    for column in columns:
        if column not in present:
            raise DataError(
                f"{source} has no column '{column}'. Its columns are: "
                f"{', '.join(sorted(present)) or '(none)'}. Set the recipe's task column names "
                "to match (text_column, label_column, prompt_column, response_column)."
            )
        missing = [i for i, row in enumerate(rows) if row.get(column) is None]
        if values and missing:
            raise DataError(
                f"{source}: {len(missing)} rows lack '{column}' (first: row {missing[0]})."
            )
