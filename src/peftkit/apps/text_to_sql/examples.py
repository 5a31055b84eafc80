"""The Text-to-SQL question set: every template's questions (marked train or held out by
template) plus the composed training questions, as prompt/response records over the bundled
database; and the bundled `bank-sql` data set with the compact schema in each prompt."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from peftkit.apps.text_to_sql.compositions import composed_examples
from peftkit.apps.text_to_sql.database import (
    SCHEMA,
    default_database,
    render_schema,
)
from peftkit.apps.text_to_sql.sandbox import read_only
from peftkit.apps.text_to_sql.templates import (
    HELDOUT_TEMPLATES,
    TEMPLATES,
    is_informative,
    quote_value,
    slot_fillings,
)


def generate_examples(
    db_path: str | Path, fills_per_template: int = 6, seed: int = 0, composed_per_shape: int = 2
) -> list[dict[str, Any]]:
    """Question/SQL examples from every template, each marked train or heldout by template, then
    composed_per_shape composed training questions per shape (`compositions`; 0: none)."""

    examples = []
    with read_only(db_path) as connection:
        for template in TEMPLATES:
            rng = random.Random(f"{seed}:{template.name}")
            kept = 0
            for fill in slot_fillings(template, rng, fills_per_template * 3):
                sql = template.sql.format(**{k: quote_value(v) for k, v in fill.items()})
                if not is_informative(connection.execute(sql).fetchall()):
                    continue  # an empty gold answer would credit any empty prediction
                for number, paraphrase in enumerate(template.paraphrases):
                    examples.append({
                        "id": f"{template.name}-{kept}-{number}",
                        "template": template.name,
                        "question": paraphrase.format(**fill),
                        "sql": sql,
                        "split": "heldout" if template.name in HELDOUT_TEMPLATES else "train",
                    })  # fmt: skip
                kept += 1
                if kept == fills_per_template:
                    break
        if composed_per_shape:
            hand_sql = {example["sql"] for example in examples}
            examples += composed_examples(connection, composed_per_shape, seed, hand_sql)
    return examples


def sql_prompt(question: str, schema: str) -> str:
    """The prompt a model completes with one SQLite query."""
    return (
        f"Database schema (SQLite):\n{schema}\n\n"
        f"Question: {question}\nWrite one SQLite SELECT query that answers the question.\nSQL:"
    )


def prompt_records(examples: list[dict[str, Any]], schema: str) -> list[dict[str, Any]]:
    """Prompt/response records (schema in the prompt, gold SQL as the response) for training."""
    return [
        {**example, "prompt": sql_prompt(example["question"], schema), "response": example["sql"]}
        for example in examples
    ]


def bundled_split(
    db_path: str | Path | None = None, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, held-out-template records) with the schema in each prompt."""
    db_path = Path(db_path) if db_path is not None else default_database(seed)
    records = prompt_records(generate_examples(db_path, seed=seed), render_schema(db_path))
    train = [record for record in records if record["split"] == "train"]
    heldout = [record for record in records if record["split"] == "heldout"]
    return train, heldout


def compact_sql_schema() -> str:
    """The bank schema as one `table(column, ...)` line per table (499 characters).

    The full CREATE statements are ~1,400 characters (~400 tokens); on 2 CPU cores the prompt's
    length sets the cost of every training step, and the column names carry what the questions
    need (types are implied by the names, join keys by the shared `_id` columns)."""
    lines = []
    for table, create in SCHEMA.items():
        body = create[create.index("(") + 1 : create.rindex(")")]
        # Split at top-level commas only ("REFERENCES branches(branch_id)" holds parentheses).
        columns = [part.strip().split()[0] for part in re.split(r",\s*(?![^()]*\))", body)]
        lines.append(f"{table}({', '.join(columns)})")
    return "\n".join(lines)


def bank_sql() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """SYNTHETIC Text-to-SQL: 849 train (309 templated, 540 composed) / 54 held-out-template
    prompt/response records over the bundled bank database (built under peftkit's cache
    folder), with the compact schema."""
    db_path = default_database()
    records = prompt_records(generate_examples(db_path), compact_sql_schema())
    train = [record for record in records if record["split"] == "train"]
    return train, [record for record in records if record["split"] == "heldout"]
