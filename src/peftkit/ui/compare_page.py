"""The Compare page: pick methods from a compare plan, run `peftkit compare` on them (quick or full)
as a child process, see the table and the chart; open any earlier comparison of the workspace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from peftkit.ui.jobs import JobSlots, cli_command
from peftkit.ui.progress import clean_output
from peftkit.ui.widgets import error_line, escape_markdown, guarded
from peftkit.ui.workspace import Workspace, WorkspaceError

LOG_NAME = "ui-compare.log"
NO_PLANS_HINT = (
    "No compare plan found. A plan is a YAML file with `recipe` (a recipe file, relative to the "
    "plan) and `methods` (a list of method sections): put one into the workspace or its "
    "`plans/` folder (or start `peftkit ui` in a folder with `recipes/compare-*.yaml`), then "
    "come back to this tab."
)


def plan_labels(path: Path) -> list[str]:
    """The labels of a plan's entries (what `--methods` picks from)."""
    from peftkit.compare import load_plan

    return [entry.label for entry in load_plan(path).entries]


def start_compare(
    workspace: Workspace,
    slots: JobSlots,
    plan: Path,
    labels: list[str],
    output_name: str,
    quick: bool,
    overwrite: bool,
) -> Any:
    """Start `peftkit compare` on the chosen entries, into a folder of the workspace; earlier
    results there are refused first with the CLI's message (unless `overwrite`)."""
    from peftkit.compare import load_plan, refuse_earlier_results

    if not labels:
        raise WorkspaceError("Pick at least one method of the plan to compare.")
    output = workspace.run_folder(output_name, "Results folder")
    entries = [entry for entry in load_plan(plan).entries if entry.label in labels]
    refuse_earlier_results(entries, output, overwrite)
    command = cli_command("compare", str(plan), "--output-dir", str(output), "--methods", *labels)
    command += ["--quick"] * quick + ["--overwrite"] * overwrite
    output.mkdir(parents=True, exist_ok=True)
    return slots.start("compare", command, output / LOG_NAME)


def plan_choice(names: list[str], current: str | None) -> tuple[str | None, str]:
    """The plan to show (the current one while it is there, else the first) and, with none found,
    what a plan is and where to put one."""
    if not names:
        return None, NO_PLANS_HINT
    return (current if current in names else names[0]), ""


def result_view(folder: Path) -> tuple[str, str | None]:
    """A comparison's table (Markdown) and chart path, from its compare.json and compare.png."""
    from peftkit.compare import format_table

    results = json.loads((folder / "compare.json").read_text())
    chart = folder / "compare.png"
    return format_table(results), str(chart) if chart.is_file() else None


def build(
    workspace: Workspace, slots: JobSlots, plans_folder: Path | None, shown: list[Any]
) -> None:
    """The page's widgets and events (inside a gr.Tab); `shown` are the events that show it (the
    page loading, its tab chosen), on which the plans and earlier comparisons are read again."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                plan = gr.Dropdown(
                    [],
                    label="compare plan",
                    elem_id="compare-plan",
                    info="plans (YAML with recipe and methods) in the workspace or its plans/ "
                    "folder, then the project's recipes/",
                )
                refresh = gr.Button("Refresh", elem_id="compare-refresh", scale=0)
            labels = gr.CheckboxGroup([], label="methods", elem_id="compare-methods")
            with gr.Row():
                quick = gr.Checkbox(True, label="quick (the plan's smoke-sized budget)",
                                    elem_id="compare-quick")  # fmt: skip
                overwrite = gr.Checkbox(False, label="replace earlier results",
                                        elem_id="compare-overwrite")  # fmt: skip
            output_name = gr.Textbox("compare", label="results folder", max_lines=1,
                                     elem_id="compare-output")  # fmt: skip
            with gr.Row():
                run_button = gr.Button("Run", variant="primary", elem_id="compare-run")
                stop_button = gr.Button("Stop", variant="stop", elem_id="compare-stop")
            earlier = gr.Dropdown([], label="earlier comparisons", elem_id="compare-earlier")
            open_button = gr.Button("Open", elem_id="compare-open")
        with gr.Column(scale=3):
            message = gr.Markdown(elem_id="compare-message")  # what a button just said
            status = gr.Markdown(elem_id="compare-status")  # the comparison's job, as it goes
            table = gr.Markdown(elem_id="compare-table")
            chart = gr.Image(type="filepath", label="chart", elem_id="compare-chart")
            log = gr.Code(label="progress", elem_id="compare-log")
    timer = gr.Timer(2.0)  # always on: a reload or a second tab attaches to a running comparison
    drawn = gr.State(None)  # the job state this page last drew

    def plans() -> dict[str, Path]:
        return workspace.plans(plans_folder)

    def on_refresh(current: str | None, previous: list[str] | None) -> list[Any]:
        found = plans()
        kept, hint = plan_choice(list(found), current)
        results = workspace.compare_results()
        earlier_choice = previous if previous in results else None
        return [gr.update(choices=list(found), value=kept), gr.update(choices=results,
                value=earlier_choice), hint]  # fmt: skip

    def on_plan(name: str | None) -> list[Any]:
        found = plans()
        labels_found = plan_labels(found[name]) if name in found else []
        return ["", gr.update(choices=labels_found, value=labels_found)]

    plan.change(guarded(on_plan, 2), plan, [message, labels])
    gr.on([*shown, refresh.click], guarded(on_refresh, 3), [plan, earlier],
          [plan, earlier, message])  # fmt: skip

    def run(name: str | None, chosen: list[str], folder: str, is_quick: bool, replace: bool) -> str:
        found = plans()
        if name not in found:
            raise WorkspaceError("Choose a compare plan first.")
        job = start_compare(workspace, slots, found[name], chosen, folder, is_quick, replace)
        return f"started: `{job.describe()}`"

    run_button.click(guarded(run), [plan, labels, output_name, quick, overwrite], message)

    def stop() -> str:
        job = slots.get("compare")
        if job is None or not job.running:
            return "No comparison is running."
        job.stop()
        return "stopping: the method training now ends; finished ones keep their results."

    stop_button.click(stop, None, message)

    def poll(last: Any) -> list[Any]:
        job = slots.get("compare")
        if job is None or (list(job.key) == last and not job.running):
            return [gr.update()] * 6  # nothing new
        text = clean_output(job.text()).replace("\r", "\n")
        folder = job.log.parent
        table_text, chart_path = "", None
        if not job.running and (folder / "compare.json").is_file():
            table_text, chart_path = result_view(folder)
        choices = gr.update(choices=workspace.compare_results())
        line = f"{job.state}: `{job.describe()}`"
        if job.state == "failed":
            line += f"\n\n**{escape_markdown(error_line(text))}**"
        return [line, table_text, chart_path, text or "(no output yet)", choices, list(job.key)]

    timer.tick(poll, drawn, [status, table, chart, log, earlier, drawn])

    def open_result(name: str | None) -> list[Any]:
        if not name:
            return ["Choose an earlier comparison.", gr.update(), gr.update()]
        table_text, chart_path = result_view(workspace.resolve(name))
        return [f"comparison in `{workspace.resolve(name)}`", table_text, chart_path]

    open_button.click(guarded(open_result, 3), earlier, [message, table, chart])
