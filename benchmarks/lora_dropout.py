"""Does LoRA's dropout help? The demo task and a SmolLM2 chat task at dropout 0 and 0.05, 3 seeds.

Each run is `peftkit train` in its own process (as `peftkit compare` runs them), with the seed
(LoRA's initial A, the data order and the dropout masks) and the dropout as the only changes:

- demo: recipes/compare-minilm.yaml's LoRA entry (MiniLM-L6, r 8, alpha 16, all-linear, lr 1e-3)
  at the plan's quick budget (80 steps of 16 reviews cut to 64 tokens, 300 held-out reviews);
  the metric is held-out accuracy.
- chat: recipes/app-chat-smollm2-lora.yaml (SmolLM2-135M, r 8, all-linear, 29 steps of 16
  dialogues, 289 held-out dialogues); the metric is the held-out loss on the assistant turns.

Runs already in the output JSON are kept and not run again, so the experiment can go one
training run per call, each under the shared lock, letting other jobs take turns in between.
Prints mean +- sample standard deviation per task and dropout over every run in the JSON.

    for task in demo chat; do for dropout in 0 0.05; do for seed in 0 1 2; do
      flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lora_dropout.py \
        --tasks $task --dropouts $dropout --seeds $seed
    done; done; done                                     # demo ~1 minute a run, chat ~3 minutes
    .venv/bin/python benchmarks/lora_dropout.py --smoke   # tiny-bert, 2 steps, a temp JSON

Each call's settings and machine are appended to the JSON's `invocations`, and each run names the
invocation that made it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import RESULTS, add_smoke_flag, machine, markdown_table, parse_with_smoke, write_json

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> Any:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="demo,chat", help="tasks to run: demo, chat")
    parser.add_argument("--dropouts", default="0,0.05", help="LoRA dropouts to compare")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps (smoke runs)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    parser.add_argument("--output", default=None, help="JSON to write (default: results/<name>)")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="a recipe override for every run (KEY=VALUE; repeatable)")  # fmt: skip
    add_smoke_flag(parser)
    smoke_sets = ["model=tiny-bert", "task.max_train_examples=32", "task.max_eval_examples=8"]
    return parse_with_smoke(parser, tasks="demo", dropouts="0.05", seeds="0", max_steps=2,
                            sets=smoke_sets)  # fmt: skip


def task_runs(task: str) -> tuple[Path, dict[str, Any], list[str]]:
    """(recipe, method section, overrides) of a task as its recipe or plan defines it."""
    if task == "demo":
        from peftkit.compare import load_plan

        plan = load_plan(ROOT / "recipes" / "compare-minilm.yaml")
        entry = next(e for e in plan.entries if e.label == "lora")
        return plan.recipe, dict(entry.method), [*plan.quick, *entry.overrides]
    if task == "chat":
        from peftkit.recipe import load_recipe

        recipe = ROOT / "recipes" / "app-chat-smollm2-lora.yaml"
        return recipe, dict(load_recipe(recipe, []).method), []
    raise SystemExit(f"unknown task {task!r}: choose demo or chat")


def train(recipe: Path, method: dict, overrides: list[str], folder: Path) -> dict[str, Any]:
    """One `peftkit train` in its own process; its summary.json."""
    command = [sys.executable, "-m", "peftkit.cli", "train", str(recipe),
               "--set", f"method={json.dumps(method)}", "--output-dir", str(folder)]  # fmt: skip
    for override in overrides:
        command += ["--set", override]
    log = folder.with_suffix(".log")
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(command)}\n{log.read_text()[-2000:]}")
    return json.loads((folder / "summary.json").read_text())


def earlier_runs(args: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs and invocations already in the output JSON (none when there is none yet). A
    JSON from before invocations were recorded holds only its last call's settings and machine:
    that call becomes the one invocation known, and its runs' invocation stays unknown."""
    path = Path(args.output) if args.output else RESULTS / "lora_dropout.json"
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    invocations = data["results"].get("invocations")
    if invocations is None:
        invocations = [{"settings": data["settings"], "machine": data["machine"],
                        "note": "the last call before calls were recorded; which runs it made "
                        "is not known"}]  # fmt: skip
    return data["results"]["runs"], invocations


def table(runs: list[dict[str, Any]]) -> str:
    """Mean +- sample standard deviation of the metric per task and dropout."""
    groups: dict[tuple, list[float]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["metric"], run["dropout"]), []).append(
            run["metric_after"]
        )
    rows = []
    for (task, metric, dropout), values in sorted(groups.items()):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cell = f"{statistics.mean(values):.4f} +- {spread:.4f}"
        rows.append([task, metric, f"{dropout:g}", cell, len(values)])
    return markdown_table(["task", "metric", "dropout", "mean +- std", "seeds"], rows)


def main() -> None:
    """Run every task x dropout x seed not yet in the JSON, print the table, write the JSON."""
    args = parse_args()
    runs, invocations = earlier_runs(args)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    invocations.append({"settings": settings, "machine": machine()})
    done = {(r["task"], r["dropout"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks.split(","):
            recipe, method, overrides = task_runs(task)
            for dropout in [float(d) for d in args.dropouts.split(",")]:
                for seed in [int(s) for s in args.seeds.split(",")]:
                    if (task, dropout, seed) in done:
                        continue
                    extra = [*args.sets, f"training.seed={seed}",
                             f"training.threads={args.threads}"]  # fmt: skip
                    if args.max_steps is not None:
                        extra.append(f"training.max_steps={args.max_steps}")
                    folder = Path(scratch) / f"{task}-{dropout:g}-{seed}"
                    summary = train(recipe, {**method, "dropout": dropout}, overrides + extra,
                                    folder)  # fmt: skip
                    runs.append({"task": task, "dropout": dropout, "seed": seed,
                                 "metric": summary["metric"],
                                 "metric_after": summary["metric_after"],
                                 "metric_before": summary["metric_before"],
                                 "final_train_loss": summary["final_train_loss"],
                                 "tokens_per_second": summary["tokens_per_second"],
                                 "train_seconds": summary["train_seconds"],
                                 "max_steps": args.max_steps, "threads": args.threads,
                                 "invocation": len(invocations) - 1})  # fmt: skip
                    print(f"{task} dropout {dropout:g} seed {seed}: {summary['metric']} "
                          f"{summary['metric_after']:.4f}", flush=True)  # fmt: skip
    print(table(runs))
    results = {"runs": runs, "invocations": invocations}
    print(f"wrote {write_json('lora_dropout', args, results, args.output)}")


if __name__ == "__main__":
    main()
