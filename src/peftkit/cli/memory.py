"""`peftkit estimate | recommend`: training memory by part, and which methods fit a budget."""

from __future__ import annotations

import argparse
import json
from typing import Any

from peftkit.io import write_json_atomically


def _method_sections(values: list[str] | None, sets: list[str]) -> list[dict[str, Any]]:
    """Each --method (a name, or a method section as YAML: {name: NAME, KEY: VALUE}) as a section,
    with the --set method.KEY=VALUE options applied to it."""
    import yaml

    from peftkit.config import apply_overrides, parse_override
    from peftkit.errors import ConfigError

    for text in sets:
        if parse_override(text)[0][0] != "method":
            raise ConfigError(
                f"--set {text}: without --recipe, --set takes method options only "
                "(method.KEY=VALUE, e.g. method.rank=16)."
            )
    sections = []
    for value in values or []:
        section = yaml.safe_load(value) if value.lstrip().startswith("{") else value
        sections.append(apply_overrides({"method": section}, sets)["method"])
    return sections


def _estimate_job(args: argparse.Namespace) -> dict[str, Any]:
    """What to estimate: model, task, method sections and step shape, from the flags and, with
    --recipe, the recipe's own model, task, method, batch size, max_length and precision."""
    from peftkit.errors import ConfigError

    job: dict[str, Any] = {"model": "llama-7b", "task": None, "batch_size": 1, "seq_len": 512,
                           "dtype": "bf16-mixed", "base_dtype": None, "quantization": None,
                           "gradient_checkpointing": False, "gpus": 1,
                           "sharding": "none"}  # fmt: skip
    if args.recipe:
        from peftkit.recipe import load_recipe

        methods = _method_sections(args.method, [])
        if len(methods) > 1:
            raise ConfigError(
                "With --recipe, give at most one --method (it replaces the recipe's)."
            )
        # A --method replaces the recipe's method section; --set then changes any recipe key.
        overrides = [f"method={json.dumps(section)}" for section in methods]
        recipe = load_recipe(args.recipe, overrides + list(args.set or []))
        precision = {"bf16": "bf16-mixed"}.get(recipe.training.precision, "fp32")
        job.update(model=recipe.model, task=recipe.task.type, methods=[dict(recipe.method)],
                   batch_size=recipe.training.batch_size, seq_len=recipe.task.max_length,
                   dtype=precision, base_dtype=recipe.base.dtype,
                   quantization=recipe.base.quantize,
                   gradient_checkpointing=recipe.training.gradient_checkpointing,
                   sharding=recipe.training.sharding,
                   task_options=recipe.task_options)  # fmt: skip
    else:
        job["methods"] = _method_sections(args.method, list(args.set or []))
        if not job["methods"]:
            raise ConfigError(
                "Say which method to estimate: --method NAME (see `peftkit methods -v` for the "
                "names and options; --set method.KEY=VALUE sets an option), or --recipe FILE."
            )
    given = {"model": args.model, "task": args.task, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "dtype": args.dtype, "base_dtype": args.base_dtype,
             "quantization": args.quantization,
             "gradient_checkpointing": args.gradient_checkpointing or None, "gpus": args.gpus,
             "sharding": args.sharding}  # fmt: skip
    job.update({key: value for key, value in given.items() if value is not None})
    return job


def cmd_estimate(args: argparse.Namespace) -> int:
    """Estimate training memory by part (weights, gradients, optimizer, activations)."""
    from peftkit.memory.estimate import estimate
    from peftkit.memory.table import DTYPES, markdown_table, side_by_side, title

    job = _estimate_job(args)
    options = {"task": job["task"], "attention": args.attention,
               "quantization": job["quantization"], "base_dtype": job["base_dtype"],
               "gpus": job["gpus"], "sharding": job["sharding"],
               "task_options": job.get("task_options")}  # fmt: skip
    if args.table:
        dtypes = [args.dtype] if args.dtype else list(DTYPES)
        estimates = side_by_side(
            job["model"], job["methods"], dtypes, job["batch_size"], job["seq_len"],
            job["gradient_checkpointing"], **options,
        )  # fmt: skip
        text = title(estimates) + "\n\n" + markdown_table(estimates)
        data: Any = {"title": title(estimates), "estimates": [e.as_dict() for e in estimates]}
    else:
        if len(job["methods"]) > 1:
            from peftkit.errors import ConfigError

            raise ConfigError("Give one --method, or add --table to set several side by side.")
        result = estimate(job["model"], job["methods"][0], job["batch_size"], job["seq_len"],
                          job["dtype"], job["gradient_checkpointing"], **options)  # fmt: skip
        text, data = str(result), result.as_dict()
    print(text)
    if args.output:
        write_json_atomically(args.output, data)
        print(f"wrote {args.output}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """The methods that fit a memory budget, ranked by measurements or the estimator."""
    from peftkit.memory import meta
    from peftkit.memory.recommend import recommend

    task = args.task or meta.default_task(meta.resolve_config(args.model)[0])
    # With no storage flag, every storage setting is tried for each method (the first that fits
    # is listed with the others that fit); any flag fixes the setting.
    explore = not (args.base_dtype or args.quantization or args.gradient_checkpointing)
    result = recommend(
        args.memory, args.model, task, batch_size=args.batch_size, seq_len=args.seq_len,
        dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
        methods=args.methods, compare=args.compare, base_dtype=args.base_dtype,
        quantization=args.quantization, explore=explore,
        gpus=1 if args.gpus is None else args.gpus, sharding=args.sharding,
    )  # fmt: skip
    print(f"basis: {result.basis}")
    print(result.table)
    if args.output:
        write_json_atomically(args.output, result.as_dict(), default=str)
        print(f"wrote {args.output}")
    return 0


def _add_storage(parser: argparse.ArgumentParser) -> None:
    """The flags that say how the base is stored, for the memory estimate (estimate, recommend)."""
    parser.add_argument(
        "--base-dtype", help="fp32 | bf16 | fp16: the frozen base's storage (recipe base.dtype)"
    )
    parser.add_argument(
        "--quantization",
        help="nf4 | int8: the base's frozen linear weights in 4 or 8 bits (recipe base.quantize)",
    )


def _add_processes(parser: argparse.ArgumentParser, sharding: str | None) -> None:
    """The flags that say how many processes train and whether they shard the model."""
    parser.add_argument(
        "--gpus", type=int, help="processes (one per GPU); the estimate is per process (default 1)"
    )
    parser.add_argument(
        "--sharding", default=sharding,
        help="none (each process holds the whole model: DDP) | fsdp (weights, gradients and "
        "optimizer state divided across the processes; recipe training.sharding)",
    )  # fmt: skip


def _add_step_shape(
    parser: argparse.ArgumentParser, batch_size: int | None, seq_len: int | None, dtype: str | None
) -> None:
    """The flags that set a training step's shape for the memory estimate (estimate, recommend)."""
    parser.add_argument("--batch-size", type=int, default=batch_size, help="examples a step")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per example")
    parser.add_argument("--dtype", default=dtype, help="fp32 | bf16-mixed | fp16-mixed | bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""

    est = commands.add_parser(
        "estimate", help="estimate training memory by part: any method, any model size"
    )
    est.add_argument(
        "--model",
        help="a bundled name, a config.json (or its folder), or llama-7b / llama-13b / llama-70b "
        "(default: llama-7b, or the recipe's)",
    )
    est.add_argument(
        "--method", action="append", metavar="NAME",
        help="a registered method (see peftkit methods -v), or a method section as YAML: "
        "'{name: NAME, KEY: VALUE}'; repeat it with --table",
    )  # fmt: skip
    est.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="a method option, e.g. --set method.rank=16 (with --recipe: any recipe key)",
    )  # fmt: skip
    est.add_argument("--recipe", help="estimate a recipe's model, task, method, batch and length")
    est.add_argument("--task", help="classification | causal-lm | chat | seq2seq | preference "
                     "(DPO) | kto | grpo (--seq-len: the prompt's) (default: the model's usual "
                     "one; --recipe: its preference/kto/grpo section)")  # fmt: skip
    _add_step_shape(est, batch_size=None, seq_len=None, dtype=None)
    est.add_argument(
        "--attention",
        default="fused",
        choices=("auto", "fused", "math", "cpu", "eager"),
        help="the attention kernel modelled: fused (a GPU's FlashAttention/SDPA, the default), "
        "math (SDPA's math backend), cpu (what SDPA runs on a CPU), eager, "
        "or auto (this machine's)",
    )
    _add_storage(est)
    _add_processes(est, sharding=None)
    est.add_argument(
        "--table", action="store_true",
        help="the --method estimates side by side, in bf16-mixed and fp32 (or --dtype)",
    )  # fmt: skip
    est.add_argument("--output", help="also write the estimate as JSON here")
    est.set_defaults(handler=cmd_estimate)

    rec = commands.add_parser("recommend", help="which methods fit a memory budget, ranked")
    rec.add_argument("--memory", required=True, help="the budget, e.g. 8GiB, 512MiB, 24GB")
    rec.add_argument("--model", default="minilm", help="bundled name, config.json, or llama-7b")
    rec.add_argument(
        "--task",
        help="classification | causal-lm | seq2seq (default: the model's usual one: "
        "classification for encoders, causal-lm for decoders)",
    )
    _add_step_shape(rec, batch_size=16, seq_len=128, dtype="fp32")
    _add_storage(rec)
    _add_processes(rec, sharding="none")
    rec.add_argument("--methods", nargs="+", help="only these methods (default: every one)")
    rec.add_argument(
        "--compare", default="runs/compare/compare.json",
        help="a compare run's JSON to rank by measured quality (if it exists)",
    )  # fmt: skip
    rec.add_argument("--output", help="also write the recommendation as JSON here")
    rec.set_defaults(handler=cmd_recommend)
