"""Conversation records in the formats users bring (chat messages, Alpaca, ShareGPT,
prompt/response), as one validated list of {"role", "content"} turns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.data.files import is_blank
from peftkit.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
FORMATS_HELP = (
    'use one of: {"messages": [{"role": ..., "content": ...}, ...]}, '
    '{"instruction", "input" (optional), "output"} (Alpaca), '
    '{"conversations": [{"from": "human"|"gpt", "value": ...}]} (ShareGPT), {"prompt", "response"}'
)


def _as_list(value: Any, where: str) -> list[Any]:
    """A list of turns from a list, a JSON string (CSV cells) or an array (Parquet cells)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: the messages text is not valid JSON ({error.msg})."
            ) from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: messages must be a non-empty list of turns.")
    return list(value)


def validate_messages(messages: list[Any], where: str = "conversation") -> list[Message]:
    """Check roles and turn order; a clean list of {"role", "content"} dicts."""
    clean: list[Message] = []
    for number, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}, turn {number}: a turn needs 'role' and 'content' fields.")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(
                f"{where}, turn {number}: unknown role {role!r}; roles are {', '.join(ROLES)}."
            )
        if not isinstance(content, str):
            raise DataError(f"{where}, turn {number}: content must be text, not {content!r}.")
        clean.append({"role": role, "content": content})
    body = clean[1:] if clean and clean[0]["role"] == "system" else clean
    for number, turn in enumerate(body):
        expected = "user" if number % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise DataError(
                f"{where}: turns must go (system), user, assistant, user, ...; found "
                f"{turn['role']!r} where {expected!r} belongs (a system turn only comes first)."
            )
    if not body or body[-1]["role"] != "assistant" or is_blank(body[-1]["content"]):
        raise DataError(f"{where}: the conversation has no final assistant answer to learn.")
    return clean


def _text(value: Any) -> Any:
    """A number as text (a CSV column of numbers reads as ints); anything else unchanged."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _alpaca(record: dict[str, Any], where: str) -> list[Any]:
    """Alpaca instruction/input/output as a user turn and an assistant turn."""
    if is_blank(record.get("instruction")):
        raise DataError(f"{where}: the 'instruction' is empty.")
    if is_blank(record.get("output")):
        raise DataError(f"{where}: the 'output' (the answer) is missing or empty.")
    question = str(record["instruction"])
    if not is_blank(record.get("input")):
        question = f"{question}\n\n{record['input']}"
    turns = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": _text(record["output"])},
    ]
    if not is_blank(record.get("system")):
        turns.insert(0, {"role": "system", "content": record["system"]})
    return turns


def _sharegpt(record: dict[str, Any], where: str) -> list[Any]:
    """ShareGPT from/value turns as role/content turns."""
    turns = []
    for number, turn in enumerate(_as_list(record["conversations"], where)):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}, turn {number}: unknown speaker {speaker!r}; ShareGPT speakers are "
                f"{', '.join(SHAREGPT_ROLES)}."
            )
        turns.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return turns


def to_messages(record: dict[str, Any], where: str = "record") -> list[Message]:
    """Any supported record format as a validated messages list."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is not an object with named fields; {FORMATS_HELP}.")
    if "messages" in record:
        turns = _as_list(record["messages"], where)
    elif "instruction" in record or "output" in record:
        turns = _alpaca(record, where)
    elif "conversations" in record:
        turns = _sharegpt(record, where)
    elif "prompt" in record:
        if is_blank(record.get("response")):
            raise DataError(f"{where}: the 'response' (the answer) is missing or empty.")
        turns = [
            {"role": "user", "content": _text(record["prompt"])},
            {"role": "assistant", "content": _text(record["response"])},
        ]
    else:
        raise DataError(f"{where} has fields {sorted(record)}; {FORMATS_HELP}.")
    return validate_messages(turns, where)


def load_conversations(path: str | Path, encoding: str = "utf-8") -> list[list[Message]]:
    """Every conversation in a JSON, JSONL, CSV or Parquet file, validated."""
    from peftkit.data.files import read_rows

    rows = read_rows(path, encoding)
    return [to_messages(row, f"{path} row {index}") for index, row in enumerate(rows)]
