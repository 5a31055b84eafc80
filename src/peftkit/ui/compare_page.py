"""The Compare page: pick methods from a compare plan, run `peftkit compare` on them (quick or full)
as a child process, see the table and the chart; open any earlier comparison of the workspace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from peftkit.ui.jobs import JobSlots, cli_command
from peftkit.ui.widgets import guarded
from peftkit.ui.workspace import Workspace, WorkspaceError

LOG_NAME = "ui-compare.log"


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
    output = workspace.run_folder(output_name)
    entries = [entry for entry in load_plan(plan).entries if entry.label in labels]
    refuse_earlier_results(entries, output, overwrite)
    command = cli_command("compare", str(plan), "--output-dir", str(output), "--methods", *labels)
    command += ["--quick"] * quick + ["--overwrite"] * overwrite
    output.mkdir(parents=True, exist_ok=True)
    return slots.start("compare", command, output / LOG_NAME)


def result_view(folder: Path) -> tuple[str, str | None]:
    """A comparison's table (Markdown) and chart path, from its compare.json and compare.png."""
    from peftkit.compare import format_table

    results = json.loads((folder / "compare.json").read_text())
    chart = folder / "compare.png"
    return format_table(results), str(chart) if chart.is_file() else None


def build(workspace: Workspace, slots: JobSlots, plans_folder: Path | None) -> None:
    """The page's widgets and events (inside a gr.Tab)."""
    plans = workspace.plans(plans_folder)
    first = next(iter(plans), None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                plan = gr.Dropdown(
                    list(plans),
                    value=first,
                    label="compare plan",
                    elem_id="compare-plan",
                    info="plans (YAML with recipe and methods) in the workspace or its plans/ "
                    "folder, then the project's recipes/",
                )
                refresh = gr.Button("Refresh", elem_id="compare-refresh", scale=0)
            found = plan_labels(plans[first]) if first else []
            labels = gr.CheckboxGroup(found, value=found, label="methods",
                                      elem_id="compare-methods")  # fmt: skip
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
            earlier = gr.Dropdown(workspace.compare_results(), label="earlier comparisons",
                                  elem_id="compare-earlier")  # fmt: skip
            open_button = gr.Button("Open", elem_id="compare-open")
        with gr.Column(scale=3):
            status = gr.Markdown(elem_id="compare-status")
            table = gr.Markdown(elem_id="compare-table")
            chart = gr.Image(type="filepath", label="chart", elem_id="compare-chart")
            log = gr.Code(label="progress", elem_id="compare-log")
    timer = gr.Timer(2.0, active=False)

    def on_refresh(current: str | None) -> list[Any]:
        plans.clear()
        plans.update(workspace.plans(plans_folder))
        kept = current if current in plans else next(iter(plans), None)
        choices = gr.update(choices=workspace.compare_results())
        return [gr.update(choices=list(plans), value=kept), choices]

    def on_plan(name: str | None) -> list[Any]:
        found = plan_labels(plans[name]) if name else []
        return ["", gr.update(choices=found, value=found)]

    plan.change(guarded(on_plan, 2), plan, [status, labels])
    refresh.click(on_refresh, plan, [plan, earlier])

    def run(
        name: str | None, chosen: list[str], folder: str, is_quick: bool, replace: bool
    ) -> list:
        if name not in plans:
            raise WorkspaceError("Choose a compare plan first (Refresh lists new ones).")
        job = start_compare(workspace, slots, plans[name], chosen, folder, is_quick, replace)
        return [f"started: `{job.describe()}`", gr.Timer(active=True)]

    run_button.click(guarded(run, 2), [plan, labels, output_name, quick, overwrite],
                     [status, timer])  # fmt: skip

    def stop() -> str:
        job = slots.get("compare")
        if job is None or not job.running:
            return "No comparison is running."
        job.stop()
        return "stopping: the method training now ends; finished ones keep their results."

    stop_button.click(stop, None, status)

    def poll() -> list[Any]:
        job = slots.get("compare")
        if job is None:
            return [gr.update()] * 4 + [gr.Timer(active=False), gr.update()]
        text = job.text().replace("\r", "\n")
        folder = job.log.parent
        table_text, chart_path = "", None
        if not job.running and (folder / "compare.json").is_file():
            table_text, chart_path = result_view(folder)
        choices = gr.update(choices=workspace.compare_results())
        return [f"{job.state}: `{job.describe()}`", table_text, chart_path, text,
                gr.Timer(active=job.running), choices]  # fmt: skip

    timer.tick(poll, None, [status, table, chart, log, timer, earlier])

    def open_result(name: str | None) -> list[Any]:
        if not name:
            return ["Choose an earlier comparison.", gr.update(), gr.update()]
        table_text, chart_path = result_view(workspace.resolve(name))
        return [f"comparison in `{workspace.resolve(name)}`", table_text, chart_path]

    open_button.click(guarded(open_result, 3), earlier, [status, table, chart])
