"""The test suite of databases behind test-suite execution accuracy (Zhong et al., 2020).

A prediction counts as right only if its result equals the gold query's on every instance: the
seed-0 database the questions were generated from, and databases from six other seeds with edge
rows. Other seeds change every count and sum, so a different query that returned the same number
by coincidence on seed 0 stops agreeing; the edge rows are values the seeded generator never
writes but the schema allows, so a filter that every seed-0 row passes stops being harmless:

- zero and negative balances of every account type (`AND balance > 0` is no longer always true);
- one category with no transactions at all, and a zero-amount transaction;
- amounts the generator never gives a category: a refund (a credit) at every shop
  (`AND direction = 'debit'` is no longer harmless), a small salary, a large credit that is not
  a salary, a large spending debit;
- customers without accounts, three of them namesakes of a customer in the same segment and city
  (duplicate rows: `SELECT DISTINCT` is no longer the same as the gold query);
- rows exactly on every threshold the questions use (balance, amount, rate, birth year): `>`
  and `>=` part;
- on every network a credit card with no limit (NULL: `credit_limit` is NULL-able), and a debit
  card and an inactive credit card with limits above every generated one.

Ties under ORDER BY are left out on purpose: with tied rows the gold order itself is arbitrary and
a right query could be marked wrong. A gold query whose answer is empty or zero on some instance
is still judged there (as Zhong et al. keep such databases): the prediction must then be empty or
zero too, and seed 0, where every gold answer is informative by construction, keeps an empty
prediction from passing. `evaluate` reports per instance how many gold answers are uninformative.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from peftkit.apps.text_to_sql.database import (
    ACCOUNT_STATUSES,
    ACCOUNT_TYPES,
    CATEGORIES,
    CITIES,
    CURRENCIES,
    FIRST_NAMES,
    LAST_NAMES,
    MERCHANTS,
    NETWORKS,
    SEGMENTS,
    default_database,
    seeded_tables,
    write_database,
)
from peftkit.apps.text_to_sql.templates import SLOT_VALUES
from peftkit.models.bundled import cache_dir

# Raise when the edge rows change, so cached instances of an older definition are not reused.
EDGE_ROWS_VERSION = 1
Tables = dict[str, list[tuple]]


@dataclass(frozen=True)
class Instance:
    """One database of the suite: a seed, with or without edge rows."""

    seed: int
    edge_rows: bool

    @property
    def name(self) -> str:
        """seed0, seed3-edge, ...: the key of this instance in reports."""
        return f"seed{self.seed}" + ("-edge" if self.edge_rows else "")


SUITE: tuple[Instance, ...] = (Instance(0, False), *(Instance(s, True) for s in range(1, 7)))


def _day(rng: random.Random) -> str:
    """A seeded ISO date inside the transactions' two years."""
    return (date(2023, 1, 1) + timedelta(days=rng.randrange(731))).isoformat()


def _edge_customers(tables: Tables, rng: random.Random) -> list[tuple]:
    """Customers without accounts: three namesakes of a customer in the same segment and city,
    and one born in each threshold year the questions use."""
    customers = list(tables["customers"])
    people = [(twin[1], twin[2], twin[3], twin[4], twin[5]) for twin in rng.sample(customers, 3)]
    people += [
        (rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(CITIES), born,
         rng.choice(SEGMENTS))
        for born in SLOT_VALUES["birth_year"]
    ]  # fmt: skip
    branch_of = {row[2]: row[0] for row in tables["branches"]}  # one branch per city
    for first, last, city, born, segment in people:
        customers.append(
            (len(customers) + 1, first, last, city, born, segment, branch_of[city], _day(rng))
        )
    return customers


def _edge_accounts(tables: Tables, rng: random.Random) -> list[tuple]:
    """A zero and a negative balance of every account type; a balance on each threshold."""
    accounts = list(tables["accounts"])
    owners = [row[0] for row in tables["customers"]]
    balances = [(kind, b) for kind in ACCOUNT_TYPES for b in (0.0, -round(rng.uniform(5, 900), 2))]
    balances += [(rng.choice(ACCOUNT_TYPES), float(b)) for b in SLOT_VALUES["balance"]]
    for account_type, balance in balances:
        accounts.append((
            len(accounts) + 1, rng.choice(owners), account_type, rng.choice(CURRENCIES), balance,
            _day(rng), rng.choice(ACCOUNT_STATUSES),
        ))  # fmt: skip
    return accounts


def _edge_transactions(tables: Tables, accounts: list[tuple], rng: random.Random) -> list[tuple]:
    """One category emptied; amounts the generator never gives a category; an amount on each
    threshold (see the module docstring)."""
    emptied = rng.choice(CATEGORIES)
    kept = [c for c in CATEGORIES if c != emptied]
    spending = [c for c in kept if c not in ("salary", "transfer")]
    # (amount, direction, category, merchant); the generator's salaries are 600-6,000 credits,
    # other credits are transfers of at most 120, and spending is a debit.
    new = [(round(rng.uniform(5, 80), 2), "credit", c, m) for c in spending for m in MERCHANTS[c]]
    new += [(0.0, "debit", rng.choice(kept), None)]
    new += [(round(rng.uniform(1000, 3000), 2), "credit", rng.choice(spending), None)]
    new += [(round(rng.uniform(3000, 6000), 2), "debit", rng.choice(spending), None)]
    if "salary" in kept:
        new += [(round(rng.uniform(20, 90), 2), "credit", "salary", None)]
    new += [(float(a), "debit", rng.choice(kept), None) for a in SLOT_VALUES["amount"]]
    transactions = [row for row in tables["transactions"] if row[4] != emptied]
    first_id = max(row[0] for row in tables["transactions"]) + 1
    for number, (amount, direction, category, merchant) in enumerate(new):
        transactions.append((
            first_id + number, rng.choice(accounts)[0], amount, direction, category,
            merchant or rng.choice(MERCHANTS[category]), _day(rng),
        ))  # fmt: skip
    return transactions


def _edge_cards_and_loans(
    tables: Tables, accounts: list[tuple], rng: random.Random
) -> tuple[list[tuple], list[tuple]]:
    """On every network a credit card with no limit, and a debit card and an inactive credit card
    with limits above every generated one; a loan rate on each threshold."""
    cards, loans = list(tables["cards"]), list(tables["loans"])
    checking = [row[0] for row in accounts if row[2] == "checking"]
    # Generated limits stop at 20,000, so nearly any set of credit cards has 20,000 as its
    # largest limit; limits drawn above that make MAX and AVG of credit_limit depend on the card
    # type, the activity and the network.
    for network in NETWORKS:
        for card_type, limit, active in (
            ("credit", None, 1),
            ("debit", rng.randrange(41, 61) * 500.0, 1),
            ("credit", rng.randrange(41, 61) * 500.0, 0),
        ):
            cards.append((
                len(cards) + 1, rng.choice(checking), network, card_type, limit,
                rng.randrange(2025, 2031), active,
            ))  # fmt: skip
    owners = [row[0] for row in tables["customers"]]
    for rate in SLOT_VALUES["rate"]:
        loans.append((
            len(loans) + 1, rng.choice(owners), float(rng.randrange(5, 301) * 1000), float(rate),
            rng.choice((12, 24, 36, 60)), _day(rng), rng.choice(("active", "repaid")),
        ))  # fmt: skip
    return cards, loans


def with_edge_rows(tables: Tables, seed: int) -> Tables:
    """The seeded tables with the edge rows of the module docstring (new rows take the next ids)."""
    rng = random.Random(f"{seed}:edge-rows")
    customers = _edge_customers(tables, rng)
    accounts = _edge_accounts(tables, rng)
    transactions = _edge_transactions(tables, accounts, rng)
    cards, loans = _edge_cards_and_loans(tables, accounts, rng)
    return {
        **tables, "customers": customers, "accounts": accounts, "transactions": transactions,
        "cards": cards, "loans": loans,
    }  # fmt: skip


def build_instance(path: str | Path, seed: int, edge_rows: bool = False) -> Path:
    """Write one instance of the suite at path (replacing it); same arguments, same rows."""
    tables = seeded_tables(seed)
    return write_database(path, with_edge_rows(tables, seed) if edge_rows else tables)


def build_suite(folder: str | Path, instances: tuple[Instance, ...] = SUITE) -> dict[str, Path]:
    """Every instance as a file in folder: name -> path, in the suite's order."""
    folder = Path(folder)
    return {
        instance.name: build_instance(
            folder / f"bank-{instance.name}.db", instance.seed, instance.edge_rows
        )
        for instance in instances
    }


def default_suite() -> dict[str, Path]:
    """The suite in peftkit's cache folder, each instance built on first use; seed 0 without
    edge rows is the bundled database itself."""
    folder = cache_dir() / "text-to-sql" / f"suite-v{EDGE_ROWS_VERSION}"
    paths = {}
    for instance in SUITE:
        if instance == Instance(0, False):
            paths[instance.name] = default_database(0)
            continue
        path = folder / f"bank-{instance.name}.db"
        if not path.is_file():
            build_instance(path, instance.seed, instance.edge_rows)
        paths[instance.name] = path
    return paths
