"""Shared test set-up: offline, few threads, fixed seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic Text-to-SQL bank database (seed 0), one per test module."""
    from peftkit.apps.text_to_sql.database import build_database

    return build_database(tmp_path_factory.mktemp("bank") / "bank.db", seed=0)


@pytest.fixture(scope="module")
def examples(db: Path) -> list[dict]:
    """The Text-to-SQL question set over that database (templated and composed)."""
    from peftkit.apps.text_to_sql.examples import generate_examples

    return generate_examples(db, seed=0)
