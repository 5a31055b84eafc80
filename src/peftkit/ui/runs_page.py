"""The Runs page: the runs under the workspace with their summaries; re-evaluate, merge, export as
GGUF, or resume one, each as the `peftkit` command a terminal would run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from peftkit.ui.jobs import Job, JobSlots, cli_command
from peftkit.ui.progress import clean_output
from peftkit.ui.training_form import resume_training
from peftkit.ui.widgets import error_line, escape_markdown, guarded
from peftkit.ui.workspace import RunInfo, Workspace, WorkspaceError

HEADER = ["run", "state", "method", "model", "task", "metric", "before", "after", "steps",
          "trainable", "peak MiB"]  # fmt: skip
ACTIONS = ("re-evaluate", "merge", "export GGUF", "resume")
OUTTYPES = ("f16", "f32", "q8_0")
GGUF_TASKS = ("causal-lm", "chat")  # the task types whose models GGUF export writes


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
    checkpoints = [p.name for p in sorted((run / "checkpoints").glob("checkpoint-*"),
                                          key=checkpoint_step)]  # fmt: skip
    if checkpoints:
        parts.append("checkpoints: " + ", ".join(checkpoints))
    return "\n\n".join(parts)


def checkpoint_step(path: Path) -> int:
    """A checkpoint folder's step (checkpoint-10 after checkpoint-5); -1 for another name."""
    number = path.name.rpartition("-")[2]
    return int(number) if number.isdigit() else -1


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
        if not gguf_exportable(run):
            raise WorkspaceError(
                f"{name} is not a causal language model (causal-lm or chat): GGUF export "
                "writes only those."
            )
        output = run.with_name(f"{run.name}-{outtype}.gguf")
        command = cli_command("export", str(run), "--format", "gguf", "--outtype", outtype,
                              "--output", str(output))  # fmt: skip
        return slots.start("runs", command, log)
    raise WorkspaceError(f"Unknown action {action!r}; the page offers: {', '.join(ACTIONS)}.")


def build(workspace: Workspace, slots: JobSlots, shown: list[Any]) -> None:
    """The page's widgets and events (inside a gr.Tab); `shown` are the events that show it (the
    page loading, its tab chosen), on which the runs are read again."""
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=0)
    table = gr.Dataframe([], headers=HEADER, interactive=False, elem_id="runs-table", wrap=True)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            chosen = gr.Dropdown([], label="run", elem_id="runs-run")
            outtype = gr.Dropdown(list(OUTTYPES), value="f16", label="GGUF weights",
                                  elem_id="runs-outtype")  # fmt: skip
            with gr.Row():
                buttons = {action: gr.Button(action, elem_id=f"runs-{action.split()[0]}")
                           for action in ACTIONS}  # fmt: skip
            message = gr.Markdown(elem_id="runs-message")  # what a button just said
            status = gr.Markdown(elem_id="runs-status")  # the action's job, as it goes
            log = gr.Code(label="output", elem_id="runs-log")
        with gr.Column(scale=3):
            details = gr.Markdown(elem_id="runs-details")
    timer = gr.Timer(1.0)  # always on: a reload or a second tab attaches to a running action
    drawn = gr.State(None)  # the jobs' states this page last drew

    def on_refresh(name: str | None) -> list[Any]:
        found = workspace.runs()
        names = [r.name for r in found]
        return [run_rows(found), gr.update(choices=names, value=name if name in names else None)]

    gr.on([*shown, refresh.click], on_refresh, chosen, [table, chosen])

    def on_choose(name: str | None) -> list[Any]:
        if not name:
            return ["", gr.update(interactive=False), gr.update(interactive=False)]
        run = workspace.resolve(name)
        offered = gguf_exportable(run)
        return [run_details(run), gr.update(interactive=offered), gr.update(interactive=offered)]

    chosen.change(guarded(on_choose, 3), chosen, [details, buttons["export GGUF"], outtype])

    for action, button in buttons.items():

        def act(name: str | None, kind: str, action: str = action) -> str:
            if not name:
                raise WorkspaceError("Choose a run first.")
            job = start_action(workspace, slots, name, action, kind)
            if action == "resume":
                return f"resuming: `{job.describe()}` (its progress shows on the Train page)"
            return f"started: `{job.describe()}`"

        button.click(guarded(act), [chosen, outtype], message)

    def poll(name: str | None, last: Any) -> list[Any]:
        keys = [list(job.key) if job else None for job in map(slots.get, SLOTS)]
        job = slots.get("runs")
        if keys == last and (job is None or not job.running):
            return [gr.update()] * 6  # nothing new
        lists = [gr.update(), gr.update()]
        if keys != last:  # a job that started or ended may have made or changed a run
            found = workspace.runs()
            lists = [run_rows(found), gr.update(choices=[r.name for r in found])]
        text = run_details(workspace.resolve(name)) if name else gr.update()
        if job is None:
            return [gr.update(), gr.update(), text, *lists, keys]
        output = clean_output(job.text())
        tail = "\n".join(output.replace("\r", "\n").splitlines()[-20:])
        return [job_status(job, output), tail or "(no output yet)", text, *lists, keys]

    timer.tick(guarded(poll, 6), [chosen, drawn], [status, log, details, table, chosen, drawn])


SLOTS = ("train", "compare", "runs")  # a job in any of them may change the runs listed


def job_status(job: Job, output: str) -> str:
    """A Runs action's state; a failed one with its error line, whole."""
    line = f"{job.state}: `{job.describe()}`"
    if job.state == "failed":
        line += f"\n\n**{escape_markdown(error_line(output))}**"
    return line


def gguf_exportable(run: Path) -> bool:
    """Whether GGUF export can take the run: only causal language models become GGUF files, so
    a run of an encoder (classification) or of seq2seq is not offered it."""
    import peftkit.api as api

    if not (run / "adapter").is_dir():
        return False
    return api.read_info(run / "adapter").get("task", "causal-lm") in GGUF_TASKS
