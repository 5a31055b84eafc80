"""The hand-written question templates: SQL with slots, three paraphrases each, slot values.

Whole templates are held out for evaluation (`HELDOUT_TEMPLATES`), so a score measures
generalisation to new question shapes, not recall of seen ones."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from peftkit.apps.text_to_sql.database import (
    ACCOUNT_STATUSES,
    ACCOUNT_TYPES,
    CATEGORIES,
    CITIES,
    CURRENCIES,
    LOAN_STATUSES,
    MERCHANTS,
    NETWORKS,
    SEGMENTS,
)


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

# Held out whole. Each is built only from pieces training shows (every function, table, column
# and filter shape occurs in some training template) in a combination it never shows, so a score
# measures recombination, not recall; a template whose function or column training never shows
# (AVG, currency, expiry_year, ...) could only be guessed, and stays in training.
HELDOUT_TEMPLATES = (
    "names_segment_city",  # names (customers_born_before), segment and city filters (others)
    "total_balance_type",  # SUM(balance) (total_balance_city), account_type (rich_accounts_type)
    "count_transactions_category_year",  # COUNT(*), category, year filter (spend_per_category_year)
    "count_loans_status",  # COUNT(*) over loans, a status filter (count_accounts_status_currency)
)


def quote_value(value: Any) -> str:
    """A slot value as it goes into SQL: strings are quoted by the template, so escape quotes."""
    return str(value).replace("'", "''")


def is_informative(rows: list[tuple]) -> bool:
    """Whether a gold result can tell right from wrong (not empty, not only NULL or zero)."""
    return bool(rows) and any(value not in (None, 0) for row in rows for value in row)


def slot_fillings(template: Template, rng: random.Random, count: int) -> list[dict[str, Any]]:
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
