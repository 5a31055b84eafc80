"""Merging two LoRAs trained on different tasks (issue 19, part 3): every combination scored on
both tasks' held-out data.

Sources: two SmolLM2-135M runs, Text-to-SQL (recipes/app-sql-smollm2-lora.yaml) and instruction
chat (recipes/app-chat-smollm2-lora.yaml at rank 16, so that every combination applies). Each
row is one model: the base, each source alone, each combination (lora_compose.combine, PEFT's
add_weighted_adapter), folded into a copy of the base for speed. Per task it reports the held-out
loss (the task type's own evaluation, as `peftkit combine` does), and the application metric:
SQL test-suite accuracy (greedy, `peftkit app-eval --app sql`'s function) and the chat stop
rate (share of held-out prompts answered with <|im_end|> within 48 tokens, on the first N). Kept
share = (row - base) / (source alone - base) on the source's own task; a row keeping less than
1 - max_loss of any of the four gains is flagged.

A few rows per process, so each locked call stays short; rows accumulate in the JSON:

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/combine_experiment.py --row base sql
    ... --row chat task_arithmetic, ...   (--list prints the rows)
    .venv/bin/python benchmarks/combine_experiment.py --table     # the table from the JSON
    .venv/bin/python benchmarks/combine_experiment.py --smoke     # the table, into a temp JSON

--smoke rebuilds the table from the committed JSON into a temporary copy and evaluates no row:
every row needs the two trained SmolLM2 runs (SOURCE_COMMANDS) and minutes of decoding, so the
smoke run says so instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import add_smoke_flag, machine, markdown_table, parse_with_smoke  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# label -> (how, weights, density): the combinations, all of the two sources.
ROWS: dict[str, tuple[str, list[float], float | None]] = {
    "task_arithmetic": ("task_arithmetic", [1.0, 1.0], None),
    "task_arithmetic-half": ("task_arithmetic", [0.5, 0.5], None),
    "cat": ("cat", [1.0, 1.0], None),
    "linear": ("linear", [1.0, 1.0], None),
    "svd": ("svd", [1.0, 1.0], None),
    "ties_svd": ("ties_svd", [1.0, 1.0], 0.5),
    "ties": ("ties", [1.0, 1.0], 0.5),
    "dare_linear_svd": ("dare_linear_svd", [1.0, 1.0], 0.5),
    "dare_linear": ("dare_linear", [1.0, 1.0], 0.5),
    "dare_ties_svd": ("dare_ties_svd", [1.0, 1.0], 0.5),
    "dare_ties": ("dare_ties", [1.0, 1.0], 0.5),
}
TASKS = ("sql", "chat")
# How the two source runs were trained (each its own locked call).
SOURCE_COMMANDS = {
    "sql": "peftkit train recipes/app-sql-smollm2-lora.yaml --output-dir runs/combine/sql",
    "chat": "peftkit train recipes/app-chat-smollm2-lora.yaml --set method.rank=16 "
    "--set method.alpha=32 --output-dir runs/combine/chat",
}
APP_METRIC = {"sql": "test_suite_accuracy", "chat": "eos_stop_rate"}


def evaluate_row(args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Build the row's model and score it on both tasks."""
    import torch

    from peftkit.apps import register
    from peftkit.apps.evaluate import evaluate_instructions, evaluate_sql
    from peftkit.combine import load_sources, read_sources, score, task_data
    from peftkit.methods.lora import compose
    from peftkit.tasks.types import split_rows

    register()  # the runs' data sets are the applications' (the command line registers them)
    torch.set_num_threads(args.threads)
    sources = read_sources([f"sql={args.sql}", f"chat={args.chat}"])
    model, tokenizer = load_sources(sources)
    if label in ROWS:
        how, weights, density = ROWS[label]
        torch.manual_seed(0)  # DARE's random drops
        compose.combine(model, list(TASKS), weights, label, how=how, density=density)
    if label == "base":
        plain = model.unload()
    else:
        plain = compose.merge_adapter(model, label)
    row: dict[str, Any] = {"label": label, "recipe": ROWS.get(label)}
    for source in sources:
        start = time.perf_counter()
        data = task_data(source, tokenizer, None)
        metrics = score(plain, source, data, tokenizer)
        _, records = split_rows(source.recipe.task)
        if source.name == "sql":
            app = evaluate_sql(plain, tokenizer, records, batch_size=16)
        else:
            app = evaluate_instructions(
                plain, tokenizer, records[: args.chat_prompts], max_new_tokens=48, batch_size=32
            )
        row[source.name] = {
            "eval_loss": metrics["eval_loss"],
            APP_METRIC[source.name]: app[APP_METRIC[source.name]],
            "app_count": app["count"],
            "seconds": time.perf_counter() - start,
        }
        print(f"{label} on {source.name}: {row[source.name]}", flush=True)
    return row


def kept(row: float, base: float, own: float) -> float | None:
    """Share of the source adapter's gain over the base the row keeps."""
    return None if own == base else (row - base) / (own - base)


def summarise(results: dict[str, Any], max_loss: float) -> tuple[str, dict[str, list[str]]]:
    """The Markdown table and the flags."""
    rows = results["rows"]
    header = ["model"]
    for task in TASKS:
        header += [f"{task} loss", f"{task} {APP_METRIC[task]}", f"{task} kept (loss / app)"]
    header.append("flag")
    body, flagged = [], {}
    for label, row in rows.items():
        cells, lost = [label], []
        for task in TASKS:
            shares = []
            for metric in ("eval_loss", APP_METRIC[task]):
                share = kept(row[task][metric], rows["base"][task][metric],
                             rows[task][task][metric])  # fmt: skip
                shares.append(share)
                if label not in ("base", *TASKS) and share is not None and share < 1 - max_loss:
                    lost.append(f"{task} {metric}")
            cells += [f"{row[task]['eval_loss']:.3f}", f"{row[task][APP_METRIC[task]]:.3f}",
                      " / ".join("-" if s is None else f"{s:.2f}" for s in shares)]  # fmt: skip
        if lost:
            flagged[label] = lost
        cells.append("loses " + ", ".join(lost) if lost else "")
        body.append(cells)
    return markdown_table(header, body), flagged


def main() -> int:
    """Evaluate one row, or print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sql", default="runs/combine/sql", help="the Text-to-SQL run folder")
    parser.add_argument("--chat", default="runs/combine/chat", help="the chat run folder")
    parser.add_argument(
        "--row", nargs="+", help="base, sql, chat, or combinations (--list); each in turn"
    )
    parser.add_argument("--list", action="store_true", help="print the rows")
    parser.add_argument("--table", action="store_true", help="print the table from the JSON")
    parser.add_argument("--chat-prompts", type=int, default=96, help="chat prompts generated")
    parser.add_argument("--max-loss", type=float, default=0.1, help="flag below 1 - this share")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/results/combine-smollm2.json")
    add_smoke_flag(parser)
    args = parse_with_smoke(parser, row=None, table=True)
    if args.smoke:
        committed = Path(parser.get_default("output"))
        committed = committed if committed.is_absolute() else ROOT / committed
        Path(args.output).write_text(committed.read_text())
        print("smoke: no row evaluated (each needs the trained runs of SOURCE_COMMANDS and "
              "minutes of decoding); the table is rebuilt from the committed JSON")  # fmt: skip
    labels = ["base", *TASKS, *ROWS]
    if args.list:
        print("\n".join(labels))
        return 0
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {"rows": {}}
    for label in args.row or []:
        if label not in labels:
            parser.error(f"--row must be one of: {', '.join(labels)}")
    for label in args.row or []:  # written after each row, so a stopped call keeps what it did
        results["rows"][label] = evaluate_row(args, label)
        results["settings"] = {
            "sql_run": args.sql, "chat_run": args.chat, "source_commands": SOURCE_COMMANDS,
            "chat_prompts": args.chat_prompts,
            "threads": args.threads, "rows": {k: list(v) for k, v in ROWS.items()},
            "machine": machine(),
        }  # fmt: skip
        order = [name for name in labels if name in results["rows"]]
        results["rows"] = {name: results["rows"][name] for name in order}
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
    if args.table or not args.row:
        missing = [label for label in ("base", *TASKS) if label not in results["rows"]]
        if missing:
            print(f"rows still missing for the table: {missing}")
            return 1
        table, flagged = summarise(results, args.max_loss)
        results["table"], results["flagged"], results["max_loss"] = table, flagged, args.max_loss
        if args.smoke:
            results["smoke"] = "rows not evaluated: they need the trained runs (SOURCE_COMMANDS)"
            results["machine"] = machine()
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
