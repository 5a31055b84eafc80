"""`peftkit recommend`: which methods fit a memory budget for a model and task, best first, and why.

Every registered method (or those asked for) is estimated through `peftkit.memory.estimate`: it
is applied to the model built for the task on the meta device, so the method's own checks decide
whether it can serve at all, and its peak memory and trainable parameters are what it will really
train. Methods that fit are ranked by measured results of a `peftkit compare` run only where each
was measured on the same model and task type; otherwise by the estimate alone: more trainable
parameters within the budget first (capacity; the order of the paper numbers in METHODS.md at
small and medium scale), then the smaller peak."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, PeftkitError
from peftkit.memory import measured as measured_results
from peftkit.tables import markdown_table
from peftkit.tasks.types import higher_is_better

DEFAULT_COMPARE = Path("runs/compare/compare.json")
GIB = 2**30
_UNITS = {"": GIB, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9,
          "gib": GIB, "tb": 10**12, "tib": 2**40}  # fmt: skip


@dataclass
class Recommendation:
    """The methods considered, best first (those that fit, then the rest), and a table."""

    records: list[dict[str, Any]]
    basis: str  # "measured" (a compare run on this model and task) or "estimated"
    notes: list[str] = field(default_factory=list)
    explored: bool = False  # every storage setting was tried for each method

    @property
    def fitting(self) -> list[dict[str, Any]]:
        """The records of the methods that fit the budget, best first."""
        return [r for r in self.records if r["fits"]]

    @property
    def table(self) -> str:
        """A Markdown table of every method considered, and why it is where it is."""
        header = ["rank", "method", "fits", "est. peak", "trainable", "measured", "why"]
        if self.explored:
            header[4:4] = ["settings that fit"]
        rows = []
        for record in self.records:
            found = record["measured"]
            row = [
                str(record["rank"]) if record["rank"] else "-",
                record["label"],
                "yes" if record["fits"] else "no",
                _size(record["peak_gib"] * GIB) if record["peak_gib"] is not None else "-",
                f"{record['trainable_parameters']:,}" if record["serves"] else "-",
                f"{found['metric']} {found['value']:.4f}" if found else "-",
                record["why"],
            ]
            if self.explored:
                row[4:4] = ["; ".join(record["settings_that_fit"]) or "-"]
            rows.append(row)
        return "\n".join([markdown_table(header, rows), *self.notes])

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {"basis": self.basis, "explored": self.explored, "records": self.records,
                "notes": self.notes}  # fmt: skip

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


def _candidates(methods: Sequence[str] | None) -> list[str]:
    """The methods to consider: the given names (checked), else every registered one."""
    from peftkit.registry import get_method, method_names

    if methods is None:
        return method_names()
    for name in methods:
        get_method(name)  # an unknown name raises, suggesting the nearest
    return list(dict.fromkeys(methods))


def _record(label: str, section: dict[str, Any], budget: int, settings: dict[str, Any]) -> dict:
    """One method's record: can it serve, the settings that fit, the first of them (or the
    smallest), its estimated peak and trainable count."""
    from peftkit.memory.settings import estimates, settings_for
    from peftkit.memory.storage import refuse_unshardable
    from peftkit.registry import get_method

    record: dict[str, Any] = {
        "rank": None, "method": section["name"], "label": label, "method_section": section,
        "serves": False, "fits": False, "peak_gib": None, "trainable_parameters": None,
        "measured": None, "setting": None, "settings_that_fit": [],
    }  # fmt: skip
    try:
        method = get_method(section["name"])
        refuse_unshardable(method, settings["sharding"])
        tried = settings_for(method, settings["explore"], settings["fixed"])
        found = estimates(
            settings["model"], section, tried, settings["dtype"], settings["batch_size"],
            settings["seq_len"], settings["task"], settings["gpus"], settings["sharding"],
        )  # fmt: skip
    except (PeftkitError, ValueError, TypeError, NotImplementedError) as error:
        refusal = str(error).splitlines()[0]
        record["refusal"] = refusal  # the method's own message, in full
        record["why"] = f"cannot serve this model/task: {refusal.split('. ')[0]}"
        return record
    fitting = [(setting, e) for setting, e in found if e.total <= budget]
    setting, chosen = fitting[0] if fitting else min(found, key=lambda pair: pair[1].total)
    record.update(serves=True, trainable_parameters=chosen.trainable_parameters,
                  peak_gib=chosen.total / GIB, peak_phase=chosen.peak_phase,
                  fits=bool(fitting), estimate_notes=chosen.notes, setting=setting.as_dict(),
                  setting_label=setting.label,
                  settings_that_fit=[s.label for s, _ in fitting])  # fmt: skip
    where = f" with {setting.label}" if settings["explore"] else ""
    record["why"] = (
        f"fits{where}: {_size(chosen.total)} of {_size(budget)}"
        if record["fits"]
        else f"needs {_size(chosen.total)}{where} > budget {_size(budget)}"
    ) + f" (peak at {chosen.peak_phase})"
    return record


def _records(names: list[str], measured: list[dict[str, Any]], budget: int,
             settings: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """One record per measured compare entry (its own method section) and per method that was
    not measured (its default options); each distinct section is estimated once."""
    runs = [(m["label"], m["method_section"]) for m in measured]
    ran = {section["name"] for _, section in runs}
    runs += [(name, {"name": name}) for name in names if name not in ran]
    cache: dict[str, dict[str, Any]] = {}
    records = []
    for label, section in runs:
        key = json.dumps(section, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = _record(label, section, budget, settings)
        records.append({**cache[key], "label": label})
    return records


def _rank_measured(fitting: list[dict[str, Any]], measured: list[dict[str, Any]]) -> list[str]:
    """Attach the measured results and order the fitting records by them; notes."""
    by_label = {m["label"]: m for m in measured}
    metric = measured[0]["metric"]
    higher = higher_is_better(metric)
    for record in fitting:
        found = by_label.get(record["label"])
        if found is not None:
            record["measured"] = {"metric": found["metric"], "value": found["metric_after"],
                                  "tokens_per_second": found.get("tokens_per_second")}  # fmt: skip
            record["why"] = f"measured {metric} {found['metric_after']:.4f}; " + record["why"]

    def key(record: dict[str, Any]) -> tuple:
        found = record["measured"]
        if found is None:  # unmeasured after measured, by the estimate
            return (1, 0.0, -record["trainable_parameters"], record["peak_gib"])
        value = found["value"] if higher else -found["value"]
        return (0, -value, -(found["tokens_per_second"] or 0.0), 0.0)

    fitting.sort(key=key)
    direction = "higher" if higher else "lower"
    return [
        f"ranked by measured {metric} after training on this model and task ({direction} is "
        "better), then measured tokens/s; methods without a compare result come after, by "
        "trainable parameters"
    ]


def _nothing_fits(serving: list[dict[str, Any]], budget: int, settings: dict[str, Any]) -> str:
    """The message for a budget no method fits: what the smallest needs, and what to change."""
    smallest = min(serving, key=lambda r: r["peak_gib"])
    where = f" ({smallest['setting_label']})" if settings["explore"] else ""
    change = (
        "turn on gradient checkpointing, or store the base in bf16 or quantised (nf4), or use "
        "a 16-bit dtype"
        if not settings["explore"]
        else "or use a 16-bit training dtype"
    )
    return (
        f"Nothing fits in {_size(budget)} for {settings['model']}, {settings['task']}, batch "
        f"{settings['batch_size']} x {settings['seq_len']} tokens, {settings['dtype']}: the "
        f"smallest is {smallest['label']}{where} at {_size(smallest['peak_gib'] * GIB)}. Raise "
        f"the budget, lower the batch size or sequence length, {change}."
    )


def _check_settings(settings: dict[str, Any]) -> None:
    """Refuse an unknown dtype, a bad step shape, or a model without that task's form, once."""
    from peftkit.memory import meta
    from peftkit.memory.estimate import check_processes
    from peftkit.memory.storage import PRECISIONS, check

    fixed = settings["fixed"]
    check(settings["dtype"], fixed.base_dtype, fixed.quantization)
    check_processes(settings["gpus"], settings["sharding"])
    if settings["batch_size"] < 1 or settings["seq_len"] < 1:
        raise ConfigError(
            f"batch_size and seq_len must be at least 1: {settings['batch_size']}, "
            f"{settings['seq_len']}."
        )
    config, name = meta.resolve_config(settings["model"])
    meta.task_model(config, settings["task"], PRECISIONS["fp32"].activation_dtype, name)


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
    *,
    base_dtype: str | None = None,
    quantization: str | None = None,
    explore: bool = False,
    gpus: int = 1,
    sharding: str = "none",
) -> Recommendation:
    """The methods that fit `memory` for training `model` on `task`, best first, with reasons.
    With `explore`, each method is tried with every storage setting (memory/settings.py: the
    base in fp32, bf16, int8, nf4, each without and with gradient checkpointing) and the first
    that fits is chosen; otherwise with the one given (base_dtype, quantization, checkpointing).
    gpus, sharding: the budget is each of `gpus` processes' memory, each at `batch_size`,
    holding the whole model ("none") or an FSDP shard ("fsdp": methods that cannot be sharded
    are listed as not serving, with their record's reason)."""
    from peftkit.memory.settings import Setting

    budget = parse_memory(memory)
    fixed = Setting(base_dtype, quantization, gradient_checkpointing)
    settings = {"model": str(model), "task": task, "batch_size": batch_size,
                "seq_len": seq_len, "dtype": dtype, "explore": explore, "fixed": fixed,
                "gradient_checkpointing": gradient_checkpointing, "gpus": gpus,
                "sharding": sharding}  # fmt: skip
    _check_settings(settings)
    names = _candidates(methods)
    found = measured_results.Measured()
    # The default compare.json is used when present; a path the caller names must exist.
    if compare is not None and (Path(compare).is_file() or Path(compare) != DEFAULT_COMPARE):
        found = measured_results.load_measured(compare, str(model), task)
    measured = [m for m in found.entries if m["method_section"]["name"] in names]
    records = _records(names, measured, budget, settings)
    serving = [r for r in records if r["serves"]]
    if not serving:
        reasons = "; ".join(f"{r['label']}: {r['why']}" for r in records)
        raise ConfigError(f"No method asked for can serve {model} on task {task!r}: {reasons}")
    fitting = [r for r in serving if r["fits"]]
    if not fitting:
        raise ConfigError(_nothing_fits(serving, budget, settings))
    storage = ("every storage setting, first that fits (fp32, bf16, int8, nf4 base; then with "
               "checkpointing)") if explore else fixed.label  # fmt: skip
    processes = (
        ""
        if gpus == 1 and sharding == "none"
        else (
            f"; per process of {gpus} ({'FSDP-sharded' if sharding == 'fsdp' else 'whole model'})"
        )
    )
    notes = [f"budget {_size(budget)}; {model}, {task}, batch {batch_size} x {seq_len} tokens, "
             f"{dtype} training, {storage}{processes}", *found.notes]  # fmt: skip
    if measured:
        notes += _rank_measured(fitting, measured)
    else:
        fitting.sort(key=lambda r: (-r["trainable_parameters"], r["peak_gib"]))
        notes.append(
            "ranked by the estimate alone: trainable parameters (more capacity first), then "
            "the smaller peak; a `peftkit compare` run on this model and task ranks by quality"
        )
    for rank, record in enumerate(fitting, start=1):
        record["rank"] = rank
    rest = [r for r in records if not r["fits"]]
    rest.sort(key=lambda r: (not r["serves"], r["peak_gib"] or 0.0))
    notes.append(
        "estimates: peftkit.memory.estimate (docs/estimate.md), tensors only; add the runtime's "
        "own overhead (a CUDA context is 0.5-1 GiB; Python and its libraries)"
    )
    basis = "measured" if measured else "estimated"
    return Recommendation(fitting + rest, basis, notes, explored=explore)
