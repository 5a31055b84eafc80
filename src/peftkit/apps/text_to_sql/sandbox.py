"""Running untrusted SQL against the bank database without letting it change or hang anything.

Layers: the text must begin with SELECT or WITH; the connection is read-only (`mode=ro`,
`PRAGMA query_only`); an authorizer allows only reads; one statement only; a wall-clock limit
through the progress handler; caps on result rows and value sizes. Anything refused or failing
becomes a `QueryResult` with its reason, never an exception that loses a run."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import DataError

_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
_ALLOWED_ACTIONS.add(getattr(sqlite3, "SQLITE_RECURSIVE", 33))  # WITH RECURSIVE (time-limited)
_ACTION_NAMES = {
    getattr(sqlite3, name): name.removeprefix("SQLITE_")
    for name in (
        "SQLITE_ALTER_TABLE", "SQLITE_ANALYZE", "SQLITE_ATTACH", "SQLITE_CREATE_INDEX",
        "SQLITE_CREATE_TABLE", "SQLITE_CREATE_TEMP_INDEX", "SQLITE_CREATE_TEMP_TABLE",
        "SQLITE_CREATE_TEMP_TRIGGER", "SQLITE_CREATE_TEMP_VIEW", "SQLITE_CREATE_TRIGGER",
        "SQLITE_CREATE_VIEW", "SQLITE_CREATE_VTABLE", "SQLITE_DELETE", "SQLITE_DETACH",
        "SQLITE_DROP_INDEX", "SQLITE_DROP_TABLE", "SQLITE_DROP_TEMP_INDEX",
        "SQLITE_DROP_TEMP_TABLE", "SQLITE_DROP_TEMP_TRIGGER", "SQLITE_DROP_TEMP_VIEW",
        "SQLITE_DROP_TRIGGER", "SQLITE_DROP_VIEW", "SQLITE_DROP_VTABLE", "SQLITE_INSERT",
        "SQLITE_PRAGMA", "SQLITE_REINDEX", "SQLITE_SAVEPOINT", "SQLITE_TRANSACTION",
        "SQLITE_UPDATE",
    )
}  # fmt: skip
_DENIED_FUNCTIONS = {"load_extension"}
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)*", re.DOTALL)


@dataclass
class QueryResult:
    """What a query returned, or why it did not: failure is None on success."""

    rows: list[tuple] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    failure: str | None = None  # "refused" | "timeout" | "too_large" | "error"
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the query ran to completion."""
        return self.failure is None


@contextmanager
def read_only(db_path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection (the file cannot change through it), always closed after."""
    path = Path(db_path)
    if not path.is_file():
        raise DataError(f"Database {path} does not exist; build it with build_database().")
    # as_uri() percent-encodes the path, so odd file names cannot inject URI parameters.
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        yield connection
    finally:
        connection.close()


def _first_keyword(sql: str) -> str:
    """The first word of a query after leading whitespace and comments, lower-cased."""
    rest = _LEADING_COMMENTS.sub("", sql, count=1)
    match = re.match(r"[A-Za-z]+", rest)
    return match.group(0).lower() if match else ""


def _guard(connection: sqlite3.Connection, denied: list[str], deadline: list[float]) -> None:
    """Install the authorizer (reads only) and the progress handler (wall-clock limit)."""

    def authorize(action: int, arg1: Any, arg2: Any, database: Any, trigger: Any) -> int:
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _DENIED_FUNCTIONS:
            denied.append(f"function {arg2}")
            return sqlite3.SQLITE_DENY
        if action in _ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        denied.append(_ACTION_NAMES.get(action, f"action {action}"))
        return sqlite3.SQLITE_DENY

    connection.set_authorizer(authorize)
    connection.set_progress_handler(lambda: int(time.monotonic() > deadline[0]), 1000)


def run_query(
    db_path: str | Path, sql: str, timeout_s: float = 2.0, max_rows: int = 10_000
) -> QueryResult:
    """Run one untrusted SELECT read-only, with a time limit; failures are returned, not raised."""
    if not isinstance(sql, str) or not sql.strip():
        return QueryResult(failure="refused", message="empty query")
    if _first_keyword(sql) not in ("select", "with"):
        return QueryResult(failure="refused", message="only a single SELECT query is allowed")
    if not Path(db_path).is_file():  # a setup mistake, not a bad prediction: raise
        raise DataError(f"Database {db_path} does not exist; build it with build_database().")
    denied: list[str] = []
    deadline = [float("inf")]
    try:
        with read_only(db_path) as connection:
            connection.execute("PRAGMA query_only = ON")  # before the authorizer forbids pragmas
            connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)  # no giant blobs
            _guard(connection, denied, deadline)
            deadline[0] = time.monotonic() + timeout_s
            cursor = connection.execute(sql)
            rows = cursor.fetchmany(max_rows + 1)
            columns = [item[0] for item in cursor.description or []]
    except sqlite3.Warning as error:  # Python's "one statement at a time"
        return QueryResult(failure="refused", message=f"more than one statement ({error})")
    except sqlite3.Error as error:
        text = str(error)
        if denied:
            return QueryResult(failure="refused", message=f"not a read: {', '.join(denied)}")
        if "interrupted" in text and time.monotonic() > deadline[0]:
            return QueryResult(failure="timeout", message=f"ran longer than {timeout_s} s")
        if "one statement at a time" in text:
            return QueryResult(failure="refused", message=f"more than one statement ({text})")
        return QueryResult(failure="error", message=text)
    except (OverflowError, ValueError, MemoryError) as error:
        return QueryResult(failure="error", message=f"{type(error).__name__}: {error}")
    if len(rows) > max_rows:
        return QueryResult(failure="too_large", message=f"more than {max_rows} rows")
    return QueryResult(rows=rows, columns=columns)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, to prove a database was left unchanged."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
