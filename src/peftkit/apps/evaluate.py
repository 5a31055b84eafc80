"""Generation-based evaluation of the applications, for a base model and the same model tuned.

- `sql`: greedy SQL from each held-out prompt, run in the sandbox; execution accuracy on the
  seed-0 database, test-suite accuracy on the suite of databases, and exact match
  (`peftkit.apps.text_to_sql.scoring.evaluate`); refused or failing SQL is a recorded failure.
- `tabular`: the probability of each label word after the prompt (summed token log-probabilities,
  normalised over the classes), scored as accuracy and AUC, uncalibrated and calibrated on the
  training rows and content-free inputs, beside logistic regression (`tabular_evaluation`).
- `instructions`: greedy answers through the chat template, stopped by the template's end-of-turn
  token; the share of prompts whose answer ends with that token within the token budget.

`evaluate_app` runs one of them on records from a bundled set or files (the run's recipe says
which) and returns metrics plus one record per example."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from peftkit.apps.tabular_evaluation import evaluate_tabular, tabular_label_words
from peftkit.decoding.generate import generate
from peftkit.errors import ConfigError, DataError
from peftkit.tasks.chat import end_of_turn_token_id, prompt_and_answer
from peftkit.tasks.conversations import to_messages

APPS = ("sql", "tabular", "instructions")
# The metrics each application's summary line shows.
HEADLINE = {
    "sql": ("execution_accuracy", "test_suite_accuracy", "exact_match"),
    "tabular": (
        "accuracy",
        "auc",
        "accuracy_contextual",
        "accuracy_threshold",
        "logistic_accuracy",
    ),
    "instructions": ("eos_stop_rate", "mean_new_tokens", "exact_answer"),
}
Records = list[dict[str, Any]]


# --- Text-to-SQL ------------------------------------------------------------------------------


def first_statement(sql: str) -> str:
    """The query up to its first ';' outside string literals, or its first blank line.

    A model that goes on after its query ("...;\\n\\nQuestion: ...") is scored on the query it
    wrote, for base and tuned models alike."""
    sql = sql.split("\n\n", 1)[0]
    inside = False
    for index, char in enumerate(sql):
        if char == "'":
            inside = not inside
        elif char == ";" and not inside:
            return sql[:index].strip()
    return sql.strip()


def evaluate_sql(
    model: nn.Module, tokenizer: Any, records: Records, db_path: Any = None,
    max_new_tokens: int = 96, batch_size: int = 16, suite: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Execution accuracy (db_path, default: the seed-0 database), test-suite accuracy (suite,
    default: the bundled suite) and exact match of greedy SQL on prompt/sql records."""
    from peftkit.apps.text_to_sql.database import default_database
    from peftkit.apps.text_to_sql.scoring import evaluate, extract_sql
    from peftkit.apps.text_to_sql.suite import default_suite

    for index, record in enumerate(records):
        if "prompt" not in record or "sql" not in record:
            raise DataError(
                f"SQL record {index} needs 'prompt' and 'sql' (gold query) fields; it has "
                f"{sorted(record)}."
            )
    db_path = db_path if db_path is not None else default_database()
    suite = suite if suite is not None else default_suite()
    # A query ends at ';' or a blank line (first_statement cuts there anyway): stopping there
    # spares a rambling base model's budget without changing any score.
    generated = generate(
        model, tokenizer, [r["prompt"] for r in records], max_new_tokens,
        batch_size=batch_size, eos_token_id=tokenizer.eos_token_id, stop_strings=[";", "\n\n"],
    )  # fmt: skip
    predictions = [first_statement(extract_sql(g.text)) for g in generated]
    result = evaluate(records, predictions, db_path, suite=suite)
    for record, g in zip(result["records"], generated, strict=True):
        record["generated"] = g.text
    return result


# --- instructions -----------------------------------------------------------------------------


def evaluate_instructions(
    model: nn.Module, tokenizer: Any, records: Records, max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict[str, Any]:  # fmt: skip
    """Share of held-out prompts whose greedy answer ends with the end-of-turn token."""
    pairs = [
        prompt_and_answer(to_messages(record, f"held-out row {index}"), tokenizer)
        for index, record in enumerate(records)
    ]
    generated = generate(
        model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens,
        batch_size=batch_size, eos_token_id=end_of_turn_token_id(tokenizer),
        add_special_tokens=False,
    )  # fmt: skip
    stopped = [g.stopped for g in generated]
    per_example = [
        {"prompt": prompt, "reference": answer, "generated": g.text, "stopped": g.stopped,
         "new_tokens": g.new_tokens}
        for (prompt, answer), g in zip(pairs, generated, strict=True)
    ]  # fmt: skip
    exact = [
        _fold(g.text) == _fold(answer) for (_, answer), g in zip(pairs, generated, strict=True)
    ]
    return {
        "count": len(records),
        "eos_stop_rate": sum(stopped) / max(1, len(stopped)),
        "mean_new_tokens": sum(g.new_tokens for g in generated) / max(1, len(generated)),
        "exact_answer": sum(exact) / max(1, len(exact)),
        "max_new_tokens": max_new_tokens,
        "records": per_example,
    }


def _fold(text: str) -> str:
    """Text compared loosely: case-folded, single spaces."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def evaluate_app(
    app: str, model: nn.Module, tokenizer: Any, records: Records, max_new_tokens: int | None = None,
    batch_size: int = 16, train_records: Records | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One application's metrics on records (see the module docstring); train_records are the
    run's training rows, which only `tabular` reads (to fit its calibration threshold)."""
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "sql": lambda: evaluate_sql(
            model, tokenizer, records, max_new_tokens=max_new_tokens or 96, batch_size=batch_size
        ),
        "tabular": lambda: evaluate_tabular(
            model,
            tokenizer,
            records,
            tabular_label_words(records),
            batch_size=batch_size,
            train_records=train_records,
        ),
        "instructions": lambda: evaluate_instructions(
            model, tokenizer, records, max_new_tokens=max_new_tokens or 64, batch_size=batch_size
        ),
    }
    if app not in runners:
        raise ConfigError(f"Unknown application '{app}'; use one of: {', '.join(APPS)}.")
    if not records:
        raise DataError("No held-out records to evaluate.")
    return runners[app]()
