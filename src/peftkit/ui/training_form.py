"""The Train page without the page: what it shows of a data file, the recipe its form makes (checked
by the recipe's own code, so a bad value gets the CLI's message), starting `peftkit train` on it,
and reading back how the run is going. The page (train_page.py) only wires these to widgets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.recipe import Recipe, TaskConfig, recipe_from_dict, save_recipe
from peftkit.ui.jobs import Job, JobSlots, cli_command
from peftkit.ui.progress import Progress, loss_curve, training_progress
from peftkit.ui.workspace import LOG_NAME, RECIPE_NAME, Workspace

COLUMN_SUFFIX = "_column"
# Where the data comes from: the page's own widgets, not the generic task form.
DATA_FIELDS = ("type", "dataset", "train_file", "eval_file")


def column_fields() -> list[str]:
    """The task section's column-name fields (text_column, label_column, ...)."""
    return [f.name for f in dataclasses.fields(TaskConfig) if f.name.endswith(COLUMN_SUFFIX)]


def other_task_fields() -> list[str]:
    """The task section's fields the generic form shows (all but data source and columns)."""
    return [f.name for f in dataclasses.fields(TaskConfig)
            if f.name not in DATA_FIELDS and not f.name.endswith(COLUMN_SUFFIX)]  # fmt: skip


def columns_read(task_type: str) -> list[str]:
    """Which column-name fields a task type reads: its record asked with each field set to its
    own name (so the page need not know which type reads which columns)."""
    from peftkit.tasks.types import get_task_type

    named = TaskConfig(type=task_type, train_file="-", **{f: f for f in column_fields()})
    return [name for name in get_task_type(task_type).columns(named) if name in column_fields()]


def file_columns(path: Path, encoding: str = "utf-8") -> list[str]:
    """The columns of a data file, read as `peftkit train` reads it (the same errors)."""
    from peftkit.data.files import read_rows

    return sorted({key for row in read_rows(path, encoding) for key in row})


def check_data(task: dict[str, Any]) -> str:
    """Read the task's data as training would (each file checked by its task type) and say how
    many rows it holds; a problem raises the CLI's own error."""
    from peftkit.config import from_dict
    from peftkit.tasks.types import split_rows

    train, held_out = split_rows(from_dict(TaskConfig, task, where="task"))
    return f"{len(train)} training rows, {len(held_out)} held out"


def build_recipe(
    workspace: Workspace,
    model: str,
    task: dict[str, Any],
    method: dict[str, Any],
    training: dict[str, Any],
    run_name: str,
) -> Recipe:
    """The recipe the form describes, checked as `peftkit train` checks a recipe file; every
    path in it is inside the workspace."""
    for key in ("train_file", "eval_file"):
        if task.get(key):
            task[key] = str(workspace.resolve(task[key]))
    data = {
        "model": workspace.model(model),
        "task": task,
        "method": method,
        "training": training,
        "output_dir": str(workspace.run_folder(run_name)),
    }
    recipe = recipe_from_dict(data)
    from peftkit.plan import resolve

    resolve(recipe)  # the method section and the base storage, refused before Start writes
    return recipe


def start_training(slots: JobSlots, recipe: Recipe) -> Job:
    """Write the recipe into its run folder and start `peftkit train` on it. A folder holding an
    earlier run is refused first, with the CLI's message, and left as it was."""
    from peftkit.run_folder import check_output_dir

    output = Path(recipe.output_dir)
    check_output_dir(output)
    output.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, output / RECIPE_NAME)
    return slots.start("train", cli_command("train", str(output / RECIPE_NAME)), output / LOG_NAME)


def resume_training(slots: JobSlots, run: Path) -> Job:
    """Continue a run the Train page started from its newest checkpoint (`peftkit train
    --resume` on the recipe the page wrote)."""
    from peftkit.ui.workspace import WorkspaceError

    recipe = run / RECIPE_NAME
    if not recipe.is_file():
        raise WorkspaceError(
            f"{run} has no {RECIPE_NAME}: only runs started from this page can be resumed here; "
            "resume others with `peftkit train RECIPE --resume`."
        )
    command = cli_command("train", str(recipe), "--resume")
    return slots.start("train", command, run / LOG_NAME)


@dataclass(frozen=True)
class RunStatus:
    """What the page shows of a training run."""

    state: str  # the job's state
    progress: Progress | None
    curve: list[tuple[int, float]]
    summary: dict[str, Any] | None
    log_tail: str

    def headline(self) -> str:
        """One line: state, step, time left and the last logged loss."""
        parts = [self.state]
        if self.progress is not None:
            parts.append(str(self.progress))
        if self.curve:
            step, loss = self.curve[-1]
            parts.append(f"loss {loss:.4f} at step {step}")
        return " · ".join(parts)


def run_status(job: Job, run: Path) -> RunStatus:
    """The run's state now, from its process, its log, its TensorBoard events and summary."""
    text = job.text()
    summary_path = run / "summary.json"
    summary = None
    if not job.running and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    tail = "\n".join(text.replace("\r", "\n").splitlines()[-15:])
    return RunStatus(job.state, training_progress(text), loss_curve(run), summary, tail)
