"""TabLLM-style tabular classification: table rows as text, few-shot samples, and a baseline.

Hegselmann et al., "TabLLM: Few-shot Classification of Tabular Data with Large Language Models"
(AISTATS 2023) serialise each row into text and tune a language model on k labelled rows. Here:

- two serialisations: "text" ("The mean radius is 17.99. The mean texture is 10.38. ...") and
  "list" ("- mean radius: 17.99" one per line); missing values are left out, as in TabLLM;
- answers are label words ("malignant"/"benign") that a causal LM learns to emit;
- few-shot training sets of k = 4, 16, 64 or all rows, class-balanced where the classes allow,
  seeded, drawn from a stratified training split; the test split stays fixed;
- a baseline, in `tabular_baseline`: logistic regression (scikit-learn, standardised features)
  on the same rows and the same k, with accuracy and AUC (one-vs-rest macro AUC for more classes);
- calibration of a tuned model's label-word scores, in `tabular_calibration`.

Data: scikit-learn's bundled breast cancer, wine and iris tables (files inside the package; no
download)."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

from peftkit.errors import ConfigError, DataError

TEMPLATES = ("text", "list")
FEW_SHOT_SIZES: tuple[int | str, ...] = (4, 16, 64, "all")
BUNDLED = {
    # name: (scikit-learn loader, label words in target order, question)
    "breast_cancer": (
        "load_breast_cancer",
        ("malignant", "benign"),
        "Is this breast mass malignant or benign?",
    ),
    "wine": (
        "load_wine",
        ("first", "second", "third"),
        "Which cultivar grew this wine: first, second or third?",
    ),
    "iris": (
        "load_iris",
        ("setosa", "versicolor", "virginica"),
        "Which species is this iris: setosa, versicolor or virginica?",
    ),
}


@dataclass(frozen=True)
class Table:
    """Rows of named feature values, their class ids, and the words that name the classes."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]
    labels: tuple[int, ...]
    label_words: tuple[str, ...]
    question: str


def bundled_table_name(records: list[dict[str, Any]]) -> str | None:
    """The bundled table whose question the records' prompts ask, else None."""
    prompt = str(records[0].get("prompt", "")) if records else ""
    return next((name for name, (_, _, question) in BUNDLED.items() if question in prompt), None)


def load_table(name: str) -> Table:
    """One of scikit-learn's bundled tables (breast_cancer, wine, iris) as a Table."""
    if name not in BUNDLED:
        raise ConfigError(f"No bundled table '{name}'; choose one of: {', '.join(BUNDLED)}.")
    import sklearn.datasets

    loader, words, question = BUNDLED[name]
    data = getattr(sklearn.datasets, loader)()
    # Underscores in names ("malic_acid") read as words in a sentence once they are spaces.
    columns = tuple(str(column).replace("_", " ") for column in data.feature_names)
    rows = tuple(
        {column: float(value) for column, value in zip(columns, row, strict=True)}
        for row in data.data
    )
    labels = tuple(int(label) for label in data.target)
    return Table(name, columns, rows, labels, words, question)


def cell_kind(value: Any) -> str | None:
    """The type family of a cell: number, text or boolean; None when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text" if value.strip() else None
    return type(value).__name__


def check_column_types(rows: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> None:
    """Refuse a column that mixes numbers, text and booleans (ambiguous to serialise and fit)."""
    kinds: dict[str, dict[str, Any]] = {}
    for row in rows:
        for column, value in row.items():
            kind = cell_kind(value)
            if kind is not None:
                kinds.setdefault(column, {}).setdefault(kind, value)
    for column, seen in kinds.items():
        if len(seen) > 1:
            examples = ", ".join(f"{kind} {value!r}" for kind, value in seen.items())
            raise DataError(
                f"Column '{column}' mixes types ({examples}). Clean it so every value is a "
                "number, or every value is text, before serialising the table."
            )


def table_from_records(
    records: list[dict[str, Any]], label_column: str, label_words: tuple[str, ...] | None = None,
    question: str = "What is the class of this row?", name: str = "table",
) -> Table:  # fmt: skip
    """A Table from plain records (e.g. `peftkit.data.files.read_rows`), checked."""
    if not records:
        raise DataError(f"Table '{name}' has no rows.")
    missing = [i for i, record in enumerate(records) if cell_kind(record.get(label_column)) is None]
    if missing:
        raise DataError(
            f"Table '{name}': {len(missing)} rows lack the label column '{label_column}' "
            f"(first: row {missing[0]}); every training row needs its answer."
        )
    raw = [str(record[label_column]).strip() for record in records]
    words = tuple(label_words) if label_words else tuple(sorted(set(raw)))
    unknown = sorted(set(raw) - set(words))
    if unknown:
        raise DataError(
            f"Table '{name}': labels {unknown} are not among the label words {list(words)}."
        )
    rows = [{k: v for k, v in record.items() if k != label_column} for record in records]
    check_column_types(rows)
    columns = tuple(dict.fromkeys(column for row in rows for column in row))
    labels = tuple(words.index(label) for label in raw)
    return Table(name, columns, tuple(rows), labels, words, question)


# --- serialisation ----------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A cell as a person would write it: 17.99, 1001, 0.07871, yes; never scientific notation."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        text = f"{value:.6g}"
        if "e" in text:  # tiny or huge: write the digits out
            text = f"{value:.12f}".rstrip("0").rstrip(".")
        return text
    return str(value).strip()


def serialize_row(row: dict[str, Any], template: str = "text") -> str:
    """One row as text: "The <column> is <value>." sentences, or a "- <column>: <value>" list."""
    cells = [(column, format_value(value)) for column, value in row.items() if cell_kind(value)]
    if template == "text":
        return " ".join(f"The {column} is {value}." for column, value in cells)
    if template == "list":
        return "\n".join(f"- {column}: {value}" for column, value in cells)
    raise ConfigError(f"Unknown serialisation template '{template}'; use one of: {TEMPLATES}.")


def row_prompt(text: str, question: str) -> str:
    """What a causal LM answers: the serialised row, the table's question, then "Answer:"."""
    return f"{text}\n{question}\nAnswer:"


def row_records(table: Table, indices: list[int], template: str = "text") -> list[dict[str, Any]]:
    """Training/eval records: "prompt"/"response" for causal LMs, "text"/"label" for classifiers."""
    records = []
    for index in indices:
        text = serialize_row(table.rows[index], template)
        word = table.label_words[table.labels[index]]
        records.append({
            "prompt": row_prompt(text, table.question),
            "response": f" {word}",
            "text": text,
            "label": word,
            "label_id": table.labels[index],
            "row": index,
        })  # fmt: skip
    return records


def parse_label_word(generated: str, label_words: tuple[str, ...]) -> int | None:
    """The class whose label word comes first in a model's answer, or None when none does."""
    found = []
    for class_id, word in enumerate(label_words):
        match = re.search(rf"\b{re.escape(word)}\b", generated, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), class_id))
    return min(found)[1] if found else None


# --- splits and few-shot samples --------------------------------------------------------------


def stratified_split(
    labels: tuple[int, ...] | list[int], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Seeded train/test row indices with each class split in the same proportion."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must lie between 0 and 1, not {test_fraction}.")
    rng = random.Random(seed)
    train, test = [], []
    for class_id in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == class_id]
        rng.shuffle(members)
        cut = max(1, round(len(members) * test_fraction)) if len(members) > 1 else 0
        test += members[:cut]
        train += members[cut:]
    return sorted(train), sorted(test)


def _quotas(sizes: dict[int, int], k: int, rng: random.Random) -> dict[int, int]:
    """Per-class counts summing to k: even, remainder to random classes, shortfalls passed on."""
    classes = sorted(sizes)
    quota = {c: k // len(classes) for c in classes}
    for c in rng.sample(classes, k % len(classes)):
        quota[c] += 1
    spare = sum(max(0, quota[c] - sizes[c]) for c in classes)
    quota = {c: min(quota[c], sizes[c]) for c in classes}
    while spare:  # a small class gives its unused share to the others, one row at a time
        for c in rng.sample(classes, len(classes)):
            if spare and quota[c] < sizes[c]:
                quota[c] += 1
                spare -= 1
    return quota


def few_shot_indices(
    labels: tuple[int, ...] | list[int], k: int | str, seed: int = 0,
    pool: list[int] | None = None,
) -> list[int]:  # fmt: skip
    """k row indices from pool (default: all rows), class-balanced where possible, seeded."""
    pool = list(range(len(labels))) if pool is None else list(pool)
    rng = random.Random(seed)
    if k == "all":
        chosen = list(pool)
    else:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive whole number or 'all', not {k!r}.")
        if k > len(pool):
            raise DataError(f"Asked for k={k} rows but only {len(pool)} are available.")
        by_class: dict[int, list[int]] = {}
        for index in pool:
            by_class.setdefault(labels[index], []).append(index)
        quota = _quotas({c: len(members) for c, members in by_class.items()}, k, rng)
        chosen = [i for c in sorted(by_class) for i in rng.sample(by_class[c], quota[c])]
    rng.shuffle(chosen)  # classes interleaved, not in blocks
    return chosen


def bundled_split(
    name: str, k: int | str = "all", template: str = "text", seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """(k few-shot training records, test records) of a bundled table; the test split is fixed."""
    table = load_table(name)
    train, test = stratified_split(table.labels, test_fraction, seed=0)
    rows = few_shot_indices(table.labels, k, seed=seed, pool=train)
    return row_records(table, rows, template), row_records(table, test, template)
