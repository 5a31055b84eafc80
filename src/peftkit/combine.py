"""`peftkit combine`: several trained runs of one method family on one base, combined each way
through the method record's composition capability (LoRA's: methods/lora/compose.py), and every
combination scored on each source task's held-out data.

Each source is a run folder (its `recipe.yaml` says the base, the task and the data; its
`adapter/` the weights). Everything that can be refused is refused before a model loads or a file
is written: different bases, non-LoRA adapters, different target modules, unequal ranks where a
combination needs equal ones, weights that do not match the sources, a density outside (0, 1].

The table has one row per model (the base, each source alone, each combination) and, per source
task, the task's headline metric and the share of that source adapter's gain over the base the
row keeps: kept = (m_row - m_base) / (m_source - m_base), 1.0 for the source itself on its own
task. A combination that keeps less than 1 - max_loss of any task's gain is flagged."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from peftkit import api, io, registry
from peftkit.data.collate import Collator
from peftkit.errors import AdapterError, ConfigError
from peftkit.method import Composition
from peftkit.plan import Plan, resolve
from peftkit.recipe import Recipe, load_recipe
from peftkit.tables import markdown_table
from peftkit.tasks.types import (
    TaskData,
    get_task_type,
    higher_is_better,
    split_rows,
)


@dataclass
class Source:
    """One trained run: its name in the table, its resolved plan and its adapter folder."""

    name: str
    plan: Plan
    adapter: Path
    saved: dict[str, Any] = field(default_factory=dict)  # its adapter_config.json

    @property
    def recipe(self) -> Recipe:
        """The recipe the run trained with."""
        return self.plan.recipe


@dataclass(frozen=True)
class Combination:
    """One way of combining all the sources."""

    how: str
    weights: tuple[float, ...]
    density: float | None = None
    svd_rank: int | None = None

    @property
    def label(self) -> str:
        """A short name for tables, folders and PEFT's adapter name (no dots): how, and the
        density in percent where it prunes (ties_svd-d50)."""
        if self.density is None:
            return self.how
        return f"{self.how}-d{self.density * 100:g}".replace(".", "_")


def read_sources(specs: list[str]) -> list[Source]:
    """Sources from 'path' or 'name=path' (a run folder, or its adapter/ folder)."""
    if len(specs) < 2:
        raise ConfigError(f"Combine needs at least two runs, got {len(specs)}.")
    sources = []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        folder = Path(path)
        run = folder.parent if folder.name == "adapter" else folder
        if not (run / "recipe.yaml").is_file() or not (run / "adapter").is_dir():
            raise ConfigError(
                f"{path} is not a finished peftkit run: combine reads a run folder holding "
                "recipe.yaml (the task to score on) and adapter/."
            )
        saved = io.read_json(run / "adapter" / io.CONFIG_NAME, io.CONFIG_NAME)
        plan = resolve(load_recipe(run / "recipe.yaml"))
        source = Source(name or run.name, plan, run / "adapter", saved)
        sources.append(source)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"Two runs share a name ({names}): name them, e.g. reviews=runs/a.")
    check_sources(sources)
    return sources


def _targets(saved: dict[str, Any]) -> Any:
    """An adapter's target modules, comparable across adapters."""
    targets = saved.get("target_modules")
    return sorted(targets) if isinstance(targets, list) else targets


def composition_of(source: Source) -> Composition:
    """The composition capability of the method that wrote a source's adapter, or a refusal."""
    method = registry.method_for_saved(source.saved)
    if method.composition is None:
        raise AdapterError(
            f"Run '{source.name}' trained {method.name}, whose adapters do not combine; "
            f"these do: {', '.join(m.name for m in registry.METHODS if m.composition)}."
        )
    return method.composition


def check_sources(sources: list[Source]) -> None:
    """Refuse sources that cannot be combined, before anything loads."""
    compositions = {source.name: composition_of(source) for source in sources}
    if len(set(map(id, compositions.values()))) > 1:
        raise AdapterError(
            "The runs trained methods of different families "
            f"({ {s.name: s.plan.method.name for s in sources} }): combine one family."
        )
    for source in sources:
        try:
            compositions[source.name].check_source(source.saved)
        except AdapterError as error:
            raise AdapterError(f"Run '{source.name}': {error}") from None
    bases = {s.name: s.recipe.model for s in sources}
    if len(set(bases.values())) > 1:
        raise AdapterError(f"The runs were trained on different base models: {bases}.")
    auto = {s.name: s.plan.task_type.auto_class().__name__ for s in sources}
    if len(set(auto.values())) > 1 or any(s.recipe.task.type == "classification" for s in sources):
        raise AdapterError(
            f"The runs need one model class and no task head of their own to share one base "
            f"(their task types: { {s.name: s.recipe.task.type for s in sources} })."
        )
    first = sources[0]
    for source in sources[1:]:
        if _targets(source.saved) != _targets(first.saved):
            raise AdapterError(
                f"Runs '{first.name}' and '{source.name}' adapt different modules "
                f"({_targets(first.saved)} vs {_targets(source.saved)}): combine adapters "
                "trained with the same target_modules."
            )


def plan(
    sources: list[Source], hows: list[str], weights: list[float] | None,
    density: float | None = None, svd_rank: int | None = None,
) -> list[Combination]:  # fmt: skip
    """The combinations to build, each checked (weights default to 1 / number of sources)."""
    weights = list(weights) if weights else [1.0 / len(sources)] * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"Give one weight per run: {len(sources)} runs, {len(weights)} weights.")
    composition = composition_of(sources[0])
    ranks = {s.name: composition.rank(s.saved) for s in sources}
    combinations = []
    for how in hows:
        if how not in composition.how:
            raise ConfigError(
                f"Unknown combination '{how}'; use one of: {', '.join(composition.how)}."
            )
        if how in composition.equal_ranks and len(set(ranks.values())) > 1:
            raise AdapterError(
                f"Combination '{how}' merges the A and B factors one by one and needs equal "
                f"ranks; the runs' ranks are {ranks}. Use cat, task_arithmetic, svd or an "
                "'_svd' form."
            )
        prunes = how.startswith(("ties", "dare", "magnitude"))
        composition.check_density(how, density if prunes else None)
        if svd_rank is not None and svd_rank < 1:
            raise ConfigError(f"--svd-rank must be at least 1, got {svd_rank}.")
        rank = svd_rank if how.endswith("svd") else None
        combinations.append(Combination(how, tuple(weights), density if prunes else None, rank))
    labels = [c.label for c in combinations]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"A combination is named twice in --how ({' '.join(hows)}): once each.")
    return combinations


def load_sources(sources: list[Source]) -> tuple[Any, Any]:
    """The shared base with every source's adapter loaded under its name (the method's own
    composition loads them, converting any that trained on a rewritten base)."""
    from peftkit.models import load_model

    recipe = sources[0].recipe
    base, tokenizer = load_model(recipe.model, recipe.task.type, seed=recipe.training.seed)
    with tempfile.TemporaryDirectory() as scratch:
        folders = {}
        for source in sources:
            folder = source.adapter
            conversion = registry.method_for_saved(source.saved).conversion
            if conversion is not None and conversion.needed(source.saved):
                folder = api.convert(base, folder, Path(scratch) / source.name)
                print(f"converted '{source.name}' for the original base (its method's "
                      "conversion)")  # fmt: skip
            folders[source.name] = folder
        return composition_of(sources[0]).load(base, folders), tokenizer


def task_data(source: Source, tokenizer: Any, max_eval_examples: int | None) -> TaskData:
    """A source task's held-out features, as its run evaluated them."""
    task = source.recipe.task
    if max_eval_examples is not None:
        task = dataclasses.replace(task, max_eval_examples=max_eval_examples)
    train, held_out = split_rows(task)
    return get_task_type(task.type).prepare(task, tokenizer, train[:1], held_out)


def score(model: nn.Module, source: Source, data: TaskData, tokenizer: Any) -> dict[str, float]:
    """The source task's metrics for the model's active adapter (or the base when disabled)."""
    task_type = source.plan.task_type
    batch = source.recipe.training.eval_batch_size
    return task_type.evaluate(model, data, Collator(tokenizer.pad_token_id), batch)


def kept_share(value: float, base: float, own: float) -> float | None:
    """The share of a source adapter's gain over the base a model keeps (None: no gain)."""
    gain = own - base
    return None if gain == 0 else (value - base) / gain


def flags(rows: dict[str, dict[str, float]], sources: list[Source], max_loss: float) -> dict:
    """Per combination row, the tasks on which it keeps less than 1 - max_loss of the gain."""
    flagged: dict[str, list[str]] = {}
    names = {s.name for s in sources}
    for label, metrics in rows.items():
        if label == "base" or label in names:
            continue
        lost = []
        for source in sources:
            base, own = rows["base"][source.name], rows[source.name][source.name]
            improves = (own < base) != higher_is_better(source.plan.metric)
            share = kept_share(metrics[source.name], base, own)
            if improves and share is not None and share < 1.0 - max_loss:
                lost.append(source.name)
        if lost:
            flagged[label] = lost
    return flagged


def table(rows: dict[str, dict[str, float]], sources: list[Source], flagged: dict) -> str:
    """One row per model: each task's headline metric and kept share, and the flag."""
    header = ["model"]
    for source in sources:
        metric = source.plan.metric
        header += [f"{source.name} {metric}", f"{source.name} kept"]
    header.append("flag")
    body = []
    for label, metrics in rows.items():
        cells = [label]
        for source in sources:
            base, own = rows["base"][source.name], rows[source.name][source.name]
            share = kept_share(metrics[source.name], base, own)
            cells += [f"{metrics[source.name]:.4f}", "-" if share is None else f"{share:.2f}"]
        cells.append("LOSES " + ", ".join(flagged[label]) if label in flagged else "")
        body.append(cells)
    return markdown_table(header, body)


def run_combine(
    sources: list[Source], combinations: list[Combination], max_loss: float = 0.1,
    max_eval_examples: int | None = None, save_adapters: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Build every combination, score every model on every source task; the report as data."""
    composition = composition_of(sources[0])
    model, tokenizer = load_sources(sources)
    data = {s.name: task_data(s, tokenizer, max_eval_examples) for s in sources}
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    method = registry.method_for_saved(sources[0].saved)
    with method.switch_off(model)():  # the base column: every adapter switched off
        metrics["base"] = {s.name: score(model, s, data[s.name], tokenizer) for s in sources}
    names = [s.name for s in sources]
    for label in names + [c.label for c in combinations]:
        if label not in names:
            combination = next(c for c in combinations if c.label == label)
            composition.combine(
                model, names, list(combination.weights), label, how=combination.how,
                density=combination.density, svd_rank=combination.svd_rank,
            )  # fmt: skip
            if save_adapters is not None:
                composition.save(model, label, save_adapters / label)
        composition.activate(model, label)
        metrics[label] = {s.name: score(model, s, data[s.name], tokenizer) for s in sources}
    headline = {
        label: {s.name: values[s.name][s.plan.metric] for s in sources}
        for label, values in metrics.items()
    }
    flagged = flags(headline, sources, max_loss)
    return {
        "sources": {s.name: str(s.adapter) for s in sources},
        "base_model": sources[0].recipe.model,
        "combinations": [dataclasses.asdict(c) | {"label": c.label} for c in combinations],
        "max_loss": max_loss,
        "metrics": metrics,
        "headline": headline,
        "flagged": flagged,
        "table": table(headline, sources, flagged),
    }
