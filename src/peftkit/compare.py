"""`peftkit compare`: run several methods on one task and budget, each in its own process (so each
peak memory is its own), then one table, JSON, CSV and a PNG chart.

A compare plan is YAML: `recipe` (the base run), `methods` (each a method section plus optional
`set` overrides, e.g. its own learning rate), and `quick` (overrides for a smoke-sized budget)."""

from __future__ import annotations

import csv
import io as text_io
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.config import read_yaml_file, unknown_key_message
from peftkit.errors import ConfigError
from peftkit.io import atomic_file, write_json_atomically, write_text_atomically
from peftkit.run_folder import check_output_dir, earlier_run
from peftkit.tables import markdown_table

PLAN_KEYS = ("recipe", "methods", "quick")
ENTRY_KEYS = ("method", "set", "label")


@dataclass(frozen=True)
class Entry:
    """One method to run: its label, method section, and recipe overrides."""

    label: str
    method: dict[str, Any]
    overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """A base recipe, the methods to run on it, and the quick budget's overrides."""

    recipe: Path
    entries: list[Entry]
    quick: list[str]


def _as_overrides(values: dict[str, Any] | None) -> list[str]:
    """{"training.max_steps": 60} -> ["training.max_steps=60"] (values as YAML flow)."""
    return [f"{key}={json.dumps(value)}" for key, value in (values or {}).items()]


def load_plan(path: str | Path) -> Plan:
    """Read and check a compare plan."""
    path = Path(path)
    data = read_yaml_file(path, "Compare plan", " (see recipes/compare-*.yaml)") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Compare plan {path} must be a YAML mapping with recipe and methods.")
    for key in data:
        if key not in PLAN_KEYS:
            raise ConfigError(unknown_key_message(key, PLAN_KEYS, f"compare plan {path}"))
    if "recipe" not in data or not data.get("methods"):
        raise ConfigError(f"Compare plan {path} needs 'recipe' and a non-empty 'methods' list.")
    recipe = Path(data["recipe"])
    if not recipe.is_absolute() and not recipe.is_file():
        recipe = path.parent / recipe
    entries = []
    for item in data["methods"]:
        item = {"method": item} if isinstance(item, str) else item
        for key in item:
            if key not in ENTRY_KEYS:
                raise ConfigError(unknown_key_message(key, ENTRY_KEYS, "a compare plan entry"))
        method = {"name": item["method"]} if isinstance(item["method"], str) else item["method"]
        label = str(item.get("label") or method["name"])
        entries.append(Entry(label, dict(method), _as_overrides(item.get("set"))))
    labels = [entry.label for entry in entries]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"Compare plan labels must be unique; repeated: {duplicates}.")
    return Plan(recipe, entries, _as_overrides(data.get("quick")))


def refuse_earlier_results(entries: list[Entry], output: Path, overwrite: bool) -> None:
    """Before anything runs: entries whose run folders hold an earlier run need --overwrite."""
    held = [entry.label for entry in entries if earlier_run(output / entry.label) is not None]
    if held and not overwrite:
        raise ConfigError(
            f"{output} already holds runs of {', '.join(held)}, which this comparison would "
            "replace. Compare into a new folder (--output-dir), or pass --overwrite to replace "
            "them (each earlier run is kept in <its folder>.previous until its new run finishes)."
        )
    for entry in entries if overwrite else []:
        check_output_dir(output / entry.label, overwrite=True)


def run_entry(
    plan: Plan, entry: Entry, output: Path, quick: bool, overwrite: bool = False
) -> dict[str, Any]:
    """Train one method in a fresh process; its summary, or a failure record with the log path."""
    run_dir = output / entry.label
    log = output / f"{entry.label}.log"
    overrides = [*(plan.quick if quick else []), *entry.overrides]
    command = [
        sys.executable, "-m", "peftkit.cli", "train", str(plan.recipe),
        "--set", f"method={json.dumps(entry.method)}", "--output-dir", str(run_dir),
        *(["--overwrite"] if overwrite else []),
    ]  # fmt: skip
    for override in overrides:
        command += ["--set", override]
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    summary_path = run_dir / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"method": entry.label, "failed": True, "error": tail[0], "log": str(log)}
    summary = json.loads(summary_path.read_text())
    summary["method"] = entry.label
    # The method section that ran (the plan's, after overrides), so that readers such as
    # `recommend` know which method and options a label stands for.
    summary["method_section"] = _ran_method(run_dir / "recipe.yaml", entry.method)
    return summary


def _ran_method(recipe: Path, planned: dict[str, Any]) -> dict[str, Any]:
    """The method section of the recipe a run wrote, else the plan's."""
    import yaml

    ran = (yaml.safe_load(recipe.read_text()) or {}).get("method") if recipe.is_file() else None
    return dict(ran or planned)


COLUMNS = [
    ("method", "method", "{}"),
    ("trainable", "trainable_parameters", "{:,}"),
    ("%", "trainable_percent", "{:.3f}"),
    ("weights MiB", "weight_memory_mib", "{:.0f}"),
    ("train MiB", "training_memory_mib", "{:.0f}"),
    ("est. MiB", "estimated_training_memory_mib", "{:.0f}"),
    ("peak MiB", "peak_memory_mib", "{:.0f}"),
    ("optim MiB", "optimizer_state_mib", "{:.2f}"),
    ("tokens/s", "tokens_per_second", "{:.0f}"),
    ("train s", "train_seconds", "{:.1f}"),
    ("metric", "metric", "{}"),
    ("before", "metric_before", "{:.4f}"),
    ("after", "metric_after", "{:.4f}"),
    ("adapter KiB", "adapter_bytes", "{:.0f}"),
]


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Formatted cells, one row per method (a failed run says where its log is)."""
    rows = []
    for result in results:
        if result.get("failed"):
            rows.append([result["method"], f"FAILED: {result['error'][:60]} ({result['log']})"])
            continue
        cells = []
        for _, key, pattern in COLUMNS:
            value = result.get(key)  # a summary from before a column existed has no value
            if value is None:
                cells.append("-")
                continue
            cells.append(pattern.format(value / 1024 if key == "adapter_bytes" else value))
        rows.append(cells)
    return rows


def format_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the results (prints well and pastes into docs)."""
    return markdown_table([name for name, _, _ in COLUMNS], table_rows(results))


def write_outputs(results: list[dict[str, Any]], output: Path) -> dict[str, Path]:
    """compare.json, compare.csv and compare.png in the output folder."""
    paths = {"json": output / "compare.json", "csv": output / "compare.csv"}
    write_json_atomically(paths["json"], results)
    table = text_io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow([key for _, key, _ in COLUMNS])
    for result in results:
        if not result.get("failed"):
            writer.writerow([result.get(key) for _, key, _ in COLUMNS])
    write_text_atomically(paths["csv"], table.getvalue())
    done = [r for r in results if not r.get("failed")]
    if done:
        paths["png"] = plot(done, output / "compare.png")
    return paths


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Quality against trainable parameters and against training memory, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results[0]["metric"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, label, log in [
        (axes[0], "trainable_parameters", "trainable parameters", True),
        (axes[1], "training_memory_mib", "training memory (MiB)", False),
    ]:
        for result in results:
            axis.scatter(result[key], result["metric_after"], s=40)
            axis.annotate(result["method"], (result[key], result["metric_after"]), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")  # fmt: skip
        if "majority_baseline" in results[0].get("eval_after", {}):
            axis.axhline(results[0]["eval_after"]["majority_baseline"], color="grey",
                         linestyle="--", linewidth=1, label="majority class")  # fmt: skip
            axis.legend(loc="lower right", fontsize=8)
        axis.set_xscale("log" if log else "linear")
        axis.set_xlabel(label)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{results[0]['model']}: {metric} after training, per method")
    figure.tight_layout()
    with atomic_file(path) as staging:
        figure.savefig(staging, dpi=110)
    plt.close(figure)
    return path


def resolve_entries(plan: Plan, entries: list[Entry], quick: bool) -> None:
    """Resolve every entry's run (the base recipe, the quick budget, the entry's overrides and
    method) into its plan before the first one trains: a misspelt option or a method that cannot
    train on the base is refused now, not after the earlier entries have run for minutes."""
    from peftkit.plan import resolve
    from peftkit.recipe import load_recipe

    for entry in entries:
        overrides = [*(plan.quick if quick else []), *entry.overrides]
        try:
            resolve(load_recipe(plan.recipe, [*overrides, f"method={json.dumps(entry.method)}"]))
        except ConfigError as error:
            raise ConfigError(f"Compare plan entry '{entry.label}': {error}") from None


def compare(
    plan_path: str | Path,
    output: str | Path,
    quick: bool = False,
    only: list[str] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run the plan's methods one after another and write the comparison. Entries whose run
    folders already hold results are refused before anything runs, unless `overwrite`."""
    plan = load_plan(plan_path)
    entries = plan.entries
    if only:
        unknown = sorted(set(only) - {e.label for e in entries})
        if unknown:
            labels = ", ".join(e.label for e in entries)
            raise ConfigError(f"Not in the compare plan: {unknown}. The plan has: {labels}.")
        entries = [e for e in entries if e.label in only]
    output = Path(output)
    refuse_earlier_results(entries, output, overwrite)
    resolve_entries(plan, entries, quick)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.perf_counter()
    for index, entry in enumerate(entries, start=1):
        print(f"[{index}/{len(entries)}] {entry.label} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        result = run_entry(plan, entry, output, quick, overwrite)
        status = "FAILED, see " + result["log"] if result.get("failed") else (
            f"{result['metric']} {result['metric_after']:.4f}"
        )  # fmt: skip
        print(f"{status} ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append(result)
    paths = write_outputs(results, output)
    print(format_table(results))
    print(
        f"total {time.perf_counter() - started:.0f} s; wrote " + ", ".join(map(str, paths.values()))
    )
    return results
