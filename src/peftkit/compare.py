"""`peftkit compare`: run several methods on one task and budget, each in its own process (so each
peak memory is its own), then one table, JSON, CSV and a PNG chart.

A compare plan is YAML: `recipe` (the base run), `methods` (each a method section plus optional
`set` overrides, e.g. its own learning rate), and `quick` (overrides for a smoke-sized budget).

Throughput is the steady state: the median of per-step tokens/s after the first WARMUP_STEPS steps
(optimizer state allocation and the memory probe's profiled window), with its quartiles, and each
entry records the machine's load while it ran. With `seeds` > 1 every entry runs once per seed
(the recipe's seed, then the next ones); a method's row holds the mean and standard deviation over
its seeds, and two methods differ beyond the noise when a paired t-test over the seeds they share
rejects equal means at the 5% level (two-sided)."""

from __future__ import annotations

import csv
import io as text_io
import json
import math
import os
import platform
import statistics
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
WARMUP_STEPS = 2  # left out of the steady-state throughput: optimizer state, profiled window
# Two-sided 5% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


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


def refuse_earlier_results(
    entries: list[Entry], output: Path, overwrite: bool, names: list[str] | None = None
) -> None:
    """Before anything runs: run folders that hold an earlier run need --overwrite. The folders
    are the entries' labels, or `names` (the per-seed folders of a comparison over seeds)."""
    names = names if names is not None else [entry.label for entry in entries]
    held = [name for name in names if earlier_run(output / name) is not None]
    if held and not overwrite:
        raise ConfigError(
            f"{output} already holds runs of {', '.join(held)}, which this comparison would "
            "replace. Compare into a new folder (--output-dir), or pass --overwrite to replace "
            "them (each earlier run is kept in <its folder>.previous until its new run finishes)."
        )
    for name in names if overwrite else []:
        check_output_dir(output / name, overwrite=True)


def run_name(entry: Entry, seed: int | None) -> str:
    """The entry's run folder name: its label, with the seed when the comparison has several."""
    return entry.label if seed is None else f"{entry.label}-seed{seed}"


def run_entry(
    plan: Plan,
    entry: Entry,
    output: Path,
    quick: bool,
    overwrite: bool = False,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train one method in a fresh process; its summary, or a failure record with the log path.
    `seed` (when given) replaces the recipe's training.seed and names the run folder."""
    run_dir = output / run_name(entry, seed)
    log = output / f"{run_name(entry, seed)}.log"
    overrides = [*(plan.quick if quick else []), *entry.overrides]
    overrides += [f"training.seed={seed}"] if seed is not None else []
    command = [
        sys.executable, "-m", "peftkit.cli", "train", str(plan.recipe),
        "--set", f"method={json.dumps(entry.method)}", "--output-dir", str(run_dir),
        *(["--overwrite"] if overwrite else []),
    ]  # fmt: skip
    for override in overrides:
        command += ["--set", override]
    load_before = machine_load()
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    summary_path = run_dir / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"method": entry.label, "failed": True, "error": tail[0], "log": str(log)}
    summary = json.loads(summary_path.read_text())
    summary["method"] = entry.label
    # The method section and training settings that ran (the plan's, after overrides), so that
    # readers such as `recommend` know which method and options a label stands for.
    ran = _ran_recipe(run_dir / "recipe.yaml")
    summary["method_section"] = dict(ran.get("method") or entry.method)
    training = ran.get("training") or {}
    summary["learning_rate"] = training.get("learning_rate")
    summary["seed"] = training.get("seed", seed)
    summary["machine"] = {**load_before, "load_average_after": machine_load()["load_average"]}
    summary.update(steady_state(summary))
    return summary


def _ran_recipe(recipe: Path) -> dict[str, Any]:
    """The recipe a run wrote (its method and training sections), else nothing."""
    import yaml

    return (yaml.safe_load(recipe.read_text()) or {}) if recipe.is_file() else {}


def machine_load() -> dict[str, Any]:
    """What the machine was and how busy: CPU model, cores, and the 1/5/15-minute load average
    (a load above the cores means other jobs shared them, so tokens/s is lower than alone)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "load_average": load}


def quantile(values: list[float], fraction: float) -> float:
    """The `fraction` quantile of values, linearly interpolated between order statistics."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def steady_rates(summary: dict[str, Any]) -> tuple[list[float], int]:
    """Per-step tokens/s after the first WARMUP_STEPS steps (all steps when the run was no
    longer), from a run's per-step record, and how many steps were left out."""
    seconds, tokens = summary.get("step_seconds") or [], summary.get("step_tokens") or []
    skipped = WARMUP_STEPS if len(seconds) > WARMUP_STEPS else 0
    pairs = zip(seconds[skipped:], tokens[skipped:], strict=True)
    return [count / spent for spent, count in pairs if spent > 0], skipped


def steady_state(summary: dict[str, Any]) -> dict[str, Any]:
    """The steady-state throughput of a run: the median of its per-step tokens/s after the
    warm-up, with the quartiles as its spread; nothing for a summary without the record."""
    rates, skipped = steady_rates(summary)
    if not rates:
        return {}
    return {
        "tokens_per_second_mean_run": summary.get("tokens_per_second"),
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_p25": quantile(rates, 0.25),
        "tokens_per_second_p75": quantile(rates, 0.75),
        "throughput_steps": len(rates),
        "throughput_warmup_steps": skipped,
        "throughput_measure": f"median of per-step tokens/s over steps {skipped + 1}-"
        f"{skipped + len(rates)} (quartiles as spread)",
    }


COLUMNS = [
    ("method", "method", "{}"),
    ("lr", "learning_rate", "{:.1e}"),
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
            if key == "tokens_per_second" and result.get("tokens_per_second_p25") is not None:
                cells[-1] += " ({:.0f}-{:.0f})".format(
                    result["tokens_per_second_p25"], result["tokens_per_second_p75"]
                )
            if key == "metric_after" and result.get("metric_after_sd") is not None:
                cells[-1] += " +-{:.4f}".format(result["metric_after_sd"])
        rows.append(cells)
    return rows


def format_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the results (prints well and pastes into docs): tokens/s is the
    steady-state median with its quartiles; after is the mean over seeds +- their standard
    deviation when there are several."""
    return markdown_table([name for name, _, _ in COLUMNS], table_rows(results))


def aggregate(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's row from its runs over several seeds: the first run's record with the metric's
    mean and standard deviation, the pooled steady-state throughput, and each run's own figures
    under `runs`. A method any of whose seeds failed is a failure naming that run's log."""
    failed = [run for run in runs if run.get("failed")]
    if failed:
        return {**failed[0], "method": label, "runs": runs}
    values = [run["metric_after"] for run in runs]
    row = {
        key: value for key, value in runs[0].items() if key not in ("step_seconds", "step_tokens")
    }
    rates = [rate for run in runs for rate in steady_rates(run)[0]]
    row.update(
        metric_after=statistics.fmean(values),
        metric_after_sd=statistics.stdev(values) if len(values) > 1 else 0.0,
        train_seconds=statistics.fmean(run["train_seconds"] for run in runs),
        seeds=[run["seed"] for run in runs],
        runs=[{key: run.get(key) for key in RUN_KEYS} for run in runs],
    )
    if rates:
        row.update(
            tokens_per_second=statistics.median(rates),
            tokens_per_second_p25=quantile(rates, 0.25),
            tokens_per_second_p75=quantile(rates, 0.75),
            throughput_steps=len(rates),
            throughput_measure="median of per-step tokens/s over every seed's steps after "
            f"its first {WARMUP_STEPS} (quartiles as spread)",
        )
    return row


RUN_KEYS = ("seed", "metric_after", "tokens_per_second", "tokens_per_second_p25",
            "tokens_per_second_p75", "train_seconds", "learning_rate", "machine",
            "adapter_dir")  # fmt: skip


def paired_difference(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any] | None:
    """first's metric minus second's over the seeds both ran, with the 95% half-width of a paired
    t-test; `exceeds_noise` when the mean difference is larger than that half-width. None with
    fewer than two shared seeds."""
    a = {run["seed"]: run["metric_after"] for run in first.get("runs", [])}
    b = {run["seed"]: run["metric_after"] for run in second.get("runs", [])}
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return None
    differences = [a[seed] - b[seed] for seed in shared]
    mean = statistics.fmean(differences)
    spread = statistics.stdev(differences)
    t = T_975[len(shared) - 2] if len(shared) - 1 <= len(T_975) else 1.96
    half = t * spread / math.sqrt(len(shared))
    return {"mean_difference": mean, "half_width_95": half, "seeds": shared,
            "exceeds_noise": abs(mean) > half}  # fmt: skip


def add_differences(rows: list[dict[str, Any]]) -> list[str]:
    """Each successful row's paired differences against the others (in `differences`, by
    label); the lines naming the pairs whose difference exceeds the noise."""
    done = [row for row in rows if not row.get("failed") and row.get("runs")]
    lines = []
    for row in done:
        row["differences"] = {}
        for other in done:
            found = paired_difference(row, other) if other is not row else None
            if found is None:
                continue
            row["differences"][other["method"]] = found
            if found["exceeds_noise"] and found["mean_difference"] > 0:
                lines.append(
                    f"{row['method']} > {other['method']}: {row['metric']} "
                    f"{found['mean_difference']:+.4f} +- {found['half_width_95']:.4f} "
                    f"(paired t, 95%, seeds {found['seeds']})"
                )
    return lines


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


def resolve_entries(plan: Plan, entries: list[Entry], quick: bool) -> dict[str, int]:
    """Resolve every entry's run (the base recipe, the quick budget, the entry's overrides and
    method) into its plan before the first one trains: a misspelt option or a method that cannot
    train on the base is refused now, not after the earlier entries have run for minutes. Each
    entry's training seed, by label."""
    from peftkit.plan import resolve
    from peftkit.recipe import load_recipe

    seeds = {}
    for entry in entries:
        overrides = [*(plan.quick if quick else []), *entry.overrides]
        try:
            recipe = load_recipe(plan.recipe, [*overrides, f"method={json.dumps(entry.method)}"])
            resolve(recipe)
        except ConfigError as error:
            raise ConfigError(f"Compare plan entry '{entry.label}': {error}") from None
        seeds[entry.label] = recipe.training.seed
    return seeds


def compare(
    plan_path: str | Path,
    output: str | Path,
    quick: bool = False,
    only: list[str] | None = None,
    overwrite: bool = False,
    seeds: int = 1,
) -> list[dict[str, Any]]:
    """Run the plan's methods one after another and write the comparison. Entries whose run
    folders already hold results are refused before anything runs, unless `overwrite`. With
    `seeds` > 1 each entry runs once per seed (its recipe's seed and the next ones)."""
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be a whole number of at least 1, got {seeds!r}.")
    plan = load_plan(plan_path)
    entries = plan.entries
    if only:
        unknown = sorted(set(only) - {e.label for e in entries})
        if unknown:
            labels = ", ".join(e.label for e in entries)
            raise ConfigError(f"Not in the compare plan: {unknown}. The plan has: {labels}.")
        entries = [e for e in entries if e.label in only]
    output = Path(output)
    base_seeds = resolve_entries(plan, entries, quick)
    runs = [
        (entry, None if seeds == 1 else base_seeds[entry.label] + k)
        for entry in entries
        for k in range(seeds)
    ]
    names = [run_name(entry, seed) for entry, seed in runs]
    refuse_earlier_results(entries, output, overwrite, names)
    output.mkdir(parents=True, exist_ok=True)
    done: dict[str, list[dict[str, Any]]] = {entry.label: [] for entry in entries}
    started = time.perf_counter()
    for index, (entry, seed) in enumerate(runs, start=1):
        print(f"[{index}/{len(runs)}] {run_name(entry, seed)} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        result = run_entry(plan, entry, output, quick, overwrite, seed)
        status = "FAILED, see " + result["log"] if result.get("failed") else (
            f"{result['metric']} {result['metric_after']:.4f}"
        )  # fmt: skip
        print(f"{status} ({time.perf_counter() - t0:.0f} s)", flush=True)
        done[entry.label].append(result)
    if seeds == 1:
        results, noise = [found[0] for found in done.values()], []
    else:
        results = [aggregate(label, found) for label, found in done.items()]
        noise = add_differences(results)
    paths = write_outputs(results, output)
    print(format_table(results))
    if seeds > 1:
        print(f"differences beyond the noise over {seeds} seeds (paired t-test, 95%): "
              + ("; ".join(noise) if noise else "none"))  # fmt: skip
    print(
        f"total {time.perf_counter() - started:.0f} s; wrote " + ", ".join(map(str, paths.values()))
    )
    return results
