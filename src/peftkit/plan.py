"""A recipe resolved once: the method's record and its validated config, the task type and its
headline metric, and the base's storage, checked against each other. The command line resolves
a recipe into a Plan at the entry point; training, estimate, compare, combine and the UI take the
plan and never parse a method section again.

Reading a recipe (recipe.py) imports neither torch nor any method; resolving it imports the
registry, so the cheap checks (unknown keys, an earlier run's folder, a missing data file) come
first, at the entry point, and this comes second."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import registry
from peftkit.config import from_dict
from peftkit.errors import ConfigError
from peftkit.method import Method
from peftkit.recipe import Recipe
from peftkit.tasks.types import TaskType, get_task_type, headline_metric


@dataclass(frozen=True)
class Plan:
    """What a run does, resolved and checked: the recipe, the method record with its config,
    the task type with its headline metric."""

    recipe: Recipe
    method: Method
    method_config: Any
    task_type: TaskType
    metric: str

    @property
    def output(self) -> Path:
        """The run's output folder."""
        return Path(self.recipe.output_dir)

    @property
    def storage(self) -> str:
        """How the base is stored: its quantisation (nf4, int8), else its dtype (fp32, ...)."""
        return self.recipe.base.quantize or self.recipe.base.dtype


def method_from_section(section: Any) -> tuple[Method, Any]:
    """The one reader of a method section ({"name": ..., **options}; a bare name; {} for the
    registry's default; or a config object of a registered method) -> (its record, its
    validated config)."""
    if isinstance(section, str):
        section = {"name": section}
    if isinstance(section, dict) and not section:  # a recipe without a method section
        section = {"name": registry.DEFAULT_METHOD}
    if not isinstance(section, dict):
        return registry.method_for_config(section), section
    options = dict(section)
    name = options.pop("name", None)
    if not name:
        raise ConfigError(
            f"The recipe's method section needs a 'name' (for example: {registry.DEFAULT_METHOD})."
        )
    method = registry.get_method(str(name))
    return method, from_dict(method.config_cls, options, where=f"method '{name}'")


def resolve(recipe: Recipe) -> Plan:
    """The recipe's plan; any disagreement between its parts is refused here, before a model
    loads (a method that cannot train on the chosen base storage or sharded, an unknown metric)."""
    from peftkit.api import refuse_low_bit_base, refuse_unshardable

    method, config = method_from_section(recipe.method)
    task_type = get_task_type(recipe.task.type)
    plan = Plan(recipe, method, config, task_type, headline_metric(recipe.task))
    refuse_low_bit_base(method, plan.storage)
    refuse_unshardable(method, recipe.training.sharding)
    return plan
