"""The `peftkit` command line. Heavy libraries are imported inside each command, so `--help` is
instant (no torch import on that path)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


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


def _positive(flag: str, value: int | None) -> None:
    """Refuse a count below 1 given on the command line (None: the flag was not given)."""
    from peftkit.errors import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value}.")


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe and print its summary table."""
    from peftkit.recipe import load_recipe
    from peftkit.run_folder import check_output_dir

    recipe = load_recipe(args.recipe, _overrides(args))
    # Before the training stack loads: an earlier run in the folder is refused untouched.
    check_output_dir(recipe.output_dir, args.resume, args.overwrite)
    from peftkit.training import finish_distributed, run

    run(recipe, resume=args.resume, overwrite=args.overwrite)
    finish_distributed()  # under torchrun: every process ends together, cleanly
    return 0


def _run_folder(path: Path) -> tuple[Path, Path]:
    """(run folder, adapter folder) from either of the two."""
    if (path / "adapter").is_dir():
        return path, path / "adapter"
    return path.parent, path


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained adapter on its recipe's held-out data."""
    import peftkit.api as api
    from peftkit.data.collate import Collator
    from peftkit.recipe import load_recipe
    from peftkit.training import evaluate, load_for_recipe

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


def cmd_app_eval(args: argparse.Namespace) -> int:
    """Score an application's held-out set by generation: the untuned base, then the tuned run."""
    import peftkit.api as api
    from peftkit.apps.evaluate import HEADLINE, evaluate_app
    from peftkit.models import load_model
    from peftkit.recipe import load_recipe
    from peftkit.tasks import split_rows

    # The numbers first: a bad one should not cost a model load.
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--batch-size", args.batch_size)
    _positive("--max-examples", args.max_examples)
    run_dir, adapter_dir = _run_folder(Path(args.run))
    # Every held-out row unless --max-examples: a recipe's max_eval_examples only bounds the
    # training-time loss check.
    limit = f"task.max_eval_examples={args.max_examples or 'null'}"
    recipe = load_recipe(run_dir / "recipe.yaml", [*(args.set or []), limit])
    _, records = split_rows(recipe.task)
    model, tokenizer = load_model(recipe.model, recipe.task.type, seed=recipe.training.seed)
    options = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    results = {}
    if not args.skip_base:
        results["base"] = evaluate_app(args.app, model, tokenizer, records, **options)
    results["tuned"] = evaluate_app(
        args.app, api.load(model, adapter_dir), tokenizer, records, **options
    )
    for name, result in results.items():
        values = ", ".join(f"{m} {result[m]:.4f}" for m in HEADLINE[args.app])
        failures = f", failures {result['failures']}" if result.get("failures") else ""
        print(f"{name:>6} ({result['count']} examples): {values}{failures}")
    output = run_dir / f"app_eval_{args.app}.json"
    report = {"app": args.app, "run": str(run_dir), **results}
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base model and save a plain transformers model."""
    import peftkit.api as api
    from peftkit.errors import ConfigError
    from peftkit.models import load_model
    from peftkit.models.pooling import uses_mean_pooling, write_pooling_config

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
    if uses_mean_pooling(merged):
        write_pooling_config(args.output, merged.config.hidden_size)
        print(f"wrote the merged model to {args.output}; it classifies from the mean of its token "
              "states (1_Pooling/config.json): load it with peftkit.models.load_model, which "
              "pools the same way (plain transformers pools the first token)")  # fmt: skip
        return 0
    print(f"wrote the merged model to {args.output} (loads with plain transformers)")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    """Combine trained runs' adapters each way; score every combination on every source task."""
    from peftkit.errors import ConfigError
    from peftkit.methods.combine_runs import plan, read_sources, run_combine

    _positive("--max-eval-examples", args.max_eval_examples)
    if not 0.0 <= args.max_loss <= 1.0:
        raise ConfigError(f"--max-loss is a share of the gain in [0, 1], got {args.max_loss}.")
    output = Path(args.output_dir)
    report_path = output / "combine.json"
    if report_path.exists() and not args.overwrite:
        raise ConfigError(f"{report_path} exists: choose another --output-dir, or --overwrite.")
    sources = read_sources(args.runs)  # every refusal happens before a model loads
    combinations = plan(sources, args.how, args.weights, args.density, args.svd_rank)
    adapters = output / "adapters" if args.save_adapters else None
    report = run_combine(sources, combinations, args.max_loss, args.max_eval_examples, adapters)
    print(report["table"])
    for label, tasks in report["flagged"].items():
        print(f"flagged: {label} keeps less than {1 - args.max_loss:.0%} of the gain on "
              f"{', '.join(tasks)}")  # fmt: skip
    from peftkit.io import write_text_atomically

    write_text_atomically(report_path, json.dumps(report, indent=2) + "\n")
    print(f"wrote {report_path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a model (an adapter merged on the fly, or a merged model) as one GGUF file."""
    from peftkit.errors import ExportError

    if args.format != "gguf":
        raise ExportError(f"Unknown export format '{args.format}'; peftkit exports gguf.")
    from peftkit.export import export_gguf, load_source
    from peftkit.export.gguf_file import check_output
    from peftkit.export.tensors import check_outtype
    from peftkit.tables import key_value_table

    check_outtype(args.outtype)  # both refused before the model is loaded
    check_output(Path(args.output), args.overwrite)
    source = load_source(args.source, args.model)
    report = export_gguf(
        source.model, source.tokenizer, args.output, outtype=args.outtype, name=source.name,
        overwrite=args.overwrite, tokenizer_pre=args.tokenizer_pre,
    )  # fmt: skip
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(report["tensors"].items()))
    print(key_value_table([
        ("source", source.description),
        ("file", report["path"]),
        ("architecture", report["architecture"]),
        ("tensors", types),
        ("output tied to token_embd", "yes" if report["tied_output"] else "no"),
        ("vocabulary", f"{report['vocabulary']} (pre-tokenizer {report['tokenizer_pre']})"),
        ("chat template", "yes" if report["chat_template"] else "no"),
        ("size", f"{report['bytes'] / 2**20:.1f} MiB"),
    ]))  # fmt: skip
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run several methods on one task and print the comparison table."""
    from peftkit.compare import compare

    only = [name for part in args.methods or [] for name in part.split(",") if name]
    results = compare(
        args.plan, args.output_dir, quick=args.quick, only=only or None, overwrite=args.overwrite
    )
    return 1 if any(result.get("failed") for result in results) else 0


def _load_tuned(name: str, task: str, adapter: str | None) -> tuple[Any, Any]:
    """A model (with an adapter applied, if given) and its tokenizer."""
    import peftkit.api as api
    from peftkit.models import load_model

    model, tokenizer = load_model(name, task)
    if adapter:
        model = api.load(model, _run_folder(Path(adapter))[1])
    return model.eval(), tokenizer


def check_generate_args(args: argparse.Namespace) -> None:
    """Refuse bad `generate` numbers, prompts and flag combinations before any model loads."""
    from peftkit.decoding.generate import check_options
    from peftkit.decoding.proxy import check_alpha
    from peftkit.errors import ConfigError

    check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    empty = [i for i, prompt in enumerate(args.prompt) if not prompt]
    if empty:
        raise ConfigError(
            f"--prompt number {empty[0] + 1} is empty: give every prompt some text to continue."
        )
    proxy = [args.proxy_expert, args.proxy_anti_expert]
    if any(proxy) and not all(proxy):
        raise ConfigError(
            "Proxy-Tuning needs both --proxy-expert (the tuned small model) and "
            "--proxy-anti-expert (the same small model untuned)."
        )
    if args.proxy_adapter and any(proxy):
        raise ConfigError(
            "Give Proxy-Tuning either --proxy-adapter (one small model, adapter on and off) or "
            "--proxy-expert with --proxy-anti-expert, not both."
        )
    if args.expert_adapter and not args.proxy_expert:
        raise ConfigError("--expert-adapter goes on the expert: give --proxy-expert too.")
    if args.alpha is not None:
        if not (all(proxy) or args.proxy_adapter):
            raise ConfigError(
                "--alpha sets Proxy-Tuning's strength: give --proxy-adapter, or --proxy-expert "
                "and --proxy-anti-expert, with it."
            )
        check_alpha(args.alpha)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a model, with an adapter, or proxy-tuned by an expert/anti-expert pair."""
    import peftkit.api as api
    from peftkit.decoding.generate import generate
    from peftkit.errors import ConfigError
    from peftkit.tasks import get_task_type

    # Numbers, prompts and flags first: a bad one should not cost a model load.
    check_generate_args(args)
    task = args.task
    if args.adapter and task is None:
        task = api.read_info(_run_folder(Path(args.adapter))[1]).get("task")
    task_type = get_task_type(task or "causal-lm")
    if not task_type.generates:
        raise ConfigError(
            f"A {task_type.name} model does not generate text; generate from a model tuned for "
            f"one of: {', '.join(_generative_tasks())}."
        )
    chat = args.chat or task_type.chat  # a chat-tuned adapter reads its prompts as it trained
    proxy = [args.proxy_expert, args.proxy_anti_expert]
    model, tokenizer = _load_tuned(args.model, task_type.name, args.adapter)
    options = {
        "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
    }  # fmt: skip
    if all(proxy) or args.proxy_adapter:
        from peftkit.decoding.proxy import WithoutAdapter, proxy_generate

        if args.proxy_adapter:  # one set of weights: expert = adapter on, anti-expert = off
            expert, _ = _load_tuned(args.model, task_type.name, args.proxy_adapter)
            anti_expert = WithoutAdapter(expert)
        else:
            expert, _ = _load_tuned(args.proxy_expert, task_type.name, args.expert_adapter)
            anti_expert, _ = _load_tuned(args.proxy_anti_expert, task_type.name, None)
        texts = proxy_generate(
            model, expert, anti_expert, tokenizer, args.prompt,
            alpha=1.0 if args.alpha is None else args.alpha,
            chat=chat, seed=args.seed, **options,
        )  # fmt: skip
    else:
        # One prompt at a time: sampled text then depends only on the seed and the prompt.
        generated = generate(
            model, tokenizer, args.prompt, chat=chat, batch_size=1, seed=args.seed, **options
        )
        texts = [g.text for g in generated]
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"### {prompt}\n{text}\n")
    if args.output:
        records = [{"prompt": p, "generated": t} for p, t in zip(args.prompt, texts, strict=True)]
        Path(args.output).write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def _generative_tasks() -> list[str]:
    """The task types whose tuned models generate text."""
    from peftkit.tasks import TASK_TYPES

    return [name for name, task in TASK_TYPES.items() if task.generates]


def _method_sections(values: list[str] | None, sets: list[str]) -> list[dict[str, Any]]:
    """Each --method (a name, or a method section as YAML: {name: NAME, KEY: VALUE}) as a section,
    with the --set method.KEY=VALUE options applied to it."""
    import yaml

    from peftkit.errors import ConfigError
    from peftkit.recipe import apply_overrides, parse_override

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
                           "dtype": "bf16-mixed"}  # fmt: skip
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
                   dtype=precision)  # fmt: skip
    else:
        job["methods"] = _method_sections(args.method, list(args.set or []))
        if not job["methods"]:
            raise ConfigError(
                "Say which method to estimate: --method NAME (see `peftkit methods -v` for the "
                "names and options; --set method.KEY=VALUE sets an option), or --recipe FILE."
            )
    given = {"model": args.model, "task": args.task, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "dtype": args.dtype}  # fmt: skip
    job.update({key: value for key, value in given.items() if value is not None})
    return job


def cmd_estimate(args: argparse.Namespace) -> int:
    """Estimate training memory by part (weights, gradients, optimizer, activations)."""
    from peftkit.memory.estimate import estimate
    from peftkit.memory.table import DTYPES, markdown_table, side_by_side, title

    job = _estimate_job(args)
    options = {"task": job["task"], "attention": args.attention, "quantization": args.quantization}
    if args.table:
        dtypes = [args.dtype] if args.dtype else list(DTYPES)
        estimates = side_by_side(
            job["model"], job["methods"], dtypes, job["batch_size"], job["seq_len"],
            args.gradient_checkpointing, **options,
        )  # fmt: skip
        text = title(estimates) + "\n\n" + markdown_table(estimates)
        data: Any = {"title": title(estimates), "estimates": [e.as_dict() for e in estimates]}
    else:
        if len(job["methods"]) > 1:
            from peftkit.errors import ConfigError

            raise ConfigError("Give one --method, or add --table to set several side by side.")
        result = estimate(job["model"], job["methods"][0], job["batch_size"], job["seq_len"],
                          job["dtype"], args.gradient_checkpointing, **options)  # fmt: skip
        text, data = str(result), result.as_dict()
    print(text)
    if args.output:
        Path(args.output).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """The methods that fit a memory budget, ranked by measurements or the estimator."""
    from peftkit.memory.recommend import recommend

    result = recommend(
        args.memory, args.model, args.task, batch_size=args.batch_size, seq_len=args.seq_len,
        dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
        methods=args.methods, compare=args.compare,
    )  # fmt: skip
    print(f"basis: {result.basis}")
    print(result.table)
    if args.output:
        Path(args.output).write_text(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
        print(f"wrote {args.output}")
    return 0


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


def _add_step_shape(
    parser: argparse.ArgumentParser, batch_size: int | None, seq_len: int | None, dtype: str | None
) -> None:
    """The flags that set a training step's shape for the memory estimate (estimate, recommend)."""
    parser.add_argument("--batch-size", type=int, default=batch_size, help="examples a step")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per example")
    parser.add_argument("--dtype", default=dtype, help="fp32 | bf16-mixed | fp16-mixed | bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")


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

    app_eval = commands.add_parser(
        "app-eval", help="score an application run (sql, tabular, instructions), base vs tuned"
    )
    app_eval.add_argument("run", help="a run folder of an application recipe (recipes/app-*)")
    app_eval.add_argument("--app", required=True, choices=["sql", "tabular", "instructions"])
    app_eval.add_argument("--max-new-tokens", type=int, help="default: 96 (sql), 64 (chat)")
    app_eval.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    app_eval.add_argument("--skip-base", action="store_true", help="score the tuned model only")
    app_eval.add_argument("--max-examples", type=int, help="score the first N held-out rows")
    app_eval.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override")
    app_eval.set_defaults(handler=cmd_app_eval)

    merge = commands.add_parser("merge", help="fold an adapter into its base model")
    merge.add_argument("adapter", help="a run folder or an adapter folder")
    merge.add_argument("--output", required=True, help="folder for the merged model")
    merge.add_argument("--model", help="base model (default: the one the adapter names)")
    merge.set_defaults(handler=cmd_merge)

    combine = commands.add_parser(
        "combine",
        help="combine trained LoRA-family runs (cat, task_arithmetic, svd, ties, dare, ...) and "
        "score each combination on every source task",
    )
    combine.add_argument("runs", nargs="+", help="run folders, or name=folder (two or more)")
    combine.add_argument(
        "--how", nargs="+", default=["task_arithmetic"],
        help="combinations: cat task_arithmetic linear svd ties ties_svd dare_linear dare_ties "
        "dare_linear_svd dare_ties_svd magnitude_prune magnitude_prune_svd",
    )  # fmt: skip
    combine.add_argument(
        "--weights", nargs="+", type=float, help="one per run (default: 1 / number of runs)"
    )
    combine.add_argument(
        "--density", type=float, help="ties/dare/magnitude_prune: share of entries kept, (0, 1]"
    )
    combine.add_argument("--svd-rank", type=int, help="rank of the *_svd results (default: max)")
    combine.add_argument(
        "--max-loss", type=float, default=0.1,
        help="flag a combination keeping less than 1 - this share of a task's gain (0.1)",
    )  # fmt: skip
    combine.add_argument("--max-eval-examples", type=int, help="score the first N held-out rows")
    combine.add_argument("--output-dir", default="runs/combine", help="where combine.json goes")
    combine.add_argument(
        "--save-adapters", action="store_true", help="also save each combination's adapter"
    )
    combine.add_argument("--overwrite", action="store_true", help="replace an earlier report")
    combine.set_defaults(handler=cmd_combine)

    export = commands.add_parser(
        "export", help="write a model or a merged adapter as one GGUF file (llama.cpp)"
    )
    export.add_argument(
        "source",
        help="a run or adapter folder (merged on the fly), a merged-model folder, or a model name",
    )
    export.add_argument("--format", default="gguf", help="file format (gguf)")
    export.add_argument(
        "--outtype", default="f16",
        help="storage of the weight matrices: f32 | f16 (default) | q8_0 (norms stay f32)",
    )  # fmt: skip
    export.add_argument("--output", required=True, help="the .gguf file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.add_argument("--model", help="an adapter's base model (default: the one it names)")
    export.add_argument(
        "--tokenizer-pre",
        help="llama.cpp's pre-tokenizer name, for a tokenizer the exporter does not recognise",
    )
    export.set_defaults(handler=cmd_export)

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

    generate = commands.add_parser(
        "generate", help="generate text: a model, an adapter, or Proxy-Tuning"
    )
    generate.add_argument("--model", required=True, help="base model: bundled name or folder")
    generate.add_argument("--adapter", help="a trained adapter (or run folder) to apply")
    generate.add_argument(
        "--task", help="the model's task type (default: the adapter's, else causal-lm)"
    )
    generate.add_argument("--prompt", action="append", required=True, help="repeatable")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass")
    generate.add_argument("--seed", type=int, help="seed for sampling")
    generate.add_argument("--chat", action="store_true", help="use the chat template")
    generate.add_argument("--proxy-expert", help="Proxy-Tuning: the tuned small model")
    generate.add_argument("--expert-adapter", help="Proxy-Tuning: an adapter on the expert")
    generate.add_argument("--proxy-anti-expert", help="Proxy-Tuning: the untuned small model")
    generate.add_argument(
        "--proxy-adapter",
        help="Proxy-Tuning with one set of weights: expert = model + this adapter, "
        "anti-expert = the same model with it disabled",
    )
    generate.add_argument(
        "--alpha", type=float, help="Proxy-Tuning strength (default 1.0, as in the paper)"
    )
    generate.add_argument("--output", help="also write the generations as JSON here")
    generate.set_defaults(handler=cmd_generate)

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
    est.add_argument("--task", help="classification | causal-lm | chat | seq2seq (default: "
                     "the model's usual one)")  # fmt: skip
    _add_step_shape(est, batch_size=None, seq_len=None, dtype=None)
    est.add_argument("--attention", default="fused", help="fused (FlashAttention/SDPA) | eager")
    est.add_argument("--quantization", help="nf4: the base's frozen linear weights in 4 bits")
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
        "--task", default="classification", help="classification | causal-lm | seq2seq"
    )
    _add_step_shape(rec, batch_size=16, seq_len=128, dtype="fp32")
    rec.add_argument("--methods", nargs="+", help="only these methods (default: every one)")
    rec.add_argument(
        "--compare", default="runs/compare/compare.json",
        help="a compare run's JSON to rank by measured quality (if it exists)",
    )  # fmt: skip
    rec.add_argument("--output", help="also write the recommendation as JSON here")
    rec.set_defaults(handler=cmd_recommend)

    methods = commands.add_parser("methods", help="list the PEFT methods and their options")
    methods.add_argument("-v", "--verbose", action="store_true", help="show every option")
    methods.set_defaults(handler=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the command, turn peftkit errors into one clear line."""
    args = build_parser().parse_args(argv)
    import warnings

    # transformers' own deprecation notices about its internals say nothing to a peftkit user.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
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
