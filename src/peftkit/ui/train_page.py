"""The Train page: model, data, method (its form from the registry), budget; the memory estimate
before starting; then `peftkit train` as a child process with live progress, a loss curve, Stop,
and the summary table at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gradio as gr

from peftkit.errors import DataError
from peftkit.recipe import TaskConfig, TrainConfig
from peftkit.ui import training_form as tf
from peftkit.ui.forms import field_specs, method_descriptions, method_forms
from peftkit.ui.jobs import JobSlots
from peftkit.ui.widgets import error_line, escape_markdown, form, guarded, read_form, widget_id
from peftkit.ui.workspace import Workspace

SOURCES = ("bundled data set", "uploaded file")
# The Train page's starting values where they differ from a recipe's: TensorBoard events feed
# the loss curve, and checkpoints are what Stop keeps.
TRAINING_DEFAULTS = {"report_to": "tensorboard", "save_steps": 20, "logging_steps": 5}
# The training fields shown first (the budget); the others fold away.
BUDGET = ("max_steps", "batch_size", "learning_rate", "save_steps", "logging_steps")


class Widgets:
    """The page's inputs and outputs, by role (a namespace the event handlers share)."""


def _settings(workspace: Workspace, w: Widgets) -> None:
    """The left column: model, data, method and budget."""
    from peftkit.data.bundled import dataset_names
    from peftkit.models import bundled_names
    from peftkit.recipe import Recipe
    from peftkit.registry import DEFAULT_METHOD
    from peftkit.tasks.types import task_names

    defaults = Recipe()
    with gr.Row():
        w.model = gr.Dropdown(
            bundled_names(), value=defaults.model, allow_custom_value=True, label="model",
            elem_id="train-model", info="a bundled model, or a model folder in the workspace",
        )  # fmt: skip
        w.run_name = gr.Textbox(label="run name", elem_id="train-run-name", max_lines=1,
                                info=f"a new folder in {workspace.root}")  # fmt: skip
    with gr.Row():
        w.task_type = gr.Dropdown(task_names(), value=defaults.task.type, label="task type",
                                  elem_id="train-task-type")  # fmt: skip
        w.source = gr.Radio(list(SOURCES), value=SOURCES[0], label="data",
                            elem_id="train-source")  # fmt: skip
        w.dataset = gr.Dropdown(dataset_names(), value=defaults.task.dataset, label="data set",
                                elem_id="train-dataset")  # fmt: skip
    w.upload = gr.File(label="data file (CSV, JSON, JSONL or Parquet)", file_types=[
        ".csv", ".json", ".jsonl", ".parquet"], type="filepath", visible=False,
        elem_id="train-upload")  # fmt: skip
    w.uploaded = gr.Textbox(visible=False, elem_id="train-uploaded")  # its path in the workspace
    read = tf.columns_read(defaults.task.type)
    with gr.Row():
        w.columns = {name: gr.Dropdown([], value=getattr(defaults.task, name), label=name,
                                       allow_custom_value=True, visible=name in read,
                                       elem_id=widget_id("train", name))
                     for name in tf.column_fields()}  # fmt: skip
    w.data_status = gr.Markdown(elem_id="train-data-status")
    w.task_specs = [s for s in field_specs(TaskConfig) if s.name in tf.other_task_fields()]
    with gr.Accordion("task options", open=False):
        w.task_widgets = form(w.task_specs, "task")

    w.forms, w.descriptions = method_forms(), method_descriptions()
    w.method = gr.Dropdown(list(w.forms), value=DEFAULT_METHOD, label="method",
                           elem_id="train-method")  # fmt: skip
    w.description = gr.Markdown(w.descriptions[DEFAULT_METHOD])
    w.groups, w.method_widgets = {}, {}
    for name, specs in w.forms.items():
        with gr.Group(visible=name == DEFAULT_METHOD) as w.groups[name]:
            w.method_widgets[name] = form(specs, "method") if specs else []
            if not specs:
                gr.Markdown("This method has no options.")

    specs = field_specs(TrainConfig)
    w.training_specs = [s for s in specs if s.name in BUDGET]
    w.more_specs = [s for s in specs if s.name not in BUDGET]
    w.training_widgets = form(w.training_specs, "training", TRAINING_DEFAULTS)
    with gr.Accordion("more training settings", open=False):
        w.more_widgets = form(w.more_specs, "training", TRAINING_DEFAULTS)


def _results(w: Widgets) -> None:
    """The right column: buttons, estimate, progress, loss curve, summary, output."""
    with gr.Row():
        w.estimate_button = gr.Button("Estimate memory", elem_id="train-estimate")
        w.start_button = gr.Button("Start", variant="primary", elem_id="train-start")
        w.stop_button = gr.Button("Stop", variant="stop", elem_id="train-stop")
    w.estimate_box = gr.Markdown(elem_id="train-estimate-result")
    # What Start, Stop or a refusal just said; the job's own state is the status line below it,
    # which every open page redraws (a reply there would be overwritten by the next tick).
    w.message = gr.Markdown(elem_id="train-message")
    w.status = gr.Markdown(elem_id="train-status")
    w.curve = gr.LinePlot(x="step", y="loss", label="training loss", elem_id="train-loss",
                          height=260)  # fmt: skip
    w.summary = gr.Markdown(elem_id="train-summary")
    with gr.Accordion("output", open=False, elem_id="train-output"):
        w.log = gr.Code(label="last lines of the run's output", elem_id="train-log")
    # Always on: any page open while a job runs (a reload, a second tab, a run resumed from the
    # Runs page) attaches to it at the next tick; a tick with nothing new changes nothing.
    w.timer = gr.Timer(1.0)
    w.shown = gr.State(None)  # the job state this page last drew (Job.key)
    w.unfit = gr.State(None)  # the recipe whose estimate did not fit, shown once before Start


def build(workspace: Workspace, slots: JobSlots) -> None:
    """The page's widgets and events (inside a gr.Tab)."""
    w = Widgets()
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            _settings(workspace, w)
        with gr.Column(scale=2):
            _results(w)
    _events(workspace, slots, w)


def _events(workspace: Workspace, slots: JobSlots, w: Widgets) -> None:
    """What each widget does."""
    columns = w.columns
    form_inputs = {w.model, w.run_name, w.task_type, w.source, w.dataset, w.uploaded, w.method,
                   *columns.values(), *w.task_widgets, *w.training_widgets, *w.more_widgets,
                   *(x for xs in w.method_widgets.values() for x in xs)}  # fmt: skip

    def task_section(data: dict[Any, Any]) -> dict[str, Any]:
        section = read_form(w.task_specs, w.task_widgets, data, "task")
        section["type"] = data[w.task_type]
        if data[w.source] == SOURCES[0]:
            section["dataset"] = data[w.dataset]
            # A bundled set's columns as the task type names them by default go unsaid; others
            # (copy-words' source and target as a causal-lm's prompt and response) are set.
            for name in tf.columns_read(data[w.task_type]):
                if data[columns[name]] != getattr(TaskConfig, name):
                    section[name] = data[columns[name]]
            return section
        if not data[w.uploaded]:
            raise DataError("Upload a data file first (CSV, JSON, JSONL or Parquet).")
        section["train_file"] = str(workspace.resolve(data[w.uploaded]))
        for name in tf.columns_read(data[w.task_type]):
            section[name] = data[columns[name]]
        return section

    def recipe_of(data: dict[Any, Any]) -> Any:
        chosen = data[w.method]
        section = {"name": chosen}
        section |= read_form(w.forms[chosen], w.method_widgets[chosen], data, "method")
        training = read_form(w.training_specs, w.training_widgets, data, "training")
        training |= read_form(w.more_specs, w.more_widgets, data, "training")
        stamp = time.strftime("%m%d-%H%M%S")
        name = data[w.run_name].strip() or f"{chosen}-{Path(data[w.model]).name}-{stamp}"
        return tf.build_recipe(workspace, data[w.model], task_section(data), section, training,
                               name)  # fmt: skip

    def show_columns(kind: str, where: str, dataset: str, uploaded: str) -> list[Any]:
        # The pickers the task type reads, offering the columns the data has (a bundled set's
        # too: its columns need not be the ones the task type reads by default).
        read = tf.columns_read(kind)
        if where == SOURCES[0]:
            found = tf.bundled_columns(dataset) if dataset else []
        else:
            found = tf.file_columns(workspace.resolve(uploaded)) if uploaded else []
        return [gr.update(visible=name in read, choices=found) for name in columns]

    def on_source(where: str, kind: str, dataset: str, uploaded: str) -> list[Any]:
        bundled = where == SOURCES[0]
        return [gr.update(visible=bundled), gr.update(visible=not bundled),
                *show_columns(kind, where, dataset, uploaded)]  # fmt: skip

    picked = [w.task_type, w.source, w.dataset, w.uploaded]
    w.source.change(on_source, [w.source, w.task_type, w.dataset, w.uploaded],
                    [w.dataset, w.upload, *columns.values()])  # fmt: skip
    for trigger in (w.task_type, w.dataset):
        trigger.change(show_columns, picked, list(columns.values()))

    def on_upload(path: str | None) -> list[Any]:
        if not path:
            return ["", "", *(gr.update(choices=[]) for _ in columns)]
        saved = workspace.save_upload(path)
        found = tf.file_columns(saved)
        relative = saved.relative_to(workspace.root).as_posix()
        return ["", relative, *(gr.update(choices=found) for _ in columns)]

    upload_outputs = [w.data_status, w.uploaded, *columns.values()]
    w.upload.upload(guarded(on_upload, 2 + len(columns)), [w.upload], upload_outputs)
    # Clearing the file forgets it: Start then asks for one instead of training on the last.
    w.upload.clear(lambda: on_upload(None), None, upload_outputs)

    def check(data: dict[Any, Any]) -> str:
        return "data: " + tf.check_data(task_section(data))

    # Each change of the data or its columns reads it again, as training would.
    for trigger in (w.uploaded, *columns.values(), w.dataset, w.task_type):
        trigger.change(guarded(check), form_inputs, w.data_status)

    def on_method(chosen: str) -> list[Any]:
        return [w.descriptions[chosen], *(gr.update(visible=n == chosen) for n in w.groups)]

    w.method.change(on_method, w.method, [w.description, *w.groups.values()])

    def estimate(data: dict[Any, Any]) -> str:
        from peftkit.ui.fit import check_fit

        return check_fit(recipe_of(data)).markdown()

    w.estimate_button.click(guarded(estimate), form_inputs, w.estimate_box)

    def start(data: dict[Any, Any]) -> list[Any]:
        from peftkit.config import to_dict
        from peftkit.recipe import recipe_to_dict
        from peftkit.ui.fit import check_fit

        recipe = recipe_of(data)
        tf.check_data(to_dict(recipe.task))  # a data problem shows here, not in a log
        fit = check_fit(recipe)
        settings = json.dumps(recipe_to_dict(recipe), sort_keys=True, default=str)
        if fit.fits is False and data[w.unfit] != settings:
            return [tf.CONFIRM_UNFIT, fit.markdown(), settings]
        job = tf.start_training(slots, recipe)
        return [f"started: `{job.describe()}`", fit.markdown(), None]

    w.start_button.click(guarded(start, 3), form_inputs | {w.unfit},
                         [w.message, w.estimate_box, w.unfit])  # fmt: skip

    def stop() -> str:
        job = slots.get("train")
        if job is None or not job.running:
            return "Nothing is training."
        job.stop()
        return "stopping: the run ends at its next step; its checkpoints stay."

    w.stop_button.click(stop, None, w.message)

    def poll(shown: Any) -> list[Any]:
        job = slots.get("train")
        if job is None or (list(job.key) == shown and not job.running):
            return [gr.update()] * 5  # nothing new: the page stays as it is
        run = job.log.parent
        state = tf.run_status(job, run)
        summary = _summary_text(state, run)
        earlier = " (started by an earlier peftkit ui)" if job.adopted else ""
        return [state.headline() + earlier, _curve_frame(state.curve), summary, state.log_tail,
                list(job.key)]  # fmt: skip

    w.timer.tick(poll, w.shown, [w.status, w.curve, w.summary, w.log, w.shown])


def _curve_frame(points: list[tuple[int, float]]) -> Any:
    """The loss curve as the table gr.LinePlot draws. Typed even when empty: the plot keeps the
    axis kinds of the first table it gets, and an empty one's would be text (a discrete axis)."""
    import pandas as pd

    return pd.DataFrame(points, columns=["step", "loss"]).astype({"step": int, "loss": float})


def _summary_text(state: tf.RunStatus, run: Path) -> str:
    """The summary table once finished; where a stopped run's checkpoints are."""
    if state.summary is not None:
        from peftkit.training.run import format_summary

        return f"```\n{format_summary(state.summary)}\n```\nwrote `{run / 'summary.json'}`"
    if state.state == "stopped":
        kept = sorted((run / "checkpoints").glob("checkpoint-*"),
                      key=lambda p: int(p.name.split("-")[1]))  # fmt: skip
        where = f"newest checkpoint `{kept[-1].name}`" if kept else "no checkpoint yet"
        return (f"Stopped; {where} in `{run}`. Continue it with `peftkit train "
                f"{run / tf.RECIPE_NAME} --resume`, or Resume on the Runs page.")  # fmt: skip
    if state.state == "failed":
        return (f"**The run failed:** {escape_markdown(error_line(state.log_tail))} (the whole "
                f"output: `{run / tf.LOG_NAME}`)")  # fmt: skip
    return ""
