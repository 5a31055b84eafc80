"""On-policy preference pairs for Text-to-SQL, BUILT offline from a tuned model's own samples.

For each training question (training templates only: the held-out templates are never asked),
the model samples `samples` queries; each is run in the read-only sandbox and scored on the test
suite (`scoring.evaluate`). A pair is

- chosen: a sampled query whose result equals the gold query's on every suite instance (the gold
  result set), or, when no sample has it, the gold query itself (`chosen_source: gold`);
- rejected: a sampled query that is wrong (another result on some instance) or invalid (refused,
  failed or timed out), its reason in `rejected_failure`.

A question whose samples are all right gives no pair (nothing to prefer), and is counted; an
empty sample is never a rejected response. The
rows are TRL's text format (prompt/chosen/rejected) plus their labels, written as JSONL beside a
report of how they were built; both are written whole or not at all.

    python -m peftkit.apps.text_to_sql.pairs RUN_FOLDER --output pairs.jsonl [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.errors import ConfigError
from peftkit.run_folder import run_and_adapter

Records = list[dict[str, Any]]


def label_samples(records: Records, samples: list[list[str]], suite: dict[str, Any]) -> Records:
    """Each record's samples scored on the suite: one list per record of {sql, right, failure}."""
    from peftkit.apps.text_to_sql.database import default_database
    from peftkit.apps.text_to_sql.scoring import evaluate

    flat = [(record, sql) for record, drawn in zip(records, samples, strict=True) for sql in drawn]
    scored = evaluate([r for r, _ in flat], [s for _, s in flat], default_database(), suite=suite)
    labelled, index = [], 0
    for drawn in samples:
        labelled.append(scored["records"][index : index + len(drawn)])
        index += len(drawn)
    return [
        [
            {"sql": s["predicted"], "right": bool(s["test_suite_match"]), "failure": s["failure"]}
            for s in row
        ]  # fmt: skip
        for row in labelled
    ]


def make_pair(record: dict[str, Any], labelled: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One question's pair from its labelled samples, or None when no sample is wrong (or every
    wrong one is empty)."""
    # An empty sample is wrong but no response to learn against (TRL's data needs one).
    wrong = [s for s in labelled if not s["right"] and s["sql"].strip()]
    if not wrong:
        return None
    right = [s for s in labelled if s["right"]]
    chosen, source = (right[0]["sql"], "sample") if right else (record["sql"], "gold")
    rejected = wrong[0]
    return {
        "prompt": record["prompt"], "chosen": chosen, "rejected": rejected["sql"],
        "chosen_source": source, "rejected_failure": rejected["failure"] or "wrong result",
        "template": record.get("template"), "id": record.get("id"), "sql": record["sql"],
        "samples_right": len(right), "samples": len(labelled),
    }  # fmt: skip


def sample_queries(
    model: nn.Module, tokenizer: Any, records: Records, samples: int, temperature: float,
    max_new_tokens: int, seed: int, batch_size: int,
) -> list[list[str]]:  # fmt: skip
    """`samples` queries per record's prompt, sampled at `temperature`, cut as app-eval cuts."""
    from peftkit.apps.evaluate import first_statement
    from peftkit.apps.text_to_sql.scoring import extract_sql
    from peftkit.decoding.generate import generate

    prompts = [record["prompt"] for record in records for _ in range(samples)]
    generated = generate(
        model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, do_sample=True,
        temperature=temperature, seed=seed, eos_token_id=tokenizer.eos_token_id,
        stop_strings=[";", "\n\n"],
    )  # fmt: skip
    queries = [first_statement(extract_sql(g.text)) for g in generated]
    return [queries[i * samples : (i + 1) * samples] for i in range(len(records))]


def build_pairs(
    model: nn.Module, tokenizer: Any, records: Records, samples: int = 4,
    temperature: float = 1.0, max_new_tokens: int = 96, seed: int = 0, batch_size: int = 16,
    suite: dict[str, Any] | None = None,
) -> tuple[Records, dict[str, Any]]:  # fmt: skip
    """(pairs, report) from the model's own samples on training records (never held-out ones)."""
    from peftkit.apps.text_to_sql.suite import default_suite

    if samples < 2:
        raise ConfigError(f"samples must be at least 2 (a pair needs a choice), got {samples}.")
    if temperature <= 0:
        raise ConfigError(f"temperature must be above 0 (pairs need samples), got {temperature}.")
    held_out = sorted({str(r.get("id")) for r in records if r.get("split") not in (None, "train")})
    if held_out:
        raise ConfigError(
            f"Pairs are built from training questions only; {len(held_out)} records are not "
            f"marked split 'train' (first: {held_out[0]}). Pass the training split."
        )
    drawn = sample_queries(model, tokenizer, records, samples, temperature, max_new_tokens,
                           seed, batch_size)  # fmt: skip
    labelled = label_samples(records, drawn, suite if suite is not None else default_suite())
    pairs = [p for r, s in zip(records, labelled, strict=True) if (p := make_pair(r, s))]
    flat = [s for row in labelled for s in row]
    report = {
        "questions": len(records), "samples_per_question": samples, "temperature": temperature,
        "max_new_tokens": max_new_tokens, "seed": seed, "pairs": len(pairs),
        "questions_all_right": sum(all(s["right"] for s in row) for row in labelled),
        "questions_without_pair": len(records) - len(pairs),
        "chosen_from_gold": sum(p["chosen_source"] == "gold" for p in pairs),
        "sample_right_rate": sum(s["right"] for s in flat) / max(1, len(flat)),
        "sample_failures": {
            reason: sum((s["failure"] or "") == reason for s in flat)
            for reason in sorted({s["failure"] for s in flat if s["failure"]})
        },
    }  # fmt: skip
    return pairs, report


def write_pairs(pairs: Records, report: dict[str, Any], output: Path) -> Path:
    """The pairs as JSONL and the report beside them (OUTPUT.report.json), each written whole."""
    from peftkit.io import write_json_atomically, write_text_atomically

    text = "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
    write_text_atomically(output, text)
    report_path = output.with_name(output.stem + ".report.json")
    write_json_atomically(report_path, report)
    return report_path


def main(argv: list[str] | None = None) -> int:
    """Sample a run's model on the training questions and write the pairs it makes."""
    parser = argparse.ArgumentParser(prog="python -m peftkit.apps.text_to_sql.pairs",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("run", help="a trained run folder (its recipe's model and adapter)")
    parser.add_argument("--output", required=True, type=Path, help="the pairs' JSONL file")
    parser.add_argument("--samples", type=int, default=4, help="queries sampled per question")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-questions", type=int, default=None,
                        help="a random subset of the training questions (seeded)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    if args.max_questions is not None and args.max_questions < 1:
        raise SystemExit(f"--max-questions must be at least 1, got {args.max_questions}.")
    if args.output.suffix != ".jsonl":
        raise SystemExit(f"--output must be a .jsonl file, got {args.output}.")

    import peftkit.api as api
    from peftkit.apps.text_to_sql.examples import bank_sql
    from peftkit.models import load_model
    from peftkit.recipe import load_recipe

    run_dir, adapter_dir = run_and_adapter(Path(args.run))
    recipe = load_recipe(run_dir / "recipe.yaml")
    train, _ = bank_sql()
    if args.max_questions is not None and args.max_questions < len(train):
        train = random.Random(args.seed).sample(train, args.max_questions)
    model, tokenizer = load_model(recipe.model, "causal-lm", seed=args.seed)
    model = api.load(model, adapter_dir)
    try:
        pairs, report = build_pairs(
            model, tokenizer, train, args.samples, args.temperature, args.max_new_tokens,
            args.seed, args.batch_size,
        )  # fmt: skip
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    report = {"built_from": {"run": str(run_dir), "model": recipe.model,
                             "data": "bank-sql training split (training templates only)"},
              "labelled": "BUILT: on-policy samples of the run's model, scored by execution",
              **report}  # fmt: skip
    report_path = write_pairs(pairs, report, args.output)
    print(f"{len(pairs)} pairs from {len(train)} questions -> {args.output} (report {report_path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
