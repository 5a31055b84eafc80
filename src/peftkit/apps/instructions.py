"""The bundled instruction set: the English part of chatterbot-corpus 1.3.3 (BSD), small real
dialogues on 21 topics, read from its YAML files without importing the package, and split so
that no held-out question is seen in training. The chat task type (peftkit.tasks.chat) trains on
it; the formats and the loss masking live there."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path
from typing import Any

from peftkit.errors import DataError
from peftkit.tasks.conversations import ROLES


def chatterbot_folder() -> Path:
    """The YAML data folder of chatterbot-corpus, found without importing the package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The bundled instruction set needs the package 'chatterbot-corpus': "
            "pip install chatterbot-corpus==1.3.3"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _turns(conversation: Any) -> list[str] | None:
    """A dialogue's turns as text, or None when it is not a list of at least two text turns."""
    if not isinstance(conversation, list):
        return None
    turns = []
    for turn in conversation:
        if isinstance(turn, bool) or not isinstance(turn, (str, int, float)):
            return None  # YAML read 'yes' as a boolean or nested a list: the text is lost
        turns.append(str(turn).strip())
    turns = turns[: len(turns) // 2 * 2]  # a last question without an answer teaches nothing
    return turns if turns and all(turns) else None


def chatterbot_conversations(
    language: str = "english", folder: str | Path | None = None
) -> list[dict[str, Any]]:
    """Every dialogue of one language as {"topic", "messages"}, turns alternating user/assistant."""
    import yaml

    source = Path(folder) if folder is not None else chatterbot_folder()
    files = sorted((source / language).glob("*.yml"))
    if not files:
        raise DataError(f"No YAML dialogue files under {source / language}.")
    records = []
    for file in files:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        topic = str((data.get("categories") or [file.stem])[0])
        for conversation in data.get("conversations") or []:
            turns = _turns(conversation)
            if turns is None:
                continue
            messages = [
                {"role": ROLES[1 + number % 2], "content": turn}
                for number, turn in enumerate(turns)
            ]
            records.append({"topic": topic, "messages": messages})
    return records


def _question_key(record: dict[str, Any]) -> str:
    """The first question, folded, so repeats of one question land in one split."""
    first = next(m["content"] for m in record["messages"] if m["role"] == "user")
    return re.sub(r"[^a-z0-9 ]", "", first.lower()).strip()


def split_conversations(
    records: list[dict[str, Any]], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded train/held-out split by first question: no held-out question is seen in training."""
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction must lie between 0 and 1, not {heldout_fraction}.")
    keys = sorted({_question_key(record) for record in records})
    random.Random(seed).shuffle(keys)
    heldout_keys = set(keys[: max(1, round(len(keys) * heldout_fraction))])
    train = [r for r in records if _question_key(r) not in heldout_keys]
    heldout = [r for r in records if _question_key(r) in heldout_keys]
    return train, heldout


def bundled_instructions(
    heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The bundled English dialogue set (chatterbot-corpus), split into train and held-out."""
    return split_conversations(chatterbot_conversations(), heldout_fraction, seed)
