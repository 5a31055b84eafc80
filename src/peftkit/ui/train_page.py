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
from peftkit.ui.widgets import (
    error_line,
    escape_markdown,
    form,
    guarded,
    polled,
    read_form,
    widget_id,
)
from peftkit.ui.workspace import Workspace, WorkspaceError

SOURCES = ("bundled data set", "uploaded file")
# The Train page's starting values where they differ from a recipe's: TensorBoard events feed
# the loss curve, and checkpoints are what Stop keeps.
TRAINING_DEFAULTS = {"report_to": "tensorboard", "save_steps": 20, "logging_steps": 5}
# The training fields shown first (the budget); the others fold away.
BUDGET = (
    "max_steps",
    "batch_size",
    "learning_rate",
    "save_steps",
    "save_total_limit",
    "logging_steps",
)
MAPPED_FIELDS = max(len(fields) for fields in tf.FORMATS.values())  # field pickers of a format


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
        w.load_source = gr.Dropdown([], label="load settings from", elem_id="train-load-source",
                                    info="a saved recipe, or an earlier run's (to clone it)",
                                    scale=3)  # fmt: skip
        w.load_button = gr.Button("Load", elem_id="train-load", scale=0)
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
    w.original = gr.State("")  # the file as uploaded (w.uploaded: it, or its mapped copy)
    with gr.Accordion("format of the uploaded file", open=False, visible=False,
                      elem_id="train-format-box") as w.format_box:  # fmt: skip
        gr.Markdown(
            "Records in one of these formats, their fields read from the columns you "
            "choose; **Apply** writes them as a new JSONL file of `uploads/` that the run "
            "reads (chat reads every format; causal-lm reads prompt and response)."
        )
        with gr.Row():
            w.format = gr.Dropdown(list(tf.FORMATS), value=None, label="format",
                                   elem_id="train-format")  # fmt: skip
            w.format_fields = [gr.Dropdown([], label=f"field {i + 1}", visible=False,
                                           elem_id=f"train-format-field-{i + 1}")
                               for i in range(MAPPED_FIELDS)]  # fmt: skip
        w.format_apply = gr.Button("Apply format", elem_id="train-format-apply")
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
        w.save_button = gr.Button("Save recipe", elem_id="train-save")
        w.preview_button = gr.Button("Preview data", elem_id="train-preview-button")
        w.stop_button = gr.Button("Stop", variant="stop", elem_id="train-stop")
    w.estimate_box = gr.Markdown(elem_id="train-estimate-result")
    w.preview = gr.HTML(elem_id="train-preview")
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


def build(workspace: Workspace, slots: JobSlots, shown: list[Any]) -> None:
    """The page's widgets and events (inside a gr.Tab); `shown` are the events on which the
    recipes it can load are read again."""
    w = Widgets()
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            _settings(workspace, w)
        with gr.Column(scale=2):
            _results(w)
    _events(workspace, slots, w)
    _load_events(workspace, w, shown)
    _data_events(workspace, w)


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
        return [
            gr.update(visible=bundled),
            gr.update(visible=not bundled),
            gr.update(visible=not bundled),
            *show_columns(kind, where, dataset, uploaded),
        ]

    picked = [w.task_type, w.source, w.dataset, w.uploaded]
    w.source.change(on_source, [w.source, w.task_type, w.dataset, w.uploaded],
                    [w.dataset, w.upload, w.format_box, *columns.values()])  # fmt: skip
    for trigger in (w.task_type, w.dataset):
        trigger.change(show_columns, picked, list(columns.values()))

    def on_upload(path: str | None) -> list[Any]:
        if not path:
            return ["", "", "", *(gr.update(choices=[]) for _ in columns)]
        saved = workspace.save_upload(path)
        found = tf.file_columns(saved)
        relative = saved.relative_to(workspace.root).as_posix()
        return ["", relative, relative, *(gr.update(choices=found) for _ in columns)]

    upload_outputs = [w.data_status, w.uploaded, w.original, *columns.values()]
    w.upload.upload(guarded(on_upload, 3 + len(columns)), [w.upload], upload_outputs)
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

    def save(data: dict[Any, Any]) -> str:
        path = tf.save_form_recipe(workspace, recipe_of(data))
        return f"saved `{path}`; `peftkit train {path}` trains it from a terminal."

    w.saved = w.save_button.click(guarded(save), form_inputs, w.message)

    def preview(data: dict[Any, Any]) -> str:
        import html

        from peftkit.errors import PeftkitError
        from peftkit.ui.preview import preview_html, preview_rows

        try:
            rows = preview_rows(task_section(data), workspace.model(data[w.model]))
        except PeftkitError as error:
            return f"<p><b>peftkit: error:</b> {html.escape(str(error))}</p>"
        return preview_html(rows)

    w.preview_button.click(preview, form_inputs, w.preview)

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
        # The state is taken once, before the files are read: a job ending meanwhile is drawn
        # again at the next tick (taken after, the end would be recorded as drawn, unseen).
        key = list(job.key) if job is not None else None
        if job is None or (key == shown and key[1] != "running" and key[1] != "stopping"):
            return [gr.update()] * 5  # nothing new: the page stays as it is
        run = job.log.parent
        state = tf.run_status(job, run)
        summary = _summary_text(state, run)
        earlier = " (started by an earlier peftkit ui)" if job.adopted else ""
        return [state.headline() + earlier, _curve_frame(state.curve), summary, state.log_tail,
                key]  # fmt: skip

    w.timer.tick(polled(poll, 5), w.shown, [w.status, w.curve, w.summary, w.log, w.shown])


def _widget_value(spec: Any, section: dict[str, Any]) -> Any:
    """A form widget's value for a field of a recipe section (its default when not given)."""
    from peftkit.ui.forms import yaml_text

    if spec.name not in section:
        return spec.default
    value = section[spec.name]
    if spec.kind == "text":
        return yaml_text(value)
    return bool(value) if spec.kind == "checkbox" else value


def _load_events(workspace: Workspace, w: Widgets, shown: list[Any]) -> None:
    """Load a saved recipe or an earlier run's into the form (a clone under a new run name)."""
    from peftkit.registry import DEFAULT_METHOD

    def on_refresh(chosen: str | None) -> Any:
        found = list(tf.recipe_sources(workspace))
        return gr.update(choices=found, value=chosen if chosen in found else None)

    gr.on(shown, on_refresh, w.load_source, w.load_source)
    w.saved.then(on_refresh, w.load_source, w.load_source)  # a form just saved is offered
    method_widgets = [(name, spec, widget) for name, specs in w.forms.items()
                      for spec, widget in zip(specs, w.method_widgets[name],
                                              strict=True)]  # fmt: skip
    outputs = [w.message, w.model, w.run_name, w.task_type, w.source, w.dataset, w.uploaded,
               w.original, *w.columns.values(), *w.task_widgets, w.method,
               *(widget for _, _, widget in method_widgets), *w.training_widgets,
               *w.more_widgets]  # fmt: skip

    def on_load(name: str | None) -> list[Any]:
        if not name:
            raise WorkspaceError("Choose a recipe or a run to load its settings from.")
        values = tf.form_values(workspace, tf.load_form_recipe(workspace, name))
        chosen = values.method.get("name", DEFAULT_METHOD)
        source = SOURCES[0] if values.dataset else SOURCES[1]
        data = [values.dataset or gr.update(), values.train_file or ""]
        return [
            f"loaded `{name}`: change what you like, then Start trains it as "
            f"`{values.run_name}`.", values.model, values.run_name, values.task["type"],
            source, *data, values.train_file or "",
            *(values.task[name] for name in w.columns),
            *(_widget_value(spec, values.task) for spec in w.task_specs), chosen,
            *(_widget_value(spec, values.method) if method == chosen else gr.update()
              for method, spec, _ in method_widgets),
            *(_widget_value(spec, values.training)
              for spec in [*w.training_specs, *w.more_specs]),
        ]  # fmt: skip

    w.load_button.click(guarded(on_load, len(outputs)), w.load_source, outputs)


def _data_events(workspace: Workspace, w: Widgets) -> None:
    """An upload's format: its columns mapped onto a format's fields, written as a new file."""
    from peftkit.recipe import TaskConfig

    def on_format(kind: str | None, original: str) -> list[Any]:
        fields = tf.FORMATS.get(kind or "", ())
        found = tf.file_columns(workspace.resolve(original)) if original else []
        return [gr.update(visible=i < len(fields), choices=found,
                          label=fields[i] + (" (optional)" if fields[i] in tf.OPTIONAL_FIELDS
                                             else "") if i < len(fields) else "",
                          value=fields[i] if i < len(fields) and fields[i] in found else None)
                for i in range(MAPPED_FIELDS)]  # fmt: skip

    w.format.change(guarded(on_format, MAPPED_FIELDS), [w.format, w.original], w.format_fields)

    def on_apply(kind: str | None, original: str, *picked: str | None) -> list[Any]:
        if not original:
            raise DataError("Upload a data file first (CSV, JSON, JSONL or Parquet).")
        if not kind:
            raise DataError(f"Choose the file's format ({', '.join(tf.FORMATS)}).")
        mapping = dict(zip(tf.FORMATS[kind], picked, strict=False))
        mapped = tf.write_mapped(workspace, workspace.resolve(original), kind, mapping)
        found = tf.file_columns(mapped)
        relative = mapped.relative_to(workspace.root).as_posix()
        columns = [gr.update(choices=found, value=getattr(TaskConfig, name))
                   if getattr(TaskConfig, name) in found else gr.update(choices=found)
                   for name in w.columns]  # fmt: skip
        return [f"wrote `{relative}` ({kind}); the run reads it.", relative, *columns]

    w.format_apply.click(guarded(on_apply, 2 + len(w.columns)),
                         [w.format, w.original, *w.format_fields],
                         [w.message, w.uploaded, *w.columns.values()])  # fmt: skip


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
