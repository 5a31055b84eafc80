"""The Runs page: the runs under the workspace with their summaries; re-evaluate, merge, export as
GGUF, or resume one, each as the `peftkit` command a terminal would run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from peftkit.ui.jobs import Job, JobSlots, cli_command
from peftkit.ui.training_form import resume_training
from peftkit.ui.widgets import guarded
from peftkit.ui.workspace import RunInfo, Workspace, WorkspaceError

HEADER = ["run", "state", "method", "model", "task", "metric", "before", "after", "steps",
          "trainable", "peak MiB"]  # fmt: skip
ACTIONS = ("re-evaluate", "merge", "export GGUF", "resume")
OUTTYPES = ("f16", "f32", "q8_0")


def _cell(summary: dict[str, Any], key: str, pattern: str = "{:.4f}") -> str:
    """A summary's number as the compare table writes it ('' where the summary lacks it)."""
    return pattern.format(summary[key]) if key in summary else ""


def run_rows(runs: list[RunInfo]) -> list[list[Any]]:
    """One table row per run (an unfinished run has no summary yet)."""
    rows = []
    for run in runs:
        s = run.summary
        texts = [str(s.get(key, "")) for key in ("method", "model", "task", "metric")]
        numbers = [_cell(s, "metric_before"), _cell(s, "metric_after"), _cell(s, "steps", "{}"),
                   _cell(s, "trainable_parameters", "{:,}"),
                   _cell(s, "peak_memory_mib", "{:.0f}")]  # fmt: skip
        rows.append([run.name, run.state, *texts, *numbers])
    return rows


def confine_run(workspace: Workspace, run: Path, reads_data: bool) -> None:
    """Refuse an action whose command would read outside the workspace: the base model the
    adapter names and, for evaluation, the data files of the run's recipe."""
    import peftkit.api as api

    base = api.read_info(run / "adapter").get("base_model")
    if base:
        workspace.model(base)
    if reads_data and (run / "recipe.yaml").is_file():
        from peftkit.recipe import load_recipe

        task = load_recipe(run / "recipe.yaml").task
        for path in (task.train_file, task.eval_file):
            if path:
                workspace.resolve(path)


def run_details(run: Path) -> str:
    """A run's summary table, its latest evaluation, and what it holds."""
    from peftkit.run_folder import earlier_run

    parts = [f"`{run}`: {earlier_run(run) or 'no run'}"]
    if (run / "summary.json").is_file():
        from peftkit.training.run import format_summary

        parts.append(f"```\n{format_summary(json.loads((run / 'summary.json').read_text()))}\n```")
    if (run / "eval.json").is_file():
        metrics = json.loads((run / "eval.json").read_text())
        parts.append("re-evaluated: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    if checkpoints:
        parts.append("checkpoints: " + ", ".join(checkpoints))
    return "\n\n".join(parts)


def start_action(
    workspace: Workspace, slots: JobSlots, name: str, action: str, outtype: str
) -> Job:
    """Start one action on a run: the CLI command, writing next to the run in the workspace."""
    run = workspace.resolve(name)
    log = workspace.root / ".ui" / "logs" / f"{run.name}-{action.replace(' ', '-')}.log"
    if action == "resume":
        return resume_training(slots, run)
    if not (run / "adapter").is_dir():
        raise WorkspaceError(f"{name} has no adapter yet (an unfinished run): resume it first.")
    confine_run(workspace, run, reads_data=action == "re-evaluate")
    if action == "re-evaluate":
        return slots.start("runs", cli_command("eval", str(run)), log)
    if action == "merge":
        output = run.with_name(f"{run.name}-merged")
        if output.exists():
            raise WorkspaceError(f"{output} already exists; move or delete it to merge again.")
        return slots.start("runs", cli_command("merge", str(run), "--output", str(output)), log)
    if action == "export GGUF":
        output = run.with_name(f"{run.name}-{outtype}.gguf")
        command = cli_command("export", str(run), "--format", "gguf", "--outtype", outtype,
                              "--output", str(output))  # fmt: skip
        return slots.start("runs", command, log)
    raise WorkspaceError(f"Unknown action {action!r}; the page offers: {', '.join(ACTIONS)}.")


def build(workspace: Workspace, slots: JobSlots) -> None:
    """The page's widgets and events (inside a gr.Tab)."""
    runs = workspace.runs()
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=0)
    table = gr.Dataframe(run_rows(runs), headers=HEADER, interactive=False,
                         elem_id="runs-table", wrap=True)  # fmt: skip
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            chosen = gr.Dropdown([r.name for r in runs], label="run", elem_id="runs-run")
            outtype = gr.Dropdown(list(OUTTYPES), value="f16", label="GGUF weights",
                                  elem_id="runs-outtype")  # fmt: skip
            with gr.Row():
                buttons = {action: gr.Button(action, elem_id=f"runs-{action.split()[0]}")
                           for action in ACTIONS}  # fmt: skip
            status = gr.Markdown(elem_id="runs-status")
            log = gr.Code(label="output", elem_id="runs-log")
        with gr.Column(scale=3):
            details = gr.Markdown(elem_id="runs-details")
    timer = gr.Timer(1.0, active=False)

    def on_refresh() -> list[Any]:
        found = workspace.runs()
        return [run_rows(found), gr.update(choices=[r.name for r in found])]

    refresh.click(on_refresh, None, [table, chosen])

    def on_choose(name: str | None) -> str:
        return run_details(workspace.resolve(name)) if name else ""

    chosen.change(guarded(on_choose), chosen, details)

    watched = {"slot": "runs"}  # the slot of the last action started here (resume trains)

    for action, button in buttons.items():

        def act(name: str | None, kind: str, action: str = action) -> list[Any]:
            if not name:
                raise WorkspaceError("Choose a run first.")
            job = start_action(workspace, slots, name, action, kind)
            watched["slot"] = "train" if action == "resume" else "runs"
            return [f"started: `{job.describe()}`", gr.Timer(active=True)]

        button.click(guarded(act, 2), [chosen, outtype], [status, timer])

    def poll(name: str | None) -> list[Any]:
        job = slots.get(watched["slot"])
        if job is None:
            return [gr.update(), gr.update(), gr.update(), gr.Timer(active=False)]
        tail = "\n".join(job.text().replace("\r", "\n").splitlines()[-20:])
        text = run_details(workspace.resolve(name)) if name else gr.update()
        return [f"{job.state}: `{job.describe()}`", tail, text, gr.Timer(active=job.running)]

    timer.tick(poll, chosen, [status, log, details, timer])
