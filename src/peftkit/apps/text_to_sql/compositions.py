"""Composed training questions for the Text-to-SQL set: one select and up to two filters a query.

The hand-written templates give 23 training shapes of three paraphrases each; a small model tuned
on them learns a question-to-template lookup and, asked a held-out shape, writes the nearest
training query (see docs/applications.md). Composition teaches the pieces instead: each table
has selects (COUNT, SUM, AVG, MAX, listed columns) and filters (equality, thresholds, a year),
each filter has phrasings, and a question is a select's frame around a noun phrase built from
its filters, so every select is seen with many filters and every filter with many selects.

The held-out templates' shapes (`HELDOUT_SHAPES`) are never composed: a held-out question
recombines a select and filters that training shows, but never together. Questions are built
from these fixed phrasings, and the held-out templates' hand-written paraphrases share much of
their wording, so a score measures recombination within this grammar, not open-domain SQL."""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from peftkit.apps.text_to_sql.database import (
    ACCOUNT_STATUSES,
    ACCOUNT_TYPES,
    CATEGORIES,
    CITIES,
    CURRENCIES,
    LOAN_STATUSES,
    NETWORKS,
    SEGMENTS,
)
from peftkit.apps.text_to_sql.templates import SLOT_VALUES, YEARS, is_informative, quote_value


@dataclass(frozen=True)
class Filter:
    """One WHERE condition with its values and how a question says it around the noun."""

    name: str
    sql: str  # with {v}
    values: tuple[Any, ...]
    before: tuple[str, ...] = ()  # adjectives: "{v} customers"
    after: tuple[str, ...] = ()  # phrases after the noun: "customers in {v}"
    column: str = ""  # filters on one column never combine (set when two share it)


@dataclass(frozen=True)
class Select:
    """What a query returns and the question frames that ask for it ({np}: the noun phrase)."""

    name: str
    sql: str
    frames: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table's noun, its selects and its filters (in the order SQL and adjectives take)."""

    name: str
    noun: str
    selects: tuple[Select, ...]
    filters: tuple[Filter, ...]


COUNT = Select(
    "count",
    "COUNT(*)",
    ("How many {np} are there?", "Count the {np}.", "What is the number of {np}?"),
)


def _aggregate(name: str, sql: str, what: str) -> Select:
    """SUM/AVG/MAX of one column, asked three ways."""
    frames = {
        "SUM": (
            f"What is the total {what} of all {{np}}?",
            f"Sum the {what} of {{np}}.",
            f"Give the total {what} of {{np}}.",
        ),
        "AVG": (
            f"What is the average {what} of {{np}}?",
            f"Give the mean {what} of {{np}}.",
            f"On average, what is the {what} of {{np}}?",
        ),
        "MAX": (
            f"What is the highest {what} among {{np}}?",
            f"Give the largest {what} of {{np}}.",
            f"What is the maximum {what} of {{np}}?",
        ),
    }[sql.split("(")[0]]
    return Select(name, sql, frames)


def _listing(name: str, sql: str, what: str) -> Select:
    """Listed columns, asked three ways."""
    return Select(
        name,
        sql,
        (f"List the {what} of {{np}}.", f"Which {{np}} are there? Give the {what}.",
         f"Show the {what} of {{np}}."),
    )  # fmt: skip


TABLES: tuple[Table, ...] = (
    Table("customers", "customers", (
        COUNT,
        Select("names", "first_name, last_name", (
            "List the first and last names of {np}.", "Who are the {np}?",
            "Give the names of {np}.")),
        _aggregate("avg_birth_year", "AVG(birth_year)", "birth year"),
    ), (
        Filter("segment", "segment = '{v}'", SEGMENTS, ("{v}",), ("in the {v} segment",)),
        Filter("city", "city = '{v}'", CITIES, (), ("in {v}", "from {v}", "living in {v}")),
        Filter("born_before", "birth_year < {v}", (1950, 1960, 1970, 1980), (),
               ("born before {v}",), column="birth_year"),
        Filter("born_after", "birth_year > {v}", (1970, 1980, 1990), (), ("born after {v}",),
               column="birth_year"),
        Filter("joined_year", "strftime('%Y', joined_date) = '{v}'",
               tuple(str(y) for y in range(2012, 2025)), (), ("who joined in {v}",)),
    )),
    Table("accounts", "accounts", (
        COUNT,
        _aggregate("total_balance", "SUM(balance)", "balance"),
        _aggregate("avg_balance", "AVG(balance)", "balance"),
        _aggregate("max_balance", "MAX(balance)", "balance"),
        _listing("ids", "account_id", "account ids"),
    ), (
        Filter("status", "status = '{v}'", ACCOUNT_STATUSES, ("{v}",),
               ("with status {v}", "whose status is {v}")),
        Filter("account_type", "account_type = '{v}'", ACCOUNT_TYPES, ("{v}",)),
        Filter("currency", "currency = '{v}'", CURRENCIES, (),
               ("held in {v}", "in {v}", "denominated in {v}")),
        Filter("balance_above", "balance > {v}", (1000, 5000, 10000, 50000), (),
               ("with a balance above {v}", "holding more than {v}")),
        Filter("opened_year", "strftime('%Y', opened_date) = '{v}'",
               tuple(str(y) for y in range(2016, 2025)), (), ("opened in {v}",)),
    )),
    Table("transactions", "transactions", (
        COUNT,
        _aggregate("total_amount", "SUM(amount)", "amount"),
        _aggregate("avg_amount", "AVG(amount)", "amount"),
        _aggregate("max_amount", "MAX(amount)", "amount"),
        _listing("ids", "transaction_id, amount", "ids and amounts"),
    ), (
        Filter("direction", "direction = '{v}'", ("debit", "credit"), ("{v}",)),
        Filter("category", "category = '{v}'", CATEGORIES, ("{v}",),
               ("in the {v} category",)),
        Filter("merchant", "merchant = '{v}'", SLOT_VALUES["merchant"], (),
               ("with {v}", "at {v}")),
        Filter("amount_above", "amount > {v}", (100, 250, 500, 1000, 2500), (),
               ("over {v}", "larger than {v}")),
        Filter("year", "strftime('%Y', transaction_date) = '{v}'", YEARS, (),
               ("made in {v}", "in {v}", "during {v}")),
    )),
    Table("loans", "loans", (
        COUNT,
        _aggregate("total_principal", "SUM(principal)", "principal"),
        _aggregate("avg_principal", "AVG(principal)", "principal"),
        _aggregate("avg_rate", "AVG(interest_rate)", "interest rate"),
        _listing("ids", "loan_id", "loan ids"),
    ), (
        Filter("status", "status = '{v}'", LOAN_STATUSES, ("{v}",), ("with status {v}",)),
        Filter("rate_above", "interest_rate > {v}", (4, 5, 6, 7, 8), (),
               ("with an interest rate above {v} percent", "charging more than {v}% interest")),
        Filter("term", "term_months = {v}", (12, 24, 36, 60, 120, 240, 360), (),
               ("with a term of {v} months",)),
        Filter("start_year", "strftime('%Y', start_date) = '{v}'",
               tuple(str(y) for y in range(2012, 2025)), (), ("started in {v}",)),
    )),
    Table("cards", "cards", (
        COUNT,
        _aggregate("avg_limit", "AVG(credit_limit)", "credit limit"),
        _aggregate("max_limit", "MAX(credit_limit)", "credit limit"),
        _listing("ids", "card_id", "card ids"),
    ), (
        Filter("active", "is_active = {v}", (1,), ("active",)),
        Filter("network", "network = '{v}'", NETWORKS, ("{v}",), ("on the {v} network",)),
        Filter("card_type", "card_type = '{v}'", ("debit", "credit"), ("{v}",)),
        Filter("expiry", "expiry_year = {v}", (2025, 2026, 2027, 2028, 2029, 2030), (),
               ("expiring in {v}", "that expire in {v}")),
    )),
)  # fmt: skip

# The shape of each held-out template (table, select, filters): never composed for training.
HELDOUT_SHAPES: dict[str, tuple[str, str, frozenset[str]]] = {
    "names_segment_city": ("customers", "names", frozenset({"segment", "city"})),
    "total_balance_type": ("accounts", "total_balance", frozenset({"account_type"})),
    "count_transactions_category_year": ("transactions", "count", frozenset({"category", "year"})),
    "count_loans_status": ("loans", "count", frozenset({"status"})),
}


def shapes(table: Table) -> list[tuple[Select, tuple[Filter, ...]]]:
    """Every select with every set of one or two filters (never two on one column)."""
    filter_sets = [(f,) for f in table.filters] + [
        pair
        for pair in combinations(table.filters, 2)
        if not (pair[0].column and pair[0].column == pair[1].column)
    ]
    return [(select, filters) for select in table.selects for filters in filter_sets]


def shape_key(table: Table, select: Select, filters: tuple[Filter, ...]) -> tuple:
    """The (table, select, filter names) a shape is known by."""
    return (table.name, select.name, frozenset(f.name for f in filters))


def shape_sql(table: Table, select: Select, filters: tuple[Filter, ...], fill: tuple) -> str:
    """The gold SQL of a shape for one value per filter (filters in the table's order)."""
    where = " AND ".join(
        f.sql.format(v=quote_value(value)) for f, value in zip(filters, fill, strict=True)
    )
    return f"SELECT {select.sql} FROM {table.name} WHERE {where}"


def shape_question(
    table: Table, select: Select, filters: tuple[Filter, ...], fill: tuple, rng: random.Random
) -> str:
    """One phrasing: a frame of the select around adjectives, the noun and phrases after it."""
    adjectives, phrases = [], []
    for f, value in zip(filters, fill, strict=True):
        # A filter with both forms takes either; after-phrases come in a random order.
        forms = [(adjectives, p) for p in f.before] + [(phrases, p) for p in f.after]
        where, form = rng.choice(forms)
        where.append(form.format(v=value))
    rng.shuffle(phrases)
    noun_phrase = " ".join([*adjectives, table.noun, *phrases])
    return rng.choice(select.frames).format(np=noun_phrase)


def composed_examples(
    connection: sqlite3.Connection, per_shape: int, seed: int, skip_sql: set[str]
) -> list[dict[str, Any]]:
    """Training examples from every shape but the held-out ones: per_shape fillings each, one
    phrasing per filling, only fillings whose gold answer is informative and not in skip_sql."""
    held_out = set(HELDOUT_SHAPES.values())
    examples = []
    for table in TABLES:
        for select, filters in shapes(table):
            key = shape_key(table, select, filters)
            if key in held_out:
                continue
            name = f"composed:{table.name}:{select.name}:{'+'.join(f.name for f in filters)}"
            rng = random.Random(f"{seed}:{name}")
            fills = sorted({tuple(rng.choice(f.values) for f in filters) for _ in range(40)})
            rng.shuffle(fills)
            kept = 0
            for fill in fills:
                sql = shape_sql(table, select, filters, fill)
                if sql in skip_sql or not is_informative(connection.execute(sql).fetchall()):
                    continue
                examples.append({
                    "id": f"{name}-{kept}",
                    "template": name,
                    "question": shape_question(table, select, filters, fill, rng),
                    "sql": sql,
                    "split": "train",
                })  # fmt: skip
                kept += 1
                if kept == per_shape:
                    break
    return examples
