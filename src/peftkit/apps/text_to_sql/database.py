"""The synthetic bank database: its schema, the seeded rows, and building the SQLite file.

No public Text-to-SQL set ships offline, so this one is built here and is SYNTHETIC: branches,
customers, accounts, transactions, cards and loans, a few thousand rows drawn from one seed.
The same seed always gives the same rows; `suite.py` adds edge rows for the test suite."""

from __future__ import annotations

import random
import re
import sqlite3
from datetime import date, timedelta
from pathlib import Path

from peftkit.apps.text_to_sql.sandbox import read_only
from peftkit.io import atomic_file
from peftkit.models.bundled import cache_dir

SCHEMA = {
    "branches": "CREATE TABLE branches (branch_id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
    "city TEXT NOT NULL, opened_year INTEGER NOT NULL)",
    "customers": "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, first_name TEXT NOT "
    "NULL, last_name TEXT NOT NULL, city TEXT NOT NULL, birth_year INTEGER NOT NULL, "
    "segment TEXT NOT NULL, branch_id INTEGER NOT NULL REFERENCES branches(branch_id), "
    "joined_date TEXT NOT NULL)",
    "accounts": "CREATE TABLE accounts (account_id INTEGER PRIMARY KEY, customer_id INTEGER NOT "
    "NULL REFERENCES customers(customer_id), account_type TEXT NOT NULL, currency TEXT NOT NULL, "
    "balance REAL NOT NULL, opened_date TEXT NOT NULL, status TEXT NOT NULL)",
    "transactions": "CREATE TABLE transactions (transaction_id INTEGER PRIMARY KEY, account_id "
    "INTEGER NOT NULL REFERENCES accounts(account_id), amount REAL NOT NULL, direction TEXT NOT "
    "NULL, category TEXT NOT NULL, merchant TEXT NOT NULL, transaction_date TEXT NOT NULL)",
    "cards": "CREATE TABLE cards (card_id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL "
    "REFERENCES accounts(account_id), network TEXT NOT NULL, card_type TEXT NOT NULL, "
    "credit_limit REAL, expiry_year INTEGER NOT NULL, is_active INTEGER NOT NULL)",
    "loans": "CREATE TABLE loans (loan_id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL "
    "REFERENCES customers(customer_id), principal REAL NOT NULL, interest_rate REAL NOT NULL, "
    "term_months INTEGER NOT NULL, start_date TEXT NOT NULL, status TEXT NOT NULL)",
}

CITIES = (
    "Lisbon", "Porto", "Madrid", "Lyon", "Milan", "Munich", "Vienna", "Prague", "Dublin", "Oslo",
)  # fmt: skip
FIRST_NAMES = (
    "Ana", "Ben", "Clara", "David", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Karin",
    "Luis", "Maya", "Nils", "Olga", "Pablo", "Rosa", "Sven", "Tara", "Umar", "Viktor", "Wim",
    "Yara", "Zoe",
)  # fmt: skip
LAST_NAMES = (
    "Almeida", "Berger", "Costa", "Dvorak", "Eriksen", "Fischer", "Garcia", "Horvat", "Ivanova",
    "Jansen", "Keller", "Lopez", "Moreau", "Novak", "Olsen", "Petit", "Rossi", "Silva", "Tanaka",
    "Weber",
)  # fmt: skip
SEGMENTS = ("retail", "premium", "business")
ACCOUNT_TYPES = ("checking", "savings", "brokerage")
CURRENCIES = ("EUR", "USD", "GBP")
ACCOUNT_STATUSES = ("open", "closed", "frozen")
MERCHANTS = {
    "groceries": ("FreshMart", "GreenGrocer", "DailyFoods"),
    "rent": ("CityHomes", "UrbanLets"),
    "salary": ("Acme Corp", "Globex", "Initech"),
    "travel": ("SkyJet", "RailEuropa", "StayWell Hotels"),
    "utilities": ("PowerGrid", "AquaNet", "FiberLink"),
    "dining": ("Luigi's", "Sushi Bar", "Cafe Central"),
    "transfer": ("Own Transfer",),
    "entertainment": ("CinemaMax", "StreamFlix", "ConcertHall"),
}
CATEGORIES = tuple(MERCHANTS)
NETWORKS = ("visa", "mastercard", "amex")
LOAN_STATUSES = ("active", "repaid", "defaulted")


def _weighted(rng: random.Random, choices: tuple[str, ...], weights: tuple[float, ...]) -> str:
    """One seeded weighted choice."""
    return rng.choices(choices, weights=weights, k=1)[0]


def _day(rng: random.Random, first: date, last: date) -> str:
    """A seeded ISO date between two dates."""
    return (first + timedelta(days=rng.randrange((last - first).days + 1))).isoformat()


def _people(rng: random.Random) -> tuple[list[tuple], list[tuple]]:
    """Branch and customer rows."""
    branches = [
        (i + 1, f"{city} {rng.choice(('Central', 'Harbour', 'Old Town', 'North'))}", city,
         rng.randrange(1950, 2021))
        for i, city in enumerate(CITIES)
    ]  # fmt: skip
    customers = []
    for customer_id in range(1, 501):
        branch = rng.choice(branches)
        customers.append((
            customer_id, rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), branch[2],
            rng.randrange(1940, 2006), _weighted(rng, SEGMENTS, (0.7, 0.2, 0.1)), branch[0],
            _day(rng, date(2010, 1, 1), date(2024, 12, 31)),
        ))  # fmt: skip
    return branches, customers


def _money(rng: random.Random, customers: list[tuple]) -> tuple[list[tuple], ...]:
    """Account, transaction, card and loan rows."""
    accounts, transactions, cards, loans = [], [], [], []
    for customer in customers:
        for _ in range(rng.choice((1, 1, 2, 2, 3))):
            balance = round(rng.lognormvariate(8.5, 1.2), 2)
            accounts.append((
                len(accounts) + 1, customer[0], _weighted(rng, ACCOUNT_TYPES, (0.6, 0.3, 0.1)),
                _weighted(rng, CURRENCIES, (0.8, 0.12, 0.08)), balance,
                _day(rng, date(2015, 1, 1), date(2024, 12, 31)),
                _weighted(rng, ACCOUNT_STATUSES, (0.85, 0.1, 0.05)),
            ))  # fmt: skip
    for transaction_id in range(1, 3001):
        account = rng.choice(accounts)
        category = rng.choice(CATEGORIES)
        direction = "credit" if category == "salary" else "debit"
        if category == "transfer":
            direction = rng.choice(("credit", "debit"))
        scale = {"salary": 3000, "rent": 1200, "travel": 400}.get(category, 60)
        transactions.append((
            transaction_id, account[0], round(rng.uniform(0.2, 2.0) * scale, 2), direction,
            category, rng.choice(MERCHANTS[category]),
            _day(rng, date(2023, 1, 1), date(2024, 12, 31)),
        ))  # fmt: skip
    for account in accounts:
        if account[2] == "checking" and rng.random() < 0.7:
            card_type = rng.choice(("debit", "credit"))
            limit = float(rng.randrange(2, 41) * 500) if card_type == "credit" else None
            cards.append((
                len(cards) + 1, account[0], _weighted(rng, NETWORKS, (0.5, 0.35, 0.15)), card_type,
                limit, rng.randrange(2025, 2031), int(rng.random() < 0.85),
            ))  # fmt: skip
    for customer in rng.sample(customers, 150):
        loans.append((
            len(loans) + 1, customer[0], float(rng.randrange(5, 301) * 1000),
            round(rng.uniform(2.5, 9.5), 2), rng.choice((12, 24, 36, 60, 120, 240, 360)),
            _day(rng, date(2012, 1, 1), date(2024, 12, 31)),
            _weighted(rng, LOAN_STATUSES, (0.6, 0.33, 0.07)),
        ))  # fmt: skip
    return accounts, transactions, cards, loans


def seeded_tables(seed: int) -> dict[str, list[tuple]]:
    """Every table's rows, in SCHEMA's column order, drawn from one seed."""
    rng = random.Random(seed)
    branches, customers = _people(rng)
    return dict(zip(SCHEMA, (branches, customers, *_money(rng, customers)), strict=True))


def write_database(path: str | Path, tables: dict[str, list[tuple]]) -> Path:
    """Write the schema and these rows to a new SQLite file at path (replacing it), atomically."""
    # Atomic: a killed build never leaves a half-filled database (an empty file is a new one).
    with atomic_file(path) as staging:
        connection = sqlite3.connect(staging)
        try:
            for name, create in SCHEMA.items():
                connection.execute(create)
                rows = tables[name]
                if rows:
                    marks = ", ".join("?" * len(rows[0]))
                    connection.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
            connection.commit()
        finally:
            connection.close()
    return path


def build_database(path: str | Path, seed: int = 0) -> Path:
    """Create the synthetic banking database at path (replacing it); same seed, same rows."""
    return write_database(path, seeded_tables(seed))


def default_database(seed: int = 0) -> Path:
    """The bundled database in peftkit's cache folder, built on first use."""
    path = cache_dir() / "text-to-sql" / f"bank-seed{seed}.db"
    return path if path.is_file() else build_database(path, seed=seed)


def render_schema(db_path: str | Path | None = None) -> str:
    """The CREATE statements, one compact line per table, for the prompt."""
    if db_path is None:
        statements = list(SCHEMA.values())
    else:
        with read_only(db_path) as connection:
            statements = [
                sql
                for (sql,) in connection.execute(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' ORDER BY rowid"
                )
            ]
    compact = [re.sub(r"\s+", " ", statement).strip() + ";" for statement in statements]
    return "\n".join(compact)
