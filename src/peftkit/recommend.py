"""`peftkit recommend`: which methods fit a memory budget for a task, best first, and why.

For each registered method: can it serve this model and task at all (it is applied to the model
built on the meta device: no memory, its own checks decide)? What peak memory will one training
step take (peftkit.estimate, docs/estimate.md)? Methods that fit are ranked by the measured
results of a `peftkit compare` run when one exists (compare.json: the task metric after
training, then tokens/s), else by their trainable parameters: with nothing measured, more
trainable capacity within the budget is the better prior (full fine-tuning, then the LoRA family
and adapters, then BitFit and soft prompts: the order of the paper numbers in METHODS.md)."""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, PeftkitError

DEFAULT_COMPARE = Path("runs/compare/compare.json")
GIB = 2**30
_UNITS = {"": GIB, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9,
          "gib": GIB, "tb": 10**12, "tib": 2**40}  # fmt: skip

# How each method's memory is estimated: the estimator's method whose accounting it shares, and
# how close that is. Methods that add parameters ("lora", "prompt-tuning" here) are then corrected
# to the method's exact trainable count, from the method applied on the meta device.
MEMORY_MODELS: dict[str, tuple[str, str]] = {
    "full": ("full", "exact accounting"),
    "lora": ("lora", "exact accounting"),
    "rslora": ("lora", "exact: LoRA's tensors, another scale"),
    "relora": ("lora", "exact between restarts: LoRA's tensors"),
    "dora": ("lora", "LoRA's accounting plus the magnitude vectors; DoRA's norm activations not "
                     "counted (a lower bound)"),
    "adalora": ("lora", "LoRA's accounting with AdaLoRA's parameter count"),
    "bottleneck": ("lora", "approximate: LoRA-like accounting with the adapters' parameter count"),
    "bitfit": ("bitfit", "exact accounting"),
    "child_tuning": ("full", "upper bound: full fine-tuning's (gradients of every weight)"),
    "prompt_tuning": ("prompt-tuning", "exact accounting"),
    "prefix_tuning": ("prompt-tuning", "approximate: prompt tuning's accounting with the "
                                       "prefix parameters"),
}  # fmt: skip
_ADDED = ("lora", "prompt-tuning")


@dataclass
class Recommendation:
    """The methods considered, best first (those that fit, then the rest), and a table."""

    records: list[dict[str, Any]]
    basis: str  # "measured" (a compare run) or "estimated"
    notes: list[str] = field(default_factory=list)

    @property
    def fitting(self) -> list[dict[str, Any]]:
        """The records of the methods that fit the budget, best first."""
        return [r for r in self.records if r["fits"]]

    @property
    def table(self) -> str:
        """A Markdown table of every method considered, and why it is where it is."""
        header = ["rank", "method", "fits", "est. peak", "trainable", "measured", "why"]
        rows = []
        for record in self.records:
            measured = record.get("measured")
            rows.append([
                str(record["rank"]) if record["rank"] else "-",
                record["label"],
                "yes" if record["fits"] else "no",
                _size(record["peak_gib"] * GIB) if record["peak_gib"] is not None else "-",
                f"{record['trainable_parameters']:,}" if record["trainable_parameters"] else "-",
                f"{measured['metric']} {measured['value']:.4f}" if measured else "-",
                record["why"],
            ])  # fmt: skip
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(header), rule, *(line(r) for r in rows), *self.notes])

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {"basis": self.basis, "records": self.records, "notes": self.notes}

    def __str__(self) -> str:
        return self.table


def _size(count: float) -> str:
    """Bytes as GiB, MiB below one GiB, KiB below one MiB."""
    if count >= GIB:
        return f"{count / GIB:.2f} GiB"
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def parse_memory(memory: str | float | int) -> int:
    """Bytes from a budget: a number of GiB, or a string such as "8GiB", "512MiB", "16GB"."""
    if isinstance(memory, int | float) and not isinstance(memory, bool):
        value, unit = float(memory), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(memory))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"Cannot read the memory budget {memory!r}: give a number with a unit, such as "
                "8GiB, 512MiB or 16GB (a bare number means GiB)."
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ConfigError(f"The memory budget must be positive, got {memory!r}.")
    return int(value * _UNITS[unit])


def _meta_task_model(model: str, task: str) -> Any:
    """The model for a task type, built on the meta device (shapes only), or a ConfigError."""
    from peftkit.estimate import resolve_config
    from peftkit.models import meta_model

    config, _ = resolve_config(model)
    return meta_model(config, task)


def _serve(model: Any, method: str) -> tuple[int | None, str | None]:
    """(trainable parameters, None) if the method applies to this model, else (None, why not)."""
    import torch

    import peftkit

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tuned = peftkit.apply(copy.deepcopy(model), peftkit.config_for(method))
    except (PeftkitError, ValueError, TypeError, NotImplementedError) as error:
        return None, str(error).splitlines()[0]
    return sum(p.numel() for p in tuned.parameters() if p.requires_grad), None


def _estimate(model: str, method: str, trainable: int, task: dict[str, Any]) -> Any:
    """The estimator's peak for a method (through its memory model), corrected to `trainable`."""
    from peftkit.estimate import PRECISIONS, estimate

    proxy, _ = MEMORY_MODELS[method]
    result = estimate(model, proxy, task["batch_size"], task["seq_len"], task["dtype"],
                      task["gradient_checkpointing"])  # fmt: skip
    if proxy in _ADDED and trainable:
        precision = PRECISIONS[task["dtype"]]
        extra = trainable - result.trainable_parameters
        result.weights += extra * precision.weight
        result.gradients += extra * precision.gradient
        result.optimizer += extra * precision.optimizer
        result.trainable_parameters = trainable
    return result


def _saved_method(compare_path: Path, label: str) -> str | None:
    """The method name a compare entry ran, from the recipe.yaml compare wrote beside it."""
    recipe = compare_path.parent / label / "recipe.yaml"
    if not recipe.is_file():
        return None
    import yaml

    data = yaml.safe_load(recipe.read_text()) or {}
    return (data.get("method") or {}).get("name")


def _method_of(label: str, compare_path: Path, names: Sequence[str]) -> str | None:
    """The registered method behind a compare label ("child_tuning_f" -> "child_tuning")."""
    saved = _saved_method(compare_path, label)
    if saved in names:
        return saved
    if label in names:
        return label
    prefixes = [name for name in names if label.startswith(name + "_")]
    return max(prefixes, key=len) if prefixes else None


def load_measured(path: str | Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """The successful entries of a compare.json, each with its registered method name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No compare results at {path}: run `peftkit compare` first, or omit it.")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); is it a compare.json?") from None
    if not isinstance(results, list):
        raise ConfigError(f"{path} should hold a list of compare results (compare.json).")
    measured = []
    for result in results:
        if result.get("failed") or "metric_after" not in result:
            continue
        method = _method_of(str(result["method"]), path, names)
        if method is not None:
            measured.append({**result, "label": str(result["method"]), "method_name": method})
    return measured


def _higher_is_better(metric: str) -> bool:
    """Whether a larger value of the metric is better (losses and perplexity: no)."""
    from peftkit.tasks import higher_is_better

    return higher_is_better(metric)


def _candidates(methods: Sequence[str] | None) -> list[str]:
    """The methods to consider: the given ones (checked), else every registered one."""
    from peftkit.registry import get_method, method_names

    if methods is None:
        return [name for name in method_names() if name in MEMORY_MODELS]
    for name in methods:
        get_method(name)  # an unknown name raises, suggesting the nearest
        if name not in MEMORY_MODELS:
            raise ConfigError(
                f"peftkit recommend has no memory model for method {name!r} yet; it can rank: "
                f"{', '.join(MEMORY_MODELS)}."
            )
    return list(methods)


def _record(method: str, label: str, budget: int, task: dict[str, Any], meta: Any) -> dict:
    """One method's record: can it serve, its estimated peak, whether that fits, and why."""
    record: dict[str, Any] = {
        "rank": None, "method": method, "label": label, "fits": False, "peak_gib": None,
        "trainable_parameters": None, "memory_basis": MEMORY_MODELS[method][1], "measured": None,
    }  # fmt: skip
    trainable, refusal = _serve(meta, method)
    if refusal is not None:
        record["refusal"] = refusal  # the method's own message, in full
        record["why"] = f"cannot serve this model/task: {refusal.split('. ')[0]}"
        record["serves"] = False
        return record
    record["serves"] = True
    estimate = _estimate(task["model"], method, trainable, task)
    record["trainable_parameters"] = estimate.trainable_parameters
    record["peak_gib"] = estimate.total / GIB
    record["peak_phase"] = estimate.peak_phase
    record["fits"] = estimate.total <= budget
    record["why"] = (
        f"fits: {_size(estimate.total)} of {_size(budget)}"
        if record["fits"]
        else f"needs {_size(estimate.total)} > budget {_size(budget)}"
    ) + f" ({MEMORY_MODELS[method][1]}; peak at {estimate.peak_phase})"
    return record


def _rank_measured(
    fitting: list[dict[str, Any]], measured: list[dict[str, Any]], model: str
) -> list[str]:
    """Attach the measured results and order the fitting records by them; notes."""
    by_label = {m["label"]: m for m in measured}
    metric = measured[0]["metric"]
    higher = _higher_is_better(metric)
    for record in fitting:
        found = by_label.get(record["label"])
        if found is not None:
            record["measured"] = {"metric": found["metric"], "value": found["metric_after"],
                                  "tokens_per_second": found.get("tokens_per_second"),
                                  "model": found.get("model")}  # fmt: skip
            record["why"] = f"measured {metric} {found['metric_after']:.4f}; " + record["why"]

    def key(record: dict[str, Any]) -> tuple:
        found = record["measured"]
        if found is None:  # unmeasured after measured, by capacity
            return (1, 0.0, -(record["trainable_parameters"] or 0))
        value = found["value"] if higher else -found["value"]
        return (0, -value, -(found["tokens_per_second"] or 0.0))

    fitting.sort(key=key)
    direction = "higher" if higher else "lower"
    notes = [
        f"ranked by measured {metric} after training ({direction} is better), then measured "
        "tokens/s; methods without a compare result come after, by trainable parameters"
    ]
    models = sorted({str(m.get("model")) for m in measured})
    if models != [model]:
        notes.append(f"note: the compare results were measured on {', '.join(models)}, not {model}")
    return notes


def _nothing_fits(serving: list[dict[str, Any]], budget: int, settings: dict[str, Any]) -> str:
    """The message for a budget no method fits: what the smallest needs, and what to change."""
    smallest = min(serving, key=lambda r: r["peak_gib"])
    return (
        f"Nothing fits in {_size(budget)} for {settings['model']}, {settings['task']}, batch "
        f"{settings['batch_size']} x {settings['seq_len']} tokens, {settings['dtype']}: the "
        f"smallest is {smallest['label']} at {_size(smallest['peak_gib'] * GIB)}. Raise the "
        "budget, lower the batch size or sequence length, turn on gradient checkpointing, or "
        "use a 16-bit dtype."
    )


def _rank_estimated(fitting: list[dict[str, Any]]) -> list[str]:
    """Order the fitting records by trainable parameters (capacity), then peak; notes."""
    fitting.sort(key=lambda r: (-(r["trainable_parameters"] or 0), r["peak_gib"]))
    return [
        "no compare results: methods that fit are ranked by trainable parameters (more "
        "capacity first); run `peftkit compare` to rank them by measured quality"
    ]


def _records(names: list[str], measured: list[dict[str, Any]], budget: int,
             settings: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """One record per compare label (measured methods) and per remaining method."""
    meta = _meta_task_model(settings["model"], settings["task"])
    labels = [(m["method_name"], m["label"]) for m in measured]
    labels += [(name, name) for name in names if name not in {m for m, _ in labels}]
    cache: dict[str, dict[str, Any]] = {}
    records = []
    for method, label in labels:
        if method not in cache:  # a method measured under two labels is estimated once
            cache[method] = _record(method, label, budget, settings, meta)
        records.append({**cache[method], "label": label})
    return records


def recommend(
    memory: str | float,
    model: str,
    task: str,
    batch_size: int = 16,
    seq_len: int = 128,
    dtype: str = "fp32",
    gradient_checkpointing: bool = False,
    methods: Sequence[str] | None = None,
    compare: str | Path | None = DEFAULT_COMPARE,
) -> Recommendation:
    """The methods that fit `memory` for training `model` on `task`, best first, with reasons."""
    from peftkit.estimate import PRECISIONS
    from peftkit.registry import method_names

    budget = parse_memory(memory)
    if dtype not in PRECISIONS:
        raise ConfigError(f"Unknown dtype {dtype!r}; use one of: {', '.join(PRECISIONS)}.")
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be at least 1: {batch_size}, {seq_len}.")
    names = _candidates(methods)
    settings = {"model": model, "task": task, "batch_size": batch_size, "seq_len": seq_len,
                "dtype": dtype, "gradient_checkpointing": gradient_checkpointing}  # fmt: skip
    measured: list[dict[str, Any]] = []
    # The default compare.json is used when present; a path the caller names must exist.
    if compare is not None and (Path(compare).is_file() or Path(compare) != DEFAULT_COMPARE):
        measured = [m for m in load_measured(compare, method_names()) if m["method_name"] in names]
    records = _records(names, measured, budget, settings)
    serving = [r for r in records if r["serves"]]
    if not serving:
        reasons = "; ".join(f"{r['label']}: {r['why']}" for r in records)
        raise ConfigError(f"No method asked for can serve {model} on task {task!r}: {reasons}")
    fitting = [r for r in serving if r["fits"]]
    if not fitting:
        raise ConfigError(_nothing_fits(serving, budget, settings))
    checkpointing = ", gradient checkpointing" if gradient_checkpointing else ""
    notes = [f"budget {_size(budget)}; {model}, {task}, batch {batch_size} x {seq_len} tokens, "
             f"{dtype}{checkpointing}"]  # fmt: skip
    notes += _rank_measured(fitting, measured, model) if measured else _rank_estimated(fitting)
    for rank, record in enumerate(fitting, start=1):
        record["rank"] = rank
    rest = [r for r in records if not r["fits"]]
    rest.sort(key=lambda r: (not r["serves"], r["peak_gib"] or 0.0))
    notes.append(
        "estimates: peftkit.estimate (docs/estimate.md), tensors only; add the runtime's own "
        "overhead (a CUDA context is 0.5-1 GiB; Python and its libraries)"
    )
    return Recommendation(fitting + rest, "measured" if measured else "estimated", notes)
