"""`peftkit train | eval | merge | compare | methods`: runs and their adapters."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peftkit.cli.common import overrides
from peftkit.run_folder import run_and_adapter


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe and print its summary table."""
    from peftkit.recipe import check_data_files, load_recipe
    from peftkit.run_folder import check_output_dir, check_writable_folder

    recipe = load_recipe(args.recipe, overrides(args))
    # Before torch or any method loads: an output folder that is one of the run's own input
    # files, or cannot be written, is refused; an earlier run in it is refused untouched; and so
    # is a data file that is not there.
    inputs = {"recipe file": args.recipe, "training data file": recipe.task.train_file,
              "held-out data file": recipe.task.eval_file}  # fmt: skip
    check_writable_folder(recipe.output_dir, inputs)
    check_output_dir(recipe.output_dir, args.resume, args.overwrite)
    check_data_files(recipe)
    from peftkit.plan import resolve
    from peftkit.training import finish_distributed, run

    try:
        run(resolve(recipe), resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        import shlex
        import sys

        from peftkit.run_folder import interrupted_message

        sets = [word for pair in overrides(args) for word in ("--set", pair)]
        command = shlex.join(["peftkit", "train", args.recipe, *sets])
        print(f"\npeftkit: interrupted. {interrupted_message(recipe.output_dir, command)}",
              file=sys.stderr)  # fmt: skip
        return 130  # the shell's status for a command ended by Ctrl-C
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
    run_dir, adapter_dir = run_and_adapter(Path(args.run))
    recipe_path = Path(args.recipe) if args.recipe else run_dir / "recipe.yaml"
    plan = resolve(load_recipe(recipe_path, list(args.set or [])))
    model, tokenizer, data = load_for_plan(plan)
    tuned = api.load(model, adapter_dir)
    metrics = evaluate(tuned, plan, data, Collator(tokenizer.pad_token_id))
    for name, value in metrics.items():
        print(f"{name:>20}: {value:.4f}")
    from peftkit.io import write_json_atomically
    from peftkit.run_folder import record_entries

    record_entries(run_dir, ["eval.json"])  # the run's own from now on (unless the user's)
    write_json_atomically(run_dir / "eval.json", metrics)
    print(f"wrote {run_dir / 'eval.json'}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base model and save a plain transformers model."""
    import peftkit.api as api
    from peftkit.errors import ConfigError
    from peftkit.io import atomic_folder
    from peftkit.models import load_model
    from peftkit.models.pooling import uses_mean_pooling, write_pooling_config
    from peftkit.models.precision import torch_dtype

    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(
            f"merge --output {output} is an existing file; the merged model is a folder of "
            "files (config.json, model.safetensors, the tokenizer). Give a folder's path."
        )
    _, adapter_dir = run_and_adapter(Path(args.adapter).expanduser())
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
    with atomic_folder(output) as staging:  # a killed merge leaves no half model
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if uses_mean_pooling(merged):
            write_pooling_config(staging, merged.config.hidden_size)
    if uses_mean_pooling(merged):
        print(f"wrote the merged model to {output}; it classifies from the mean of its token "
              "states (1_Pooling/config.json): load it with peftkit.models.load_model, which "
              "pools the same way (plain transformers pools the first token)")  # fmt: skip
        return 0
    print(f"wrote the merged model to {output} (loads with plain transformers)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run several methods on one task and print the comparison table."""
    from peftkit.compare import compare

    only = [name for part in args.methods or [] for name in part.split(",") if name]
    results = compare(
        args.plan, args.output_dir, quick=args.quick, only=only or None,
        overwrite=args.overwrite, seeds=args.seeds,
    )  # fmt: skip
    return 1 if any(result.get("failed") for result in results) else 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods and their options."""
    import dataclasses

    from peftkit.registry import METHODS

    for method in METHODS:
        print(f"{method.name}: {method.description}")
        if args.verbose:
            for f in dataclasses.fields(method.config_cls):
                # a list default is a default_factory (BitFit's bias_groups): call it
                made = f.default_factory is not dataclasses.MISSING
                default = f.default_factory() if made else f.default
                print(f"    {f.name} = {default!r}  {f.metadata.get('help', '')}")
            for option in method.options:
                print(f"    option {option.name}: {option.description}")
            print(f"    can: {', '.join(capabilities(method)) or 'train, save and load'}")
    return 0


def capabilities(method: Any) -> list[str]:
    """What a method's record says it can do beyond training, saving and loading, in words."""
    can = {
        "merge into the base": method.merge is not None,
        "switch off (proxy anti-expert, preference reference)": method.switch_off is not None,
        "combine adapters (peftkit combine)": method.composition is not None,
        "convert for the original base (peftkit convert)": method.conversion is not None,
        "serve several adapters in one batch": method.row_adapters is not None,
        "train on a half-precision base": not method.needs_float32_base,
        "train on a quantised base": not (method.needs_float32_base or method.no_quantized_base),
    }
    return [what for what, yes in can.items() if yes]


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
    compare.add_argument(
        "--seeds", type=int, default=1,
        help="run each entry with this many seeds (the recipe's and the next ones): mean and "
        "spread per method, and which differences exceed the noise (paired t-test, 95%%)",
    )  # fmt: skip
    compare.set_defaults(handler=cmd_compare)

    methods = commands.add_parser("methods", help="list the PEFT methods and their options")
    methods.add_argument("-v", "--verbose", action="store_true", help="show every option")
    methods.set_defaults(handler=cmd_methods)
