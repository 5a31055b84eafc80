"""`peftkit combine`: several trained LoRA-family runs combined each way, every combination
scored on every source task's held-out data. `peftkit convert`: a PiSSA/OLoRA adapter rewritten
as a plain LoRA for the original base (PEFT's conversion), so it loads and combines anywhere."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftkit.cli.common import check_positive
from peftkit.run_folder import run_and_adapter


def cmd_combine(args: argparse.Namespace) -> int:
    """Combine trained runs' adapters each way; score every combination on every source task."""
    from peftkit.combine import plan, read_sources, run_combine
    from peftkit.errors import ConfigError

    check_positive("--max-eval-examples", args.max_eval_examples)
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


def cmd_convert(args: argparse.Namespace) -> int:
    """Rewrite a PiSSA/OLoRA-initialised adapter for the original base model."""
    import peftkit.api as api
    from peftkit.errors import ConfigError
    from peftkit.models import load_model

    _, adapter_dir = run_and_adapter(Path(args.adapter))
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise ConfigError(f"{output} is not empty: choose another --output, or --overwrite.")
    method = api.check_convertible(adapter_dir)  # before the base model loads
    info = api.read_info(adapter_dir)
    base = args.model or info.get("base_model")
    if not base:
        raise ConfigError(f"{adapter_dir} does not name its base model: pass --model.")
    labels = info.get("labels") or []
    # Only weights are rewritten: no tokenizer, so a base folder without tokenizer files serves.
    model, _ = load_model(
        base, info.get("task", "causal-lm"), num_labels=len(labels) or None, with_tokenizer=False
    )
    api.convert(model, adapter_dir, output)
    print(f"wrote {output}: the {method.name} adapter converted for the unchanged {base}")
    return 0


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""
    combine = commands.add_parser(
        "combine",
        help="combine trained runs of one method family that composes (cat, task_arithmetic, "
        "svd, ties, dare, ...) and score each combination on every source task",
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

    convert = commands.add_parser(
        "convert",
        help="rewrite an adapter trained on a base its init rewrote (PiSSA, OLoRA) for the "
        "original base",
    )
    convert.add_argument("adapter", help="a run folder or an adapter folder")
    convert.add_argument("--output", required=True, help="folder for the converted adapter")
    convert.add_argument("--model", help="base model (default: the one the adapter names)")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    convert.set_defaults(handler=cmd_convert)
