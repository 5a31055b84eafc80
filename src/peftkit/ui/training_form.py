"""The Train page without the page: what it shows of a data file, the recipe its form makes (checked
by the recipe's own code, so a bad value gets the CLI's message), starting `peftkit train` on it,
and reading back how the run is going. The page (train_page.py) only wires these to widgets."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.recipe import Recipe, TaskConfig, recipe_from_dict, save_recipe
from peftkit.ui.jobs import Job, JobSlots, cli_command
from peftkit.ui.progress import (
    Progress,
    clean_output,
    loss_curve,
    training_phase,
    training_progress,
    without_interrupt_traceback,
)
from peftkit.ui.workspace import LOG_NAME, RECIPE_NAME, Workspace

COLUMN_SUFFIX = "_column"
# What Start says instead of starting when the estimate is above the free memory.
CONFIRM_UNFIT = (
    "**The estimate does NOT fit** the free memory (below): training would likely run out of "
    "memory. Press Start again to start anyway, or change the settings."
)
SAVED_RECIPES = "recipes"  # in the workspace: the Train forms saved as recipes
DATA_FOLDER = "data"  # in a run folder: the copies of the data files it trains on
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


@functools.cache
def bundled_columns(name: str) -> list[str]:
    """The columns of a bundled data set's rows (read once)."""
    from peftkit.data.bundled import load_bundled

    train, _ = load_bundled(name)
    return sorted({key for row in train for key in row})


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


def keep_data(recipe: Recipe, run: Path) -> Recipe:
    """The recipe reading copies of its data files kept in the run folder (`<run>/data/`): a
    later upload of the same name, or an edit of the file, cannot change what resuming or
    re-evaluating the run reads. A bundled data set is left as it is."""
    import shutil

    from peftkit.io import atomic_file

    task, copies = recipe.task, {}
    for key in ("train_file", "eval_file"):
        source = getattr(task, key)
        if not source:
            continue
        target = run / DATA_FOLDER / Path(source).name
        if key == "eval_file" and target.exists():  # the two files share a name
            target = target.with_name(f"eval-{target.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as staging:
            shutil.copyfile(source, staging)
        copies[key] = str(target)
    return dataclasses.replace(recipe, task=dataclasses.replace(task, **copies))


def start_training(slots: JobSlots, recipe: Recipe) -> Job:
    """Write the recipe into its run folder, with copies of its data files, and start `peftkit
    train` on it. A folder holding an earlier run, or a training still running, is refused first
    (with the CLI's message for the folder) and nothing is written."""
    from peftkit.run_folder import check_output_dir

    output = Path(recipe.output_dir)
    check_output_dir(output)
    slots.check_free("train")
    output.mkdir(parents=True, exist_ok=True)
    recipe = keep_data(recipe, output)
    save_recipe(recipe, output / RECIPE_NAME)
    return slots.start("train", cli_command("train", str(output / RECIPE_NAME)), output / LOG_NAME)


def save_form_recipe(workspace: Workspace, recipe: Recipe) -> Path:
    """Write the recipe a Train form describes as `<workspace>/recipes/<run name>.yaml`, for
    `peftkit train` in a terminal; an existing file of that name is refused, not replaced."""
    from peftkit.ui.workspace import WorkspaceError

    path = workspace.resolve(Path(SAVED_RECIPES) / f"{Path(recipe.output_dir).name}.yaml")
    if path.exists():
        raise WorkspaceError(f"{path} already exists; choose another run name to save the form.")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, path)
    return path


def resume_training(slots: JobSlots, run: Path) -> Job:
    """Continue a run the Train page started from its newest checkpoint (`peftkit train
    --resume` on the recipe the page wrote); its output goes on in the same log."""
    from peftkit.ui.workspace import WorkspaceError

    recipe = run / RECIPE_NAME
    if not recipe.is_file():
        raise WorkspaceError(
            f"{run} has no {RECIPE_NAME}: only runs started from this page can be resumed here; "
            "resume others with `peftkit train RECIPE --resume`."
        )
    command = cli_command("train", str(recipe), "--resume")
    return slots.start("train", command, run / LOG_NAME, append=True)


@dataclass(frozen=True)
class RunStatus:
    """What the page shows of a training run."""

    state: str  # the job's state
    progress: Progress | None
    curve: list[tuple[int, float]]
    summary: dict[str, Any] | None
    log_tail: str
    phase: str = ""  # what a running training is doing (progress.training_phase)

    def headline(self) -> str:
        """One line: state, what it is doing, step, time left and the last logged loss."""
        parts = [self.state]
        if self.state == "running" and self.phase and self.phase != "training":
            parts.append(self.phase)
        if self.progress is not None:  # time left only while it trains
            training = self.state == "running" and self.phase == "training"
            parts.append(self.progress.describe(training))
        if self.curve:
            step, loss = self.curve[-1]
            parts.append(f"loss {loss:.4f} at step {step}")
        return " · ".join(parts)


def run_status(job: Job, run: Path) -> RunStatus:
    """The run's state now, from its process, its log, its TensorBoard events and summary."""
    text = clean_output(job.text())
    if job.stop_requested:
        text = without_interrupt_traceback(text)
    summary_path = run / "summary.json"
    summary = None
    if not job.running and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    tail = "\n".join(text.replace("\r", "\n").splitlines()[-15:])
    bar = training_progress(text)
    phase = training_phase(text, bar)
    return RunStatus(job.state, bar, loss_curve(run), summary, tail or "(no output yet)", phase)


def recipe_sources(workspace: Workspace) -> dict[str, Path]:
    """Recipes the Train form can be filled from, by the name the page shows: the forms saved
    in `recipes/`, then each run's recipe (the Train page's `ui-recipe.yaml`, or the
    `recipe.yaml` a finished `peftkit train` keeps), newest run first."""
    found = {p.relative_to(workspace.root).as_posix(): p
             for p in sorted(workspace.root.glob(f"{SAVED_RECIPES}/*.yaml"))}  # fmt: skip
    for run in workspace.runs():
        for name in (RECIPE_NAME, "recipe.yaml"):
            if (run.path / name).is_file():
                found[f"{run.name}/{name}"] = run.path / name
                break
    return found


def load_form_recipe(workspace: Workspace, name: str) -> Recipe:
    """A recipe of `recipe_sources` read and checked as `peftkit train` reads it."""
    from peftkit.recipe import load_recipe
    from peftkit.ui.workspace import WorkspaceError

    sources = recipe_sources(workspace)
    if name not in sources:
        raise WorkspaceError(
            f"No recipe {name!r} in the workspace: choose a saved recipe or a run's recipe."
        )
    return load_recipe(workspace.resolve(sources[name]))


def clone_name(workspace: Workspace, recipe: Recipe) -> str:
    """A new run name for a copy of the recipe's run: `<name>-copy`, then `-copy-2`, ..."""
    stem = Path(recipe.output_dir).name or "run"
    name, number = f"{stem}-copy", 1
    while (workspace.root / name).exists():
        number += 1
        name = f"{stem}-copy-{number}"
    return name


# An upload's format: the fields its records hold as the task types read them (tasks/
# conversations.py), the required ones first; the page maps the file's columns onto them.
FORMATS = {
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output", "input", "system"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
}
OPTIONAL_FIELDS = ("input", "system")
WRITTEN_AS = {"completion": "response"}  # the name peftkit's readers give a field
MAPPED_SUFFIX = ".jsonl"


def mapped_rows(
    rows: list[dict[str, Any]], kind: str, mapping: dict[str, str | None]
) -> list[dict[str, Any]]:
    """Rows as records of format `kind`, each field read from the column `mapping` names for
    it (an optional field without a column is left out)."""
    from peftkit.errors import DataError

    if kind not in FORMATS:
        raise DataError(f"Unknown data format {kind!r}; choose one of {', '.join(FORMATS)}.")
    columns = {key for row in rows for key in row}
    chosen = {}
    for name in FORMATS[kind]:
        column = mapping.get(name) or None
        if column is None:
            if name in OPTIONAL_FIELDS:
                continue
            raise DataError(f"The {kind} format needs a column for '{name}': choose one.")
        if column not in columns:
            raise DataError(f"The file has no column {column!r} (its columns: {sorted(columns)}).")
        chosen[WRITTEN_AS.get(name, name)] = column
    return [{field: _plain(row.get(column)) for field, column in chosen.items()} for row in rows]


def _plain(value: Any) -> Any:
    """A cell as JSON holds it (Parquet's arrays as lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def write_mapped(workspace: Workspace, uploaded: Path, kind: str, mapping: dict[str, Any]) -> Path:
    """Write an upload's rows in format `kind` as a new JSONL file of `uploads/`
    (`<stem>-<format>.jsonl`; the upload itself is left as it was); returns it."""
    import tempfile

    from peftkit.data.files import read_rows
    from peftkit.io import write_text_atomically
    from peftkit.ui.workspace import UI_FILES

    rows = mapped_rows(read_rows(uploaded), kind, mapping)
    scratch = workspace.root / UI_FILES
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        staging = Path(folder) / f"{uploaded.stem}-{kind}{MAPPED_SUFFIX}"
        lines = (json.dumps(row, ensure_ascii=False, default=str) for row in rows)
        write_text_atomically(staging, "".join(f"{line}\n" for line in lines))
        return workspace.save_upload(staging)


def _shown_path(workspace: Workspace, path: str) -> str:
    """A path as the page shows it: relative to the workspace when inside it."""
    resolved = Path(path).resolve()
    inside = resolved.is_relative_to(workspace.root)
    return resolved.relative_to(workspace.root).as_posix() if inside else path


@dataclass(frozen=True)
class FormValues:
    """What the Train form shows for a recipe: its sections' values by field (every field of
    the task and training sections; the method's as the recipe gives them)."""

    model: str
    run_name: str
    dataset: str | None
    train_file: str | None  # relative to the workspace when inside it
    task: dict[str, Any]
    method: dict[str, Any]
    training: dict[str, Any]


def form_values(workspace: Workspace, recipe: Recipe) -> FormValues:
    """The Train form's values for `recipe`, its run name a new one (a clone of its run)."""
    from peftkit.config import to_dict

    model = recipe.model
    if Path(model).is_absolute():  # a model folder of the workspace
        model = _shown_path(workspace, model)
    task = to_dict(recipe.task)
    train_file = task.get("train_file")
    return FormValues(
        model, clone_name(workspace, recipe), task.get("dataset"),
        _shown_path(workspace, train_file) if train_file else None,
        task, dict(recipe.method), to_dict(recipe.training),
    )  # fmt: skip
