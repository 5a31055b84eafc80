"""The `peftkit` command line. Heavy libraries are imported inside each command, so `--help` is
instant (no torch import on that path)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set pairs plus the convenience flags, as override strings."""
    overrides = list(args.set or [])
    if getattr(args, "model", None):
        overrides.append(f"model={args.model}")
    if getattr(args, "method", None):
        overrides.append(f"method.name={args.method}")
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe and print its summary table."""
    from peftkit.recipe import load_recipe
    from peftkit.train import run

    recipe = load_recipe(args.recipe, _overrides(args))
    run(recipe)
    return 0


def _run_folder(path: Path) -> tuple[Path, Path]:
    """(run folder, adapter folder) from either of the two."""
    if (path / "adapter").is_dir():
        return path, path / "adapter"
    return path.parent, path


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained adapter on its recipe's held-out data."""
    import peftkit.api as api
    from peftkit.data.tokenize import Collator
    from peftkit.recipe import load_recipe
    from peftkit.train import evaluate, load_for_recipe

    run_dir, adapter_dir = _run_folder(Path(args.run))
    recipe_path = Path(args.recipe) if args.recipe else run_dir / "recipe.yaml"
    recipe = load_recipe(recipe_path, list(args.set or []))
    model, tokenizer, data = load_for_recipe(recipe)
    tuned = api.load(model, adapter_dir)
    metrics = evaluate(tuned, recipe, data, Collator(tokenizer.pad_token_id))
    for name, value in metrics.items():
        print(f"{name:>20}: {value:.4f}")
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {run_dir / 'eval.json'}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base model and save a plain transformers model."""
    import peftkit.api as api
    from peftkit.errors import ConfigError
    from peftkit.models import load_model

    _, adapter_dir = _run_folder(Path(args.adapter))
    info = api.read_info(adapter_dir)
    base = args.model or info.get("base_model")
    if not base:
        raise ConfigError(f"{adapter_dir} does not name its base model: pass --model.")
    labels = info.get("labels") or []
    model, tokenizer = load_model(
        base, info.get("task", "causal-lm"), num_labels=len(labels) or None
    )
    merged = api.merge(api.load(model, adapter_dir))
    if labels:
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {name: i for i, name in enumerate(labels)}
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wrote the merged model to {args.output} (loads with plain transformers)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run several methods on one task and print the comparison table."""
    from peftkit.compare import compare

    only = [name for part in args.methods or [] for name in part.split(",") if name]
    results = compare(args.plan, args.output_dir, quick=args.quick, only=only or None)
    return 1 if any(result.get("failed") for result in results) else 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods and their options."""
    import dataclasses

    from peftkit.registry import METHODS

    for method in METHODS:
        print(f"{method.name}: {method.description}")
        if args.verbose:
            for f in dataclasses.fields(method.config_cls):
                print(f"    {f.name} = {f.default!r}  {f.metadata.get('help', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning: every method, one command line, measured.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a method from a YAML recipe")
    train.add_argument("recipe", help="path of a YAML recipe (see recipes/)")
    train.add_argument("--model", help="override the recipe's model")
    train.add_argument("--method", help="override the recipe's method name")
    train.add_argument("--max-steps", type=int, help="override training.max_steps")
    train.add_argument("--output-dir", help="override output_dir")
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="override any recipe key, e.g. --set method.rank=16 (repeatable)",
    )  # fmt: skip
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a trained adapter on held-out data")
    evaluate.add_argument("run", help="a run folder (holding adapter/) or an adapter folder")
    evaluate.add_argument("--recipe", help="recipe to take the data from (default: the run's)")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override")
    evaluate.set_defaults(handler=cmd_eval)

    merge = commands.add_parser("merge", help="fold an adapter into its base model")
    merge.add_argument("adapter", help="a run folder or an adapter folder")
    merge.add_argument("--output", required=True, help="folder for the merged model")
    merge.add_argument("--model", help="base model (default: the one the adapter names)")
    merge.set_defaults(handler=cmd_merge)

    compare = commands.add_parser(
        "compare", help="run several methods on one task: table, JSON, CSV and chart"
    )
    compare.add_argument(
        "plan", nargs="?", default="recipes/compare-minilm.yaml",
        help="compare plan YAML (default: recipes/compare-minilm.yaml)",
    )  # fmt: skip
    compare.add_argument("--quick", action="store_true", help="the plan's smoke-sized budget")
    compare.add_argument("--methods", nargs="+", help="only these plan entries (labels)")
    compare.add_argument("--output-dir", default="runs/compare", help="where results go")
    compare.set_defaults(handler=cmd_compare)

    methods = commands.add_parser("methods", help="list the PEFT methods and their options")
    methods.add_argument("-v", "--verbose", action="store_true", help="show every option")
    methods.set_defaults(handler=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the command, turn peftkit errors into one clear line."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as error:  # noqa: BLE001 - only peftkit's own errors are reported briefly
        from peftkit.errors import PeftkitError

        if isinstance(error, PeftkitError):
            print(f"peftkit: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
