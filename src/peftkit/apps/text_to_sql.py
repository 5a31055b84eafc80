"""Text-to-SQL over a synthetic banking database: build it, ask it, run predictions safely, score.

No public Text-to-SQL set ships offline, so this one is built here and is SYNTHETIC: a seeded
SQLite database (branches, customers, accounts, transactions, cards, loans; a few thousand rows)
and questions generated from templates with slot values and several paraphrases each. Whole
templates are held out for evaluation, so a score measures generalisation to new question shapes,
not recall of seen ones.

Predicted SQL runs in a sandbox: a read-only connection (`mode=ro`, `PRAGMA query_only`), an
authorizer that allows only reads, one statement only, a wall-clock limit through the progress
handler, and caps on result rows and value sizes. Anything refused or failing becomes a recorded
failure with its reason, never an exception that loses the run."""

from __future__ import annotations

import hashlib
import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from peftkit.errors import DataError

# --- the database -----------------------------------------------------------------------------

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
    "Luis", "Maya", "Nils", "Olga", "Pablo", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wim",
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


def build_database(path: str | Path, seed: int = 0) -> Path:
    """Create the synthetic banking database at path (replacing it); same seed, same rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    branches, customers = _people(rng)
    tables = dict(zip(SCHEMA, (branches, customers, *_money(rng, customers)), strict=True))
    staging = path.with_name(f".{path.name}.building")
    staging.unlink(missing_ok=True)
    connection = sqlite3.connect(staging)
    try:
        for name, create in SCHEMA.items():
            connection.execute(create)
            rows = tables[name]
            marks = ", ".join("?" * len(rows[0]))
            connection.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
        connection.commit()
    finally:
        connection.close()
    staging.replace(path)  # atomic: a killed build never leaves a half-filled database
    return path


def render_schema(db_path: str | Path | None = None) -> str:
    """The CREATE statements, one compact line per table, for the prompt."""
    if db_path is None:
        statements = list(SCHEMA.values())
    else:
        with _read_only(db_path) as connection:
            statements = [
                sql
                for (sql,) in connection.execute(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' ORDER BY rowid"
                )
            ]
    compact = [re.sub(r"\s+", " ", statement).strip() + ";" for statement in statements]
    return "\n".join(compact)


def sql_prompt(question: str, schema: str) -> str:
    """The prompt a model completes with one SQLite query."""
    return (
        f"Database schema (SQLite):\n{schema}\n\n"
        f"Question: {question}\nWrite one SQLite SELECT query that answers the question.\nSQL:"
    )


# --- the question set -------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One question shape: SQL with {slots}, the paraphrases that ask it, and slot values."""

    name: str
    sql: str
    paraphrases: tuple[str, ...]
    slots: dict[str, tuple[Any, ...]] = field(default_factory=dict)


YEARS = ("2023", "2024")
SLOT_VALUES: dict[str, tuple[Any, ...]] = {
    "city": CITIES,
    "segment": SEGMENTS,
    "account_type": ACCOUNT_TYPES,
    "currency": CURRENCIES,
    "account_status": ACCOUNT_STATUSES,
    "category": CATEGORIES,
    "debit_category": tuple(c for c in CATEGORIES if c not in ("salary", "transfer")),
    "merchant": tuple(m for names in MERCHANTS.values() for m in names),
    "network": NETWORKS,
    "loan_status": LOAN_STATUSES,
    "year": YEARS,
    "opened_year": tuple(str(y) for y in range(2016, 2025)),
    "n": (3, 5, 10),
    "amount": (100, 250, 500, 1000, 2500),
    "rate": (4, 5, 6, 7, 8),
    "birth_year": (1950, 1960, 1970, 1980),
    "branch_year": (1970, 1980, 1990, 2000, 2010),
    "expiry_year": (2025, 2026, 2027, 2028, 2029, 2030),
    "balance": (1000, 5000, 10000, 50000),
}


def _t(name: str, sql: str, *paraphrases: str, slots: tuple[str, ...] = ()) -> Template:
    """A template whose slots take their values from SLOT_VALUES."""
    return Template(name, sql, paraphrases, {slot: SLOT_VALUES[slot] for slot in slots})


TEMPLATES: tuple[Template, ...] = (
    _t("count_customers_city",
       "SELECT COUNT(*) FROM customers WHERE city = '{city}'",
       "How many customers live in {city}?", "Count the customers based in {city}.",
       "What is the number of customers from {city}?", slots=("city",)),
    _t("names_segment_city",
       "SELECT first_name, last_name FROM customers WHERE segment = '{segment}' "
       "AND city = '{city}'",
       "List the first and last names of {segment} customers in {city}.",
       "Who are the {segment} customers living in {city}?",
       "Give the names of customers in the {segment} segment from {city}.",
       slots=("segment", "city")),
    _t("total_balance_type",
       "SELECT SUM(balance) FROM accounts WHERE account_type = '{account_type}'",
       "What is the total balance of all {account_type} accounts?",
       "Sum the balances of {account_type} accounts.",
       "How much money is held in {account_type} accounts in total?", slots=("account_type",)),
    _t("avg_balance_currency",
       "SELECT AVG(balance) FROM accounts WHERE currency = '{currency}'",
       "What is the average balance of accounts held in {currency}?",
       "Give the mean balance of {currency} accounts.",
       "On average, how much is in an account denominated in {currency}?", slots=("currency",)),
    _t("top_accounts_balance",
       "SELECT account_id, balance FROM accounts ORDER BY balance DESC LIMIT {n}",
       "Which {n} accounts have the highest balance?",
       "Show the top {n} accounts by balance with their balances.",
       "List the {n} richest accounts and their balances.", slots=("n",)),
    _t("count_transactions_category_year",
       "SELECT COUNT(*) FROM transactions WHERE category = '{category}' "
       "AND strftime('%Y', transaction_date) = '{year}'",
       "How many {category} transactions were made in {year}?",
       "Count the transactions in the {category} category during {year}.",
       "What number of {category} transactions happened in {year}?",
       slots=("category", "year")),
    _t("spend_per_category_year",
       "SELECT category, SUM(amount) FROM transactions WHERE direction = 'debit' "
       "AND strftime('%Y', transaction_date) = '{year}' GROUP BY category",
       "How much was spent in each category in {year}?",
       "Total the debit amounts per category for {year}.",
       "For {year}, what is the spending by category?", slots=("year",)),
    _t("large_transactions_category",
       "SELECT transaction_id, amount FROM transactions WHERE category = '{category}' "
       "AND amount > {amount}",
       "List the {category} transactions over {amount}.",
       "Which transactions in the {category} category exceed {amount}? Give ids and amounts.",
       "Show ids and amounts of {category} transactions larger than {amount}.",
       slots=("category", "amount")),
    _t("customers_per_branch",
       "SELECT b.name, COUNT(c.customer_id) FROM branches b JOIN customers c "
       "ON c.branch_id = b.branch_id GROUP BY b.branch_id",
       "How many customers does each branch have?",
       "Count the customers of every branch, by branch name.",
       "For each branch, give its name and number of customers."),
    _t("total_balance_city",
       "SELECT SUM(a.balance) FROM accounts a JOIN customers c ON a.customer_id = c.customer_id "
       "WHERE c.city = '{city}'",
       "What is the total balance of all accounts owned by customers in {city}?",
       "Sum the account balances of customers living in {city}.",
       "How much money do customers from {city} hold across their accounts?", slots=("city",)),
    _t("count_active_cards_network",
       "SELECT COUNT(*) FROM cards WHERE network = '{network}' AND is_active = 1",
       "How many active {network} cards are there?",
       "Count the {network} cards that are currently active.",
       "What is the number of active cards on the {network} network?", slots=("network",)),
    _t("avg_credit_limit_network",
       "SELECT AVG(credit_limit) FROM cards WHERE network = '{network}' AND card_type = 'credit'",
       "What is the average credit limit of {network} credit cards?",
       "Give the mean limit of credit cards on the {network} network.",
       "On average, how high is the limit of a {network} credit card?", slots=("network",)),
    _t("count_loans_status",
       "SELECT COUNT(*) FROM loans WHERE status = '{loan_status}'",
       "How many loans are {loan_status}?", "Count the {loan_status} loans.",
       "What is the number of loans with status {loan_status}?", slots=("loan_status",)),
    _t("loans_rate_above",
       "SELECT loan_id, interest_rate FROM loans WHERE interest_rate > {rate}",
       "List the loans with an interest rate above {rate} percent.",
       "Which loans charge more than {rate}% interest? Give ids and rates.",
       "Show loan ids and rates for loans whose rate exceeds {rate}.", slots=("rate",)),
    _t("avg_principal_segment",
       "SELECT AVG(l.principal) FROM loans l JOIN customers c ON l.customer_id = c.customer_id "
       "WHERE c.segment = '{segment}'",
       "What is the average loan principal for {segment} customers?",
       "Give the mean principal of loans taken by {segment} customers.",
       "On average, how large are the loans of customers in the {segment} segment?",
       slots=("segment",)),
    _t("customers_born_before",
       "SELECT first_name, last_name FROM customers WHERE birth_year < {birth_year}",
       "Which customers were born before {birth_year}?",
       "List the names of customers born earlier than {birth_year}.",
       "Give first and last names of customers with a birth year before {birth_year}.",
       slots=("birth_year",)),
    _t("count_accounts_opened_year",
       "SELECT COUNT(*) FROM accounts WHERE strftime('%Y', opened_date) = '{opened_year}'",
       "How many accounts were opened in {opened_year}?",
       "Count the accounts opened during {opened_year}.",
       "What number of accounts date from {opened_year}?", slots=("opened_year",)),
    _t("count_accounts_status_currency",
       "SELECT COUNT(*) FROM accounts WHERE status = '{account_status}' "
       "AND currency = '{currency}'",
       "How many {account_status} accounts are there in {currency}?",
       "Count the {currency} accounts whose status is {account_status}.",
       "What is the number of {account_status} accounts held in {currency}?",
       slots=("account_status", "currency")),
    _t("top_spenders_category",
       "SELECT c.first_name, c.last_name, SUM(t.amount) AS spent FROM customers c "
       "JOIN accounts a ON a.customer_id = c.customer_id JOIN transactions t "
       "ON t.account_id = a.account_id WHERE t.category = '{debit_category}' "
       "AND t.direction = 'debit' GROUP BY c.customer_id ORDER BY spent DESC LIMIT {n}",
       "Who are the {n} customers who spent the most on {debit_category}?",
       "Name the top {n} customers by {debit_category} spending, with the amount spent.",
       "Which {n} customers paid the most for {debit_category}, and how much?",
       slots=("debit_category", "n")),
    _t("transactions_per_month",
       "SELECT strftime('%m', transaction_date) AS month, COUNT(*) FROM transactions "
       "WHERE strftime('%Y', transaction_date) = '{year}' GROUP BY month ORDER BY month",
       "How many transactions happened in each month of {year}?",
       "Count the transactions per month in {year}, in month order.",
       "Give the monthly number of transactions for {year}.", slots=("year",)),
    _t("branches_opened_before",
       "SELECT name FROM branches WHERE opened_year < {branch_year}",
       "Which branches opened before {branch_year}?",
       "List the names of branches founded earlier than {branch_year}.",
       "Name the branches that have been open since before {branch_year}.",
       slots=("branch_year",)),
    _t("customers_without_loans_city",
       "SELECT COUNT(*) FROM customers WHERE city = '{city}' "
       "AND customer_id NOT IN (SELECT customer_id FROM loans)",
       "How many customers in {city} have no loan?",
       "Count the customers from {city} who have never taken a loan.",
       "What number of {city} customers hold no loans?", slots=("city",)),
    _t("max_payment_merchant",
       "SELECT MAX(amount) FROM transactions WHERE merchant = '{merchant}'",
       "What was the largest single transaction with {merchant}?",
       "Give the highest transaction amount at {merchant}.",
       "What is the biggest amount ever paid in one transaction with {merchant}?",
       slots=("merchant",)),
    _t("accounts_per_type_segment",
       "SELECT a.account_type, COUNT(*) FROM accounts a JOIN customers c "
       "ON a.customer_id = c.customer_id WHERE c.segment = '{segment}' GROUP BY a.account_type",
       "How many accounts of each type do {segment} customers hold?",
       "Count the accounts of {segment} customers per account type.",
       "For {segment} customers, give the number of accounts by type.", slots=("segment",)),
    _t("salary_city_year",
       "SELECT SUM(t.amount) FROM transactions t JOIN accounts a ON t.account_id = a.account_id "
       "JOIN customers c ON a.customer_id = c.customer_id WHERE t.category = 'salary' "
       "AND c.city = '{city}' AND strftime('%Y', t.transaction_date) = '{year}'",
       "How much salary was paid to customers in {city} in {year}?",
       "Sum the salary transactions of customers from {city} during {year}.",
       "What total salary did {city} customers receive in {year}?", slots=("city", "year")),
    _t("count_cards_expiring",
       "SELECT COUNT(*) FROM cards WHERE expiry_year = {expiry_year}",
       "How many cards expire in {expiry_year}?",
       "Count the cards with an expiry year of {expiry_year}.",
       "What number of cards run out in {expiry_year}?", slots=("expiry_year",)),
    _t("rich_accounts_type",
       "SELECT account_id FROM accounts WHERE account_type = '{account_type}' "
       "AND balance > {balance}",
       "Which {account_type} accounts hold more than {balance}?",
       "List the ids of {account_type} accounts with a balance above {balance}.",
       "Give the {account_type} accounts whose balance exceeds {balance}.",
       slots=("account_type", "balance")),
)  # fmt: skip

# Held out whole: each reuses pieces seen in training (AVG, joins on customers, two filters,
# COUNT with an equality) in a combination never seen, so a score measures generalisation.
# Held-out templates are new questions built from pieces that training does show (each function,
# table, column and filter shape occurs in some training template), so a score measures
# recombination, not recall; a template whose function or column training never shows (AVG,
# currency, expiry_year, ...) could only be guessed, and stays in training.
HELDOUT_TEMPLATES = (
    "names_segment_city",  # names (customers_born_before), segment and city filters (others)
    "total_balance_type",  # SUM(balance) (total_balance_city), account_type (rich_accounts_type)
    "count_transactions_category_year",  # COUNT(*), category, year filter (spend_per_category_year)
    "count_loans_status",  # COUNT(*) over loans, a status filter (count_accounts_status_currency)
)


def _quote(value: Any) -> str:
    """A slot value as it goes into SQL: strings are quoted by the template, so escape quotes."""
    return str(value).replace("'", "''")


def _informative(rows: list[tuple]) -> bool:
    """Whether a gold result can tell right from wrong (not empty, not only NULL or zero)."""
    return bool(rows) and any(value not in (None, 0) for row in rows for value in row)


def _fills(template: Template, rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Up to count distinct slot fillings of a template, in a seeded order."""
    if not template.slots:
        return [{}]
    seen: list[dict[str, Any]] = []
    for _ in range(count * 20):
        fill = {slot: rng.choice(values) for slot, values in template.slots.items()}
        if fill not in seen:
            seen.append(fill)
        if len(seen) == count:
            break
    return seen


# --- the sandbox ------------------------------------------------------------------------------

_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
_ALLOWED_ACTIONS.add(getattr(sqlite3, "SQLITE_RECURSIVE", 33))  # WITH RECURSIVE (time-limited)
_ACTION_NAMES = {
    getattr(sqlite3, name): name.removeprefix("SQLITE_")
    for name in (
        "SQLITE_ALTER_TABLE", "SQLITE_ANALYZE", "SQLITE_ATTACH", "SQLITE_CREATE_INDEX",
        "SQLITE_CREATE_TABLE", "SQLITE_CREATE_TEMP_INDEX", "SQLITE_CREATE_TEMP_TABLE",
        "SQLITE_CREATE_TEMP_TRIGGER", "SQLITE_CREATE_TEMP_VIEW", "SQLITE_CREATE_TRIGGER",
        "SQLITE_CREATE_VIEW", "SQLITE_CREATE_VTABLE", "SQLITE_DELETE", "SQLITE_DETACH",
        "SQLITE_DROP_INDEX", "SQLITE_DROP_TABLE", "SQLITE_DROP_TEMP_INDEX",
        "SQLITE_DROP_TEMP_TABLE", "SQLITE_DROP_TEMP_TRIGGER", "SQLITE_DROP_TEMP_VIEW",
        "SQLITE_DROP_TRIGGER", "SQLITE_DROP_VIEW", "SQLITE_DROP_VTABLE", "SQLITE_INSERT",
        "SQLITE_PRAGMA", "SQLITE_REINDEX", "SQLITE_SAVEPOINT", "SQLITE_TRANSACTION",
        "SQLITE_UPDATE",
    )
}  # fmt: skip
_DENIED_FUNCTIONS = {"load_extension"}
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)*", re.DOTALL)


@dataclass
class QueryResult:
    """What a query returned, or why it did not: failure is None on success."""

    rows: list[tuple] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    failure: str | None = None  # "refused" | "timeout" | "too_large" | "error"
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the query ran to completion."""
        return self.failure is None


@contextmanager
def _read_only(db_path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection (the file cannot change through it), always closed after."""
    path = Path(db_path)
    if not path.is_file():
        raise DataError(f"Database {path} does not exist; build it with build_database().")
    # as_uri() percent-encodes the path, so odd file names cannot inject URI parameters.
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        yield connection
    finally:
        connection.close()


def _first_keyword(sql: str) -> str:
    """The first word of a query after leading whitespace and comments, lower-cased."""
    rest = _LEADING_COMMENTS.sub("", sql, count=1)
    match = re.match(r"[A-Za-z]+", rest)
    return match.group(0).lower() if match else ""


def _guard(connection: sqlite3.Connection, denied: list[str], deadline: list[float]) -> None:
    """Install the authorizer (reads only) and the progress handler (wall-clock limit)."""

    def authorize(action: int, arg1: Any, arg2: Any, database: Any, trigger: Any) -> int:
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _DENIED_FUNCTIONS:
            denied.append(f"function {arg2}")
            return sqlite3.SQLITE_DENY
        if action in _ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        denied.append(_ACTION_NAMES.get(action, f"action {action}"))
        return sqlite3.SQLITE_DENY

    connection.set_authorizer(authorize)
    connection.set_progress_handler(lambda: int(time.monotonic() > deadline[0]), 1000)


def run_query(
    db_path: str | Path, sql: str, timeout_s: float = 2.0, max_rows: int = 10_000
) -> QueryResult:
    """Run one untrusted SELECT read-only, with a time limit; failures are returned, not raised."""
    if not isinstance(sql, str) or not sql.strip():
        return QueryResult(failure="refused", message="empty query")
    if _first_keyword(sql) not in ("select", "with"):
        return QueryResult(failure="refused", message="only a single SELECT query is allowed")
    if not Path(db_path).is_file():  # a setup mistake, not a bad prediction: raise
        raise DataError(f"Database {db_path} does not exist; build it with build_database().")
    denied: list[str] = []
    deadline = [float("inf")]
    try:
        with _read_only(db_path) as connection:
            connection.execute("PRAGMA query_only = ON")  # before the authorizer forbids pragmas
            connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)  # no giant blobs
            _guard(connection, denied, deadline)
            deadline[0] = time.monotonic() + timeout_s
            cursor = connection.execute(sql)
            rows = cursor.fetchmany(max_rows + 1)
            columns = [item[0] for item in cursor.description or []]
    except sqlite3.Warning as error:  # Python's "one statement at a time"
        return QueryResult(failure="refused", message=f"more than one statement ({error})")
    except sqlite3.Error as error:
        text = str(error)
        if denied:
            return QueryResult(failure="refused", message=f"not a read: {', '.join(denied)}")
        if "interrupted" in text and time.monotonic() > deadline[0]:
            return QueryResult(failure="timeout", message=f"ran longer than {timeout_s} s")
        if "one statement at a time" in text:
            return QueryResult(failure="refused", message=f"more than one statement ({text})")
        return QueryResult(failure="error", message=text)
    except (OverflowError, ValueError, MemoryError) as error:
        return QueryResult(failure="error", message=f"{type(error).__name__}: {error}")
    if len(rows) > max_rows:
        return QueryResult(failure="too_large", message=f"more than {max_rows} rows")
    return QueryResult(rows=rows, columns=columns)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, to prove a database was left unchanged."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- metrics ----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"'(?:[^']|'')*'"  # string literal (kept as written)
    r'|"(?:[^"]|"")*"'  # quoted identifier
    r"|\d+\.\d*|\.\d+|\d+"  # number
    r"|[A-Za-z_][A-Za-z_0-9]*"  # word
    r"|<=|>=|<>|!=|==|\|\||\S"  # operator or punctuation
)


def normalize_sql(sql: str) -> str:
    """SQL as tokens: case-folded outside string literals, single spaces, no trailing ';'."""
    tokens = []
    for token in _TOKEN.findall(sql.strip().rstrip(";").strip()):
        if token.startswith("'"):
            tokens.append(token)
        elif token.startswith('"'):
            tokens.append(token[1:-1].replace('""', '"').lower())
        else:
            tokens.append(token.lower())
    return " ".join(tokens).replace("!=", "<>").replace("==", "=")


def exact_match(predicted: str, gold: str) -> bool:
    """Whether two queries are the same after normalisation (a strict, string-level score)."""
    return normalize_sql(predicted) == normalize_sql(gold)


def has_top_level_order_by(sql: str) -> bool:
    """Whether the outermost query sorts its result (then row order is part of the answer)."""
    depth = 0
    tokens = normalize_sql(sql).split(" ")
    for index, token in enumerate(tokens):
        depth += (token == "(") - (token == ")")
        if depth == 0 and token == "order" and tokens[index + 1 : index + 2] == ["by"]:
            return True
    return False


def _cell(value: Any) -> Any:
    """A result value made comparable: whole floats as ints, other floats to 10 significant digits.

    Summation order changes the last bits of a float SUM or AVG, so exact float equality would
    fail queries that are right."""
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        return float(f"{value:.10g}")
    return value


def _columns_permutations(gold: list[tuple], predicted: list[tuple]) -> list[tuple[int, ...]]:
    """Column orders of the prediction whose column contents match the gold's, column by column."""
    width = len(gold[0]) if gold else 0
    gold_columns = [Counter(row[i] for row in gold) for i in range(width)]
    predicted_columns = [Counter(row[i] for row in predicted) for i in range(width)]
    options = [[j for j in range(width) if predicted_columns[j] == g] for g in gold_columns]
    orders: list[tuple[int, ...]] = [()]
    for choices in options:
        orders = [order + (j,) for order in orders for j in choices if j not in order][:1000]
    return orders


def results_match(predicted: list[tuple], gold: list[tuple], ordered: bool) -> bool:
    """Whether two result sets are the same answer.

    Rows compare as multisets (duplicates count) unless ordered; columns may come in any order,
    as the question fixes which values are asked for, not their order."""
    predicted = [tuple(_cell(v) for v in row) for row in predicted]
    gold = [tuple(_cell(v) for v in row) for row in gold]
    if len(predicted) != len(gold):
        return False
    if not gold:
        return True
    if len(predicted[0]) != len(gold[0]):
        return False
    for order in _columns_permutations(gold, predicted):
        moved = [tuple(row[j] for j in order) for row in predicted]
        if ordered and moved == gold:
            return True
        if not ordered and Counter(moved) == Counter(gold):
            return True
    return False


def extract_sql(generated: str) -> str:
    """The query inside a model's answer: drops code fences and a leading 'SQL:' label."""
    text = generated.strip()
    fence = re.search(r"```(?:sql)?\s*(.*?)(```|$)", text, re.DOTALL | re.IGNORECASE)
    if fence:
        text = fence.group(1).strip()
    return re.sub(r"^sql:\s*", "", text, flags=re.IGNORECASE).strip()


def evaluate(
    examples: list[dict[str, Any]], predictions: list[str], db_path: str | Path,
    timeout_s: float = 2.0,
) -> dict[str, Any]:  # fmt: skip
    """Execution accuracy and exact match of predicted SQL, with every failure and its reason."""
    if len(examples) != len(predictions):
        raise DataError(
            f"{len(predictions)} predictions for {len(examples)} examples; give one per example."
        )
    gold_cache: dict[str, QueryResult] = {}
    records = []
    for example, predicted in zip(examples, predictions, strict=True):
        gold_sql = example["sql"]
        if gold_sql not in gold_cache:
            gold_cache[gold_sql] = run_query(db_path, gold_sql, timeout_s=timeout_s)
        gold = gold_cache[gold_sql]
        if not gold.ok:
            raise DataError(f"Gold SQL of {example.get('id')} fails ({gold.message}): {gold_sql}")
        result = run_query(db_path, predicted, timeout_s=timeout_s)
        correct = result.ok and results_match(
            result.rows, gold.rows, has_top_level_order_by(gold_sql)
        )
        records.append({
            "id": example.get("id"), "template": example.get("template"),
            "question": example.get("question"), "gold": gold_sql, "predicted": predicted,
            "execution_match": correct, "exact_match": exact_match(predicted, gold_sql),
            "failure": result.failure, "message": result.message,
        })  # fmt: skip
    count = len(records)
    return {
        "count": count,
        "execution_accuracy": sum(r["execution_match"] for r in records) / count if count else 0.0,
        "exact_match": sum(r["exact_match"] for r in records) / count if count else 0.0,
        "failures": dict(Counter(r["failure"] for r in records if r["failure"])),
        "records": records,
    }
