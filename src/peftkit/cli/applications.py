"""`peftkit app-eval`: an application's held-out set scored by generation, base vs tuned; and
the applications' data sets made known to every command (`register_apps`).

The one module outside `peftkit.apps` that imports it (tests/test_layers.py holds the rest of the
core to that)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peftkit.cli.common import check_positive
from peftkit.io import write_json_atomically
from peftkit.run_folder import run_and_adapter


def cmd_app_eval(args: argparse.Namespace) -> int:
    """Score an application's held-out set by generation: the untuned base, then the tuned run."""
    import peftkit.api as api
    from peftkit.apps.evaluate import HEADLINE, evaluate_app
    from peftkit.models import load_model
    from peftkit.recipe import load_recipe
    from peftkit.tasks.types import split_rows

    # The numbers first: a bad one should not cost a model load.
    check_positive("--max-new-tokens", args.max_new_tokens)
    check_positive("--batch-size", args.batch_size)
    check_positive("--max-examples", args.max_examples)
    run_dir, adapter_dir = run_and_adapter(Path(args.run))
    # Every held-out row unless --max-examples: a recipe's max_eval_examples only bounds the
    # training-time loss check.
    limit = f"task.max_eval_examples={args.max_examples or 'null'}"
    recipe = load_recipe(run_dir / "recipe.yaml", [*(args.set or []), limit])
    # The training rows too: tabular calibration fits its threshold on them (never on held-out).
    if args.dataset is None:
        train_records, records = split_rows(recipe.task)
    else:  # a run trained on other rows (DPO pairs) scored on the application's own questions
        from peftkit.data.bundled import load_bundled

        train_records, records = load_bundled(args.dataset)
        records = records[: args.max_examples] if args.max_examples else records
    model, tokenizer = load_model(recipe.model, recipe.task.type, seed=recipe.training.seed)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "train_records": train_records,
    }
    results = {}
    if not args.skip_base:
        results["base"] = evaluate_app(args.app, model, tokenizer, records, **options)
    results["tuned"] = evaluate_app(
        args.app, api.load(model, adapter_dir), tokenizer, records, **options
    )
    for name, result in results.items():
        shown = [m for m in HEADLINE[args.app] if result.get(m) is not None]
        values = ", ".join(f"{m} {result[m]:.4f}" for m in shown)
        failures = f", failures {result['failures']}" if result.get("failures") else ""
        print(f"{name:>6} ({result['count']} examples): {values}{failures}")
    output = run_dir / f"app_eval_{args.app}.json"
    report = {"app": args.app, "run": str(run_dir), "dataset": args.dataset, **results}
    from peftkit.run_folder import record_entries

    record_entries(run_dir, [output.name])  # the run's own from now on (unless the user's)
    write_json_atomically(output, report)
    print(f"wrote {output}")
    return 0


def register_apps() -> None:
    """Add the applications' bundled data sets to the core's, so recipes can name them."""
    import peftkit.apps

    peftkit.apps.register()


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""

    app_eval = commands.add_parser(
        "app-eval", help="score an application run (sql, tabular, instructions), base vs tuned"
    )
    app_eval.add_argument("run", help="a run folder of an application recipe (recipes/app-*)")
    app_eval.add_argument("--app", required=True, choices=["sql", "tabular", "instructions"])
    app_eval.add_argument("--max-new-tokens", type=int, help="default: 96 (sql), 64 (chat)")
    app_eval.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    app_eval.add_argument("--skip-base", action="store_true", help="score the tuned model only")
    app_eval.add_argument("--max-examples", type=int, help="score the first N held-out rows")
    app_eval.add_argument(
        "--dataset",
        help="score a bundled set's held-out rows instead of the recipe's data (e.g. bank-sql "
        "for a preference run trained on SQL pairs)",
    )
    app_eval.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override")
    app_eval.set_defaults(handler=cmd_app_eval)
