"""Composed Text-to-SQL training questions: pieces recombine, held-out shapes never appear."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from peftkit.apps.text_to_sql import compositions as comp
from peftkit.apps.text_to_sql import examples as sql_examples
from peftkit.apps.text_to_sql import sandbox, templates


def _table(name: str) -> comp.Table:
    return next(table for table in comp.TABLES if table.name == name)


def test_held_out_shapes_are_the_held_out_templates(examples: list[dict]) -> None:
    """Each held-out template's gold SQL is exactly what its declared shape composes, so excluding
    the shape excludes the template (a wrong shape here would leak it into training)."""
    assert set(comp.HELDOUT_SHAPES) == set(templates.HELDOUT_TEMPLATES)
    for example in (e for e in examples if e["split"] == "heldout"):
        table_name, select_name, filter_names = comp.HELDOUT_SHAPES[example["template"]]
        table = _table(table_name)
        select = next(s for s in table.selects if s.name == select_name)
        filters = tuple(f for f in table.filters if f.name in filter_names)
        # Recover the slot values from the gold SQL's quoted literals, in filter order.
        values = re.findall(r"'([^']*)'", example["sql"].replace("'%Y'", ""))
        assert comp.shape_sql(table, select, filters, tuple(values)) == example["sql"]


def test_composed_training_never_shows_a_held_out_shape(examples: list[dict]) -> None:
    composed = [e for e in examples if e["template"].startswith("composed:")]
    assert len(composed) > 400 and all(e["split"] == "train" for e in composed)
    shapes = {
        (table, select, frozenset(filters.split("+")))
        for _, table, select, filters in (e["template"].split(":") for e in composed)
    }
    assert not shapes & set(comp.HELDOUT_SHAPES.values())
    # But every held-out piece is trained: the select with other filters, each filter elsewhere.
    for table, select, filters in comp.HELDOUT_SHAPES.values():
        assert any(s[:2] == (table, select) for s in shapes)
        for name in filters:
            assert any(s[0] == table and name in s[2] and s[1] != select for s in shapes)


def test_composed_examples_are_informative_and_seeded(db: Path, examples: list[dict]) -> None:
    composed = [e for e in examples if e["template"].startswith("composed:")]
    for example in random.Random(0).sample(composed, 60):
        result = sandbox.run_query(db, example["sql"])
        assert result.ok and any(v not in (None, 0) for row in result.rows for v in row)
        assert "{" not in example["question"] and example["question"][-1] in ".?"
    per_shape = Counter(e["template"] for e in composed)
    assert max(per_shape.values()) == 2
    again = sql_examples.generate_examples(db, seed=0)
    assert [e["question"] for e in again] == [e["question"] for e in examples]
    assert sql_examples.generate_examples(db, seed=0, composed_per_shape=0) == [
        e for e in examples if not e["template"].startswith("composed:")
    ]


def test_question_phrasing_puts_each_filter_around_the_noun() -> None:
    table = _table("transactions")
    select = next(s for s in table.selects if s.name == "count")
    filters = tuple(f for f in table.filters if f.name in ("category", "amount_above"))
    questions = {
        comp.shape_question(table, select, filters, ("rent", 500), random.Random(seed))
        for seed in range(40)
    }
    assert any("rent transactions" in q for q in questions)
    assert any("in the rent category" in q for q in questions)
    assert all("500" in q and "transactions" in q for q in questions)
