"""Measured results from a `peftkit compare` run, as `recommend` may use them: which method and
options each entry ran, and whether it was measured on the model and task type asked about.

A result from another model or task says nothing reliable about this one (MiniLM's review accuracy
does not rank methods for SmolLM2's causal LM), so such results are set aside with a note."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError


@dataclass
class Measured:
    """The compare entries usable for this model and task, and why any others were set aside."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def method_section(result: dict[str, Any], compare_path: Path) -> dict[str, Any] | None:
    """The method section a compare entry ran: recorded in the result by `peftkit compare`, or
    in the recipe.yaml of its run folder (compare.json files written before it recorded them)."""
    if isinstance(result.get("method_section"), dict):
        return result["method_section"]
    recipe = compare_path.parent / str(result["method"]) / "recipe.yaml"
    if not recipe.is_file():
        return None
    import yaml

    section = (yaml.safe_load(recipe.read_text()) or {}).get("method")
    return {"name": section} if isinstance(section, str) else section


def read_compare(path: str | Path) -> list[dict[str, Any]]:
    """The results list of a compare.json, or a ConfigError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No compare results at {path}: run `peftkit compare` first, or omit it.")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); is it a compare.json?") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise ConfigError(f"{path} should hold a list of compare results (compare.json).")
    return results


def load_measured(path: str | Path, model: str, task: str) -> Measured:
    """The successful entries of a compare.json measured on `model` for `task`, each with its
    label and method section; notes for the entries set aside."""
    path = Path(path)
    found = Measured()
    elsewhere: set[str] = set()
    unknown: list[str] = []
    for result in read_compare(path):
        if result.get("failed") or "metric_after" not in result:
            continue
        label = str(result.get("method"))
        where = (str(result.get("model")), str(result.get("task")))
        if where != (model, task):
            elsewhere.add(f"{where[0]} ({where[1]})")
            continue
        section = method_section(result, path)
        if not section or not section.get("name"):
            unknown.append(label)
            continue
        found.entries.append({**result, "label": label, "method_section": dict(section)})
    if elsewhere:
        found.notes.append(
            f"set aside the compare results in {path} measured on {', '.join(sorted(elsewhere))}: "
            f"they do not rank methods for {model} ({task})"
        )
    if unknown:
        found.notes.append(
            f"set aside compare entries {', '.join(unknown)}: the result records no method "
            "section and its run folder no recipe.yaml, so which method ran is unknown"
        )
    return found
