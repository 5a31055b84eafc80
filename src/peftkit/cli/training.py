"""`peftkit train | eval | merge | compare | methods`: runs and their adapters."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftkit.cli.common import overrides, run_folder


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe and print its summary table."""
    from peftkit.recipe import check_data_files, load_recipe
    from peftkit.run_folder import check_output_dir

    recipe = load_recipe(args.recipe, overrides(args))
    # Before torch or any method loads: an earlier run in the folder is refused untouched, and
    # so is a data file that is not there.
    check_output_dir(recipe.output_dir, args.resume, args.overwrite)
    check_data_files(recipe)
    from peftkit.plan import resolve
    from peftkit.training import finish_distributed, run

    run(resolve(recipe), resume=args.resume, overwrite=args.overwrite)
    finish_distributed()  # under torchrun: every process ends together, cleanly
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained adapter on its recipe's held-out data."""
    import peftkit.api as api
    from peftkit.data.collate import Collator
    from peftkit.plan import resolve
    from peftkit.recipe import load_recipe
    from peftkit.run_folder import refuse_unfinished_run
    from peftkit.training import evaluate, load_for_plan

    refuse_unfinished_run(Path(args.run))
    run_dir, adapter_dir = run_folder(Path(args.run))
    recipe_path = Path(args.recipe) if args.recipe else run_dir / "recipe.yaml"
    plan = resolve(load_recipe(recipe_path, list(args.set or [])))
    model, tokenizer, data = load_for_plan(plan)
    tuned = api.load(model, adapter_dir)
    metrics = evaluate(tuned, plan, data, Collator(tokenizer.pad_token_id))
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
    from peftkit.models.pooling import uses_mean_pooling, write_pooling_config
    from peftkit.models.precision import torch_dtype

    _, adapter_dir = run_folder(Path(args.adapter))
    info = api.read_info(adapter_dir)
    base = args.model or info.get("base_model")
    if not base:
        raise ConfigError(f"{adapter_dir} does not name its base model: pass --model.")
    labels = info.get("labels") or []
    if args.dtype is not None:
        torch_dtype(args.dtype)  # an unknown name is refused before anything loads
    # The base as the adapter was trained on it (a QLoRA adapter: the same NF4 base).
    model, tokenizer = load_model(
        base, info.get("task", "causal-lm"), num_labels=len(labels) or None,
        dtype=info.get("base_dtype", "fp32"), quantize=info.get("quantize"),
    )  # fmt: skip
    merged = api.merge(api.load(model, adapter_dir), dtype=args.dtype)
    if labels:
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {name: i for i, name in enumerate(labels)}
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    if uses_mean_pooling(merged):
        write_pooling_config(args.output, merged.config.hidden_size)
        print(f"wrote the merged model to {args.output}; it classifies from the mean of its token "
              "states (1_Pooling/config.json): load it with peftkit.models.load_model, which "
              "pools the same way (plain transformers pools the first token)")  # fmt: skip
        return 0
    print(f"wrote the merged model to {args.output} (loads with plain transformers)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run several methods on one task and print the comparison table."""
    from peftkit.compare import compare

    only = [name for part in args.methods or [] for name in part.split(",") if name]
    results = compare(
        args.plan, args.output_dir, quick=args.quick, only=only or None, overwrite=args.overwrite
    )
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


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""

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
    train.add_argument(
        "--resume", nargs="?", const="latest", metavar="CHECKPOINT",
        help="continue from the run's newest complete checkpoint, or from this checkpoint-N "
        "folder (checkpoints are written every training.save_steps steps)",
    )  # fmt: skip
    train.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier run in the output folder (it is kept in <folder>.previous "
        "until this run finishes; without this flag such a folder is refused)",
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
    merge.add_argument(
        "--dtype",
        help="fp32 | bf16 | fp16: the merged model's dtype (default: the base's as trained; a "
        "quantised base is dequantised into it)",
    )
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
    compare.add_argument(
        "--overwrite", action="store_true",
        help="rerun plan entries whose run folders already hold results (replacing them)",
    )  # fmt: skip
    compare.set_defaults(handler=cmd_compare)

    methods = commands.add_parser("methods", help="list the PEFT methods and their options")
    methods.add_argument("-v", "--verbose", action="store_true", help="show every option")
    methods.set_defaults(handler=cmd_methods)
