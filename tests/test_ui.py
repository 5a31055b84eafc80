"""The UI's parts that need no browser: the workspace's confinement, forms from the registry,
progress read from a training's output, the memory check, child processes and Stop."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from made_up_method import register

from peftkit.api import config_for
from peftkit.errors import ConfigError, DataError
from peftkit.recipe import TrainConfig
from peftkit.registry import METHODS
from peftkit.ui import forms, jobs, progress
from peftkit.ui.fit import Fit, available_memory, check_fit
from peftkit.ui.training_form import build_recipe, check_data, columns_read
from peftkit.ui.workspace import Workspace, WorkspaceError


@pytest.fixture
def space(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws", max_upload_bytes=1024)


@pytest.mark.parametrize("path", ["..", "../elsewhere", "a/../../b", "/etc/passwd"])
def test_a_path_leaving_the_workspace_is_refused(space: Workspace, path: str) -> None:
    with pytest.raises(WorkspaceError, match="is outside the workspace"):
        space.resolve(path)


def test_a_link_pointing_out_of_the_workspace_is_refused(space: Workspace, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (space.root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(WorkspaceError, match="is outside the workspace"):
        space.resolve("link/data.csv")
    assert space.resolve("runs/x") == space.root / "runs" / "x"
    assert space.resolve(space.root / "y") == space.root / "y"


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "x y", "a" * 101])
def test_a_run_name_must_be_a_plain_folder_name(space: Workspace, name: str) -> None:
    with pytest.raises(WorkspaceError, match="Run name .* must be a plain folder name"):
        space.run_folder(name)


def test_a_bad_compare_folder_is_named_as_the_field_it_came_from(space: Workspace) -> None:
    from peftkit.ui.compare_page import start_compare

    plan = space.root / "plan.yaml"
    plan.write_text("recipe: r.yaml\nmethods:\n  - method: {name: lora}\n")
    (space.root / "r.yaml").write_text("model: tiny-bert\n")
    with pytest.raises(WorkspaceError, match="^Results folder 'a/b' must be a plain folder"):
        start_compare(space, jobs.JobSlots(), plan, ["lora"], "a/b", True, False)


def test_uploads_are_copied_in_and_limited_in_size_and_kind(space: Workspace, tmp_path: Path):
    small = tmp_path / "small.csv"
    small.write_text("text,label\na,b\n")
    copy = space.save_upload(small)
    assert copy == space.root / "uploads" / "small.csv" and copy.read_text() == small.read_text()
    large = tmp_path / "large.csv"
    large.write_text("x" * 2048)
    with pytest.raises(WorkspaceError, match="uploads are limited to"):
        space.save_upload(large)
    with pytest.raises(WorkspaceError, match="upload one of .csv"):
        space.save_upload(small, "data.exe")


def test_a_model_is_a_bundled_name_or_a_folder_inside(space: Workspace, tmp_path: Path) -> None:
    assert space.model("tiny-gpt2") == "tiny-gpt2"
    (space.root / "my-model").mkdir()
    assert space.model("my-model") == str(space.root / "my-model")
    with pytest.raises(WorkspaceError, match="neither a bundled model"):
        space.model("missing")
    (tmp_path / "outside-model").mkdir()
    with pytest.raises(WorkspaceError, match="is outside the workspace"):
        space.model(str(tmp_path / "outside-model"))


def test_every_method_form_reads_back_as_its_default_config(monkeypatch) -> None:
    register(monkeypatch)  # a method only the test knows gets its form like any other
    built = forms.method_forms()
    assert list(built) == [method.name for method in METHODS] + ["norms_only"]
    made_up = built["norms_only"]
    assert [(s.name, s.kind, s.default) for s in made_up] == [("include_final", "checkbox", True)]
    for method in [*METHODS]:
        specs = built[method.name]
        fields = [f.name for f in dataclasses.fields(method.config_cls) if f.init]
        assert [spec.name for spec in specs] == fields
        assert all(spec.help for spec in specs), method.name  # every option says what it is
        defaults = [spec.default for spec in specs]
        section = forms.section_values(specs, defaults, "method")
        assert section == {}
        assert config_for(method.name, **section) == method.config_cls()


def test_a_changed_field_reaches_the_config_with_its_type() -> None:
    specs = forms.field_specs(TrainConfig)
    values = {spec.name: spec.default for spec in specs}
    values |= {"max_steps": 7.0, "learning_rate": 0.02, "group_by_length": False,
               "threads": "2", "report_to": "tensorboard"}  # fmt: skip
    section = forms.section_values(specs, [values[s.name] for s in specs], "training")
    assert section == {"max_steps": 7, "learning_rate": 0.02, "group_by_length": False,
                       "threads": 2, "report_to": "tensorboard"}  # fmt: skip
    assert isinstance(section["max_steps"], int)
    values["threads"] = "[1,"
    with pytest.raises(ConfigError, match=r"training\.threads is not valid YAML"):
        forms.section_values(specs, [values[s.name] for s in specs], "training")


def test_text_fields_show_values_as_a_recipe_writes_them() -> None:
    assert forms.yaml_text(None) == ""
    assert forms.yaml_text("all-linear") == "all-linear"
    assert forms.yaml_text("8") == '"8"'  # text that YAML would read as a number stays text
    assert forms.yaml_text(("q", "v")) == '["q", "v"]'


def test_the_columns_a_task_type_reads_come_from_its_record() -> None:
    assert columns_read("classification") == ["text_column", "label_column"]
    assert columns_read("causal-lm") == ["prompt_column", "response_column"]
    assert columns_read("seq2seq") == ["source_column", "target_column"]
    assert columns_read("chat") == []  # each record's own format says where its turns are


BAR_LOG = (
    "Loading weights: 100%|##########| 37/37 [00:00<00:00, 900.1it/s]\n"
    "trainable parameters: 1,090\n"
    "\r  0%|          | 0/20 [00:00<?, ?it/s]"
    "\r 20%|##        | 4/20 [00:03<00:12, 1.23it/s]\r{'loss': '0.6945', 'epoch': '0.5'}\n"
    "\r 65%|######5   | 13/20 [00:10<00:06, 1.25it/s]"
)


def test_progress_is_the_training_bar_not_the_loading_one() -> None:
    found = progress.training_progress(BAR_LOG)
    assert (found.step, found.total, found.elapsed, found.remaining) == (13, 20, "00:10", "00:06")
    assert str(found) == "step 13/20 (00:10 so far, about 00:06 left)"
    assert progress.training_progress(BAR_LOG.split("\r")[0]) is None
    start = progress.training_progress("\r  0%|          | 0/20 [00:00<?, ?it/s]")
    assert str(start) == "step 0/20 (00:00 so far)"


def test_the_loss_curve_is_read_from_the_runs_tensorboard_events(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    assert progress.loss_curve(tmp_path) == []
    # Two processes' event files in one folder, as a run resumed from its step-4 checkpoint
    # leaves them: the resumed one logs step 4 again.
    for points in [[(2, 0.75), (4, 0.5)], [(4, 0.375), (6, 0.25)]]:
        writer = SummaryWriter(str(tmp_path / "logs"))
        for step, loss in points:
            writer.add_scalar("train/loss", loss, step)
        writer.close()
    assert progress.loss_curve(tmp_path) == [(2, 0.75), (4, 0.375), (6, 0.25)]


def test_available_memory_is_meminfos_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16384 kB\nMemFree: 1024 kB\nMemAvailable: 8192 kB\n")
    assert available_memory(meminfo) == 8192 * 1024
    assert available_memory(tmp_path / "missing") is None


def test_the_fit_check_compares_the_estimators_peak_with_free_memory(space, monkeypatch):
    from peftkit.memory.estimate import estimate

    recipe = build_recipe(space, "tiny-llama", {"type": "causal-lm", "dataset": "copy-words",
                          "max_length": 64}, {"name": "lora", "rank": 4},
                          {"batch_size": 4}, "r")  # fmt: skip
    expected = estimate("tiny-llama", {"name": "lora", "rank": 4}, 4, 64, "fp32",
                        task="causal-lm")  # fmt: skip
    monkeypatch.setattr("peftkit.ui.fit.free_device_memory", lambda: (10 * 2**30, "test"))
    fit = check_fit(recipe)
    assert fit.estimate.total == expected.total and fit.fits
    small = Fit(fit.estimate, int(expected.total) - 1, "test")
    assert small.fits is False and "does NOT fit" in small.markdown()


def test_the_recipe_keeps_every_path_inside_the_workspace(space: Workspace, tmp_path: Path):
    outside = tmp_path / "data.csv"
    outside.write_text("text,label\na,b\nc,d\n")
    task = {"type": "classification", "train_file": str(outside)}
    with pytest.raises(WorkspaceError, match="is outside the workspace"):
        build_recipe(space, "tiny-bert", task, {"name": "lora"}, {}, "run")
    with pytest.raises(ConfigError, match="Unknown key 'rnak' in method.*Did you mean 'rank'"):
        build_recipe(space, "tiny-bert", {"type": "classification", "dataset": "copy-words"},
                     {"name": "lora", "rnak": 4}, {}, "run")  # fmt: skip


def test_check_data_gives_the_clis_error_for_a_missing_column(space: Workspace) -> None:
    data = space.root / "uploads" / "d.csv"
    data.parent.mkdir(parents=True)
    data.write_text("text,sentiment\n" + "".join(f"t{i},s{i % 2}\n" for i in range(20)))
    task = {"type": "classification", "train_file": str(data)}
    with pytest.raises(DataError, match=r"has no column 'label'\. Its columns are: sentiment, "):
        check_data(task)
    assert check_data({**task, "label_column": "sentiment"}) == "18 training rows, 2 held out"


CHILD = (
    "import signal, sys, time\n"
    "print('child started', flush=True)\n"
    "signal.signal(signal.SIGINT, lambda *a: (print('interrupted', flush=True), sys.exit(3)))\n"
    "time.sleep(60)\n"
)


def test_stop_interrupts_the_child_as_ctrl_c_would(tmp_path: Path) -> None:
    slots = jobs.JobSlots()
    job = slots.start("train", [sys.executable, "-c", CHILD], tmp_path / "child.log")
    deadline = time.time() + 30
    while "child started" not in job.text() and time.time() < deadline:
        time.sleep(0.05)
    assert job.state == "running"
    with pytest.raises(WorkspaceError, match="still running"):
        slots.start("train", [sys.executable, "-c", "pass"], tmp_path / "other.log")
    job.stop()
    assert job.wait(30) == 3 and job.state == "stopped"
    assert "interrupted" in job.text()
    # Its own process group: the signal reached the child, never this process.
    assert os.getpgid(os.getpid()) != job.process.pid


def wait_for_output(job: jobs.Job, text: str) -> None:
    deadline = time.time() + 30
    while text not in job.text():
        assert time.time() < deadline, job.text()
        time.sleep(0.05)


SLEEPER = "import time; print('up', flush=True); time.sleep(120)"


@pytest.mark.parametrize(
    ("ignores", "ended_by"),
    [("signal.SIGINT", signal.SIGTERM), ("signal.SIGINT, signal.SIGTERM", signal.SIGKILL)],
)
def test_a_child_ignoring_the_stop_gets_sigterm_then_sigkill(tmp_path, monkeypatch, ignores,
                                                              ended_by):  # fmt: skip
    monkeypatch.setattr(jobs, "STOP_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(jobs, "KILL_GRACE_SECONDS", 0.5)
    stubborn = f"import signal, time\nfor s in ({ignores},): signal.signal(s, signal.SIG_IGN)\n" \
               "print('up', flush=True); time.sleep(60)"  # fmt: skip
    job = jobs.start([sys.executable, "-c", stubborn], tmp_path / "child.log")
    wait_for_output(job, "up")
    job.stop()
    assert job.wait(30) == -ended_by and job.state == "stopped"


def test_stop_works_at_once_when_the_ui_itself_ignores_sigint(tmp_path, monkeypatch) -> None:
    # A UI started in the background by a script runs with SIGINT ignored, and children inherit
    # an ignored signal: the child is started with it back at its default.
    monkeypatch.setattr(jobs, "STOP_GRACE_SECONDS", 60.0)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        job = jobs.start([sys.executable, "-c", SLEEPER], tmp_path / "child.log")
    finally:
        signal.signal(signal.SIGINT, previous)
    wait_for_output(job, "up")
    started = time.time()
    job.stop()
    assert job.wait(30) == -signal.SIGINT and job.state == "stopped"
    assert time.time() - started < 10  # SIGINT did it, not the escalation a minute later
    assert "KeyboardInterrupt" in job.text()


def test_a_ui_started_again_finds_the_child_an_earlier_one_left_running(tmp_path) -> None:
    folder = tmp_path / "ws" / ".ui" / "jobs"
    earlier = jobs.JobSlots(folder)
    child = earlier.start("train", [sys.executable, "-c", SLEEPER], tmp_path / "train.log")
    wait_for_output(child, "up")
    later = jobs.JobSlots(folder)  # what a restarted UI reads from the workspace
    found = later.get("train")
    assert found is not child and found.adopted and found.process.pid == child.process.pid
    assert found.state == "running" and found.text().startswith("up")
    assert found.describe() == child.describe()
    with pytest.raises(WorkspaceError, match="still running .started by an earlier peftkit ui"):
        later.start("train", [sys.executable, "-c", "pass"], tmp_path / "second.log")
    assert not (tmp_path / "second.log").exists()
    found.stop()  # the later UI stops it through its process group
    assert child.wait(30) == -signal.SIGINT
    assert found.wait(30) == -1 and found.state == "stopped"
    assert jobs.JobSlots(folder).get("train") is None  # an ended child is not found again


UI_STAND_IN = """
import sys, time
from pathlib import Path
from peftkit.ui.jobs import JobSlots, children_stopped_on_exit
slots = JobSlots(Path(sys.argv[1]))
job = slots.start("train", [sys.executable, "-c", sys.argv[2]], Path(sys.argv[1]) / "child.log")
print(job.process.pid, flush=True)
with children_stopped_on_exit(slots):
    time.sleep(120)  # the server
print("stopped its child:", job.wait(0), flush=True)
"""


def test_sigterm_to_the_ui_stops_its_child(tmp_path: Path) -> None:
    # The UI serves inside children_stopped_on_exit (app.launch): SIGTERM ends the server, the
    # children with it, before the UI exits.
    ui = subprocess.Popen([sys.executable, "-c", UI_STAND_IN, str(tmp_path), SLEEPER],
                          stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = int(ui.stdout.readline())
    deadline = time.time() + 30
    while "up" not in ((tmp_path / "child.log").read_text() if (tmp_path / "child.log").exists()
                       else ""):  # fmt: skip
        assert time.time() < deadline
        time.sleep(0.05)
    ui.terminate()
    assert ui.wait(30) == 0
    assert ui.stdout.read().strip() == f"stopped its child: {-signal.SIGINT}"
    assert jobs.process_start_time(child) is None  # gone, not orphaned


def test_a_job_describes_itself_as_the_command_to_type() -> None:
    command = jobs.cli_command("train", "my recipe.yaml", "--resume")
    job = jobs.Job(command, Path("x.log"), process=None)  # type: ignore[arg-type]
    assert job.describe() == "peftkit train 'my recipe.yaml' --resume"


def test_peftkit_ui_without_gradio_says_how_to_install_it(monkeypatch, capsys, tmp_path) -> None:
    from peftkit.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    assert main(["ui", "--workspace", str(tmp_path / "ws")]) == 2
    assert "pip install 'peftkit[ui]'" in capsys.readouterr().err


def test_serving_beyond_this_machine_is_warned_about(tmp_path: Path) -> None:
    from peftkit.ui.app import host_warning

    assert host_warning("127.0.0.1", 7860, tmp_path) is None
    assert host_warning("localhost", 7860, tmp_path) is None
    warning = host_warning("0.0.0.0", 8000, tmp_path)
    assert "serving on 0.0.0.0" in warning and "port 8000" in warning and str(tmp_path) in warning
    assert "whoever logs in" in host_warning("0.0.0.0", 8000, tmp_path, login=True)


def test_a_non_local_address_needs_a_login_unless_insisted(monkeypatch, capsys, tmp_path):
    from peftkit.cli import main
    from peftkit.ui import app

    launched = []
    monkeypatch.setattr(app, "launch", lambda *args, **kw: launched.append(kw["auth"]))
    monkeypatch.delenv("PEFTKIT_UI_AUTH", raising=False)
    workspace = ["ui", "--workspace", str(tmp_path / "ws")]
    assert main([*workspace, "--host", "0.0.0.0"]) == 2
    assert "Give a login: set PEFTKIT_UI_AUTH=USER:PASSWORD" in capsys.readouterr().err
    assert launched == []
    assert main([*workspace, "--host", "0.0.0.0", "--no-login"]) == 0
    assert main([*workspace, "--host", "0.0.0.0", "--auth", "ann:se:cret"]) == 0
    monkeypatch.setenv("PEFTKIT_UI_AUTH", "bob:pw")
    assert main([*workspace, "--host", "0.0.0.0"]) == 0
    assert main(workspace) == 0  # a local address may have one too
    assert launched == [None, ("ann", "se:cret"), ("bob", "pw"), ("bob", "pw")]
    for bad in ("nopassword", ":pw", "ann:"):
        with pytest.raises(ConfigError, match="A login is USER:PASSWORD"):
            app.login_for("0.0.0.0", bad)


def test_with_a_login_the_server_answers_nothing_before_it(tmp_path: Path) -> None:
    import http.cookiejar
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workspace = tmp_path / "ws"
    (workspace / "secret.txt").parent.mkdir()
    (workspace / "secret.txt").write_text("workspace file")
    command = [sys.executable, "-m", "peftkit.cli", "ui", "--workspace", str(workspace),
               "--port", str(port)]  # fmt: skip
    environment = {**os.environ, "PEFTKIT_UI_AUTH": "ann:open sesame"}
    log = tmp_path / "ui.log"
    with log.open("wb") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                  env=environment)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=2)  # the login page
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.25)
        guarded = [f"{url}/config", f"{url}/gradio_api/file={workspace / 'secret.txt'}"]
        for address in guarded:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(address, timeout=10)
            assert refused.value.code == 401, address
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        wrong = urllib.parse.urlencode({"username": "ann", "password": "guess"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            opener.open(f"{url}/login", wrong, timeout=10)
        right = urllib.parse.urlencode({"username": "ann", "password": "open sesame"}).encode()
        assert opener.open(f"{url}/login", right, timeout=10).status == 200
        assert opener.open(f"{url}/config", timeout=10).status == 200
    finally:
        server.terminate()
        server.wait(60)


def test_a_run_action_reading_outside_the_workspace_is_refused(space: Workspace, tmp_path):
    from peftkit.recipe import recipe_from_dict, save_recipe
    from peftkit.ui.runs_page import confine_run

    outside = tmp_path / "elsewhere.csv"
    outside.write_text("text,label\na,b\n")
    run = space.root / "r"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "peftkit.json").write_text('{"base_model": "tiny-bert"}')
    recipe = {"model": "tiny-bert", "task": {"type": "classification", "train_file": str(outside)}}
    save_recipe(recipe_from_dict(recipe), run / "recipe.yaml")
    confine_run(space, run, reads_data=False)  # merge and export read only the base model
    with pytest.raises(WorkspaceError, match="elsewhere.csv is outside the workspace"):
        confine_run(space, run, reads_data=True)
    (run / "adapter" / "peftkit.json").write_text(f'{{"base_model": "{tmp_path}"}}')
    with pytest.raises(WorkspaceError, match="is outside the workspace"):
        confine_run(space, run, reads_data=False)


def test_eval_of_a_stopped_run_says_it_is_unfinished_and_how_to_resume(tmp_path, capsys):
    from peftkit.cli import main

    run = tmp_path / "ws" / "stopped"
    (run / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (run / "ui-recipe.yaml").write_text("model: tiny-bert\n")
    assert main(["eval", str(run)]) == 2
    error = capsys.readouterr().err
    assert "holds an unfinished run" in error and "does not exist" not in error
    assert f"peftkit train {run / 'ui-recipe.yaml'} --resume" in error


def test_an_upload_never_replaces_an_earlier_one_of_the_same_name(space, tmp_path) -> None:
    first, second = tmp_path / "a" / "d.csv", tmp_path / "b" / "d.csv"
    for path, text in ((first, "text,label\na,b\n"), (second, "text,label\nc,d\n")):
        path.parent.mkdir()
        path.write_text(text)
    kept = space.save_upload(first)
    assert space.save_upload(first) == kept  # the same file again: the same copy
    replaced = space.save_upload(second)
    assert replaced != kept and replaced.parent == kept.parent and replaced.suffix == ".csv"
    assert kept.read_text() == first.read_text() and replaced.read_text() == second.read_text()


def test_a_run_trains_on_its_own_copy_of_the_data(space: Workspace, monkeypatch) -> None:
    from peftkit.recipe import load_recipe
    from peftkit.ui import training_form

    data = space.root / "uploads" / "d.csv"
    data.parent.mkdir(parents=True)
    data.write_text("text,label\n" + "".join(f"t{i},l{i % 2}\n" for i in range(20)))
    recipe = build_recipe(space, "tiny-bert", {"type": "classification", "train_file": str(data)},
                          {"name": "lora"}, {}, "run")  # fmt: skip
    slots = jobs.JobSlots()
    started = []
    monkeypatch.setattr(slots, "start", lambda *args, **kw: started.append(args))
    training_form.start_training(slots, recipe)
    written = load_recipe(space.root / "run" / "ui-recipe.yaml")
    copy = space.root / "run" / "data" / "d.csv"
    assert written.task.train_file == str(copy) and copy.read_text() == data.read_text()
    data.write_text("text,label\nchanged,x\n")  # what a later upload or edit does
    assert copy.read_text().count("\n") == 21
    assert started[0][1][-1] == str(space.root / "run" / "ui-recipe.yaml")


def test_a_refused_start_writes_no_run_folder(space: Workspace, tmp_path: Path) -> None:
    from peftkit.ui import training_form

    slots = jobs.JobSlots()
    busy = slots.start("train", [sys.executable, "-c", SLEEPER], tmp_path / "busy.log")
    recipe = build_recipe(space, "tiny-bert", {"type": "classification", "dataset": "copy-words"},
                          {"name": "lora"}, {}, "second")  # fmt: skip
    try:
        with pytest.raises(WorkspaceError, match="A train job is still running"):
            training_form.start_training(slots, recipe)
    finally:
        busy.stop()
        busy.wait(30)
    assert not (space.root / "second").exists()


def test_output_panes_show_no_terminal_codes_and_a_failure_its_whole_error_line() -> None:
    from peftkit.ui.widgets import error_line

    coloured = (
        "\x1b[1m\x1b[31mwarning\x1b[0m: newly initialized\x1b]8;;http://x\x07link\x1b]8;;\x07"
    )
    assert progress.clean_output(coloured) == "warning: newly initialized" + "link"
    line = "peftkit: error: Recipe /a/very/long/path/" + "x" * 300 + "/recipe.yaml does not exist."
    assert error_line(f"loading\n{line}\n\n") == line
    assert error_line("Traceback\n  File x\nValueError: bad\n") == "ValueError: bad"
    assert error_line("") == "(no output)"


def test_an_ended_run_shows_no_time_left() -> None:
    from peftkit.ui.training_form import RunStatus

    bar = progress.training_progress(BAR_LOG)
    running = RunStatus("running", bar, [], None, "", "training").headline()
    assert running == "running · step 13/20 (00:10 so far, about 00:06 left)"
    stopped = RunStatus("stopped", bar, [(12, 0.5)], None, "").headline()
    assert stopped == "stopped · step 13/20 (00:10 so far) · loss 0.5000 at step 12"


def test_checkpoints_are_listed_by_step_and_gguf_export_only_for_causal_lms(space) -> None:
    from peftkit.ui.runs_page import gguf_exportable, run_details

    run = space.root / "r"
    for step in (5, 10, 40):
        (run / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    assert "checkpoints: checkpoint-5, checkpoint-10, checkpoint-40" in run_details(run)
    assert not gguf_exportable(run)  # no adapter yet
    (run / "adapter").mkdir()
    for task, offered in (("classification", False), ("seq2seq", False), ("causal-lm", True),
                          ("chat", True)):  # fmt: skip
        (run / "adapter" / "peftkit.json").write_text(f'{{"task": "{task}"}}')
        assert gguf_exportable(run) is offered, task


def test_the_quiet_phases_before_and_after_training_are_named() -> None:
    from peftkit.ui.training_form import RunStatus

    loading = "Loading weights: 100%|##########| 37/37 [00:00<00:00, 900.1it/s]\n"
    assert "loading the model" in progress.training_phase(loading, None)
    started = progress.training_phase(loading + "trainable parameters: 1,090\n", None)
    assert started == "starting to train"
    assert progress.training_phase(BAR_LOG, progress.training_progress(BAR_LOG)) == "training"
    done = BAR_LOG + "\r100%|##########| 20/20 [00:16<00:00, 1.25it/s]"
    bar = progress.training_progress(done)
    phase = progress.training_phase(done, bar)
    assert phase == "trained: scoring the tuned model on the held-out rows"
    headline = RunStatus("running", bar, [], None, "", phase).headline()
    assert headline == f"running · {phase} · step 20/20 (00:16 so far)"  # no "00:00 left"


def test_the_traceback_of_stops_interrupt_is_cut_to_one_line() -> None:
    output = (
        'step 3\nTraceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        '    train()\n\n  File "y.py", line 2, in train\n    step()\nKeyboardInterrupt\n'
    )
    assert progress.without_interrupt_traceback(output) == "step 3\nKeyboardInterrupt (stopped)\n"
    failure = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad\n'
    assert progress.without_interrupt_traceback(failure) == failure  # a real error stays whole


def test_with_no_compare_plan_the_page_says_how_to_add_one(space: Workspace, tmp_path) -> None:
    from peftkit.ui.compare_page import plan_choice

    names = list(space.plans(tmp_path / "no-recipes-here"))  # outside the repository
    assert names == []
    chosen, hint = plan_choice(names, None)
    assert chosen is None and "`recipe`" in hint and "`methods`" in hint and "plans/" in hint
    (space.root / "plans").mkdir()
    (space.root / "plans" / "p.yaml").write_text(
        "recipe: r.yaml\nmethods: [{method: {name: lora}}]\n"
    )
    assert plan_choice(list(space.plans(None)), "gone.yaml") == ("plans/p.yaml", "")


def test_children_leave_out_transformers_warnings_unless_asked(tmp_path, monkeypatch) -> None:
    show = "import os; print(os.environ['TRANSFORMERS_VERBOSITY'], flush=True)"
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    job = jobs.start([sys.executable, "-c", show], tmp_path / "quiet.log")
    assert job.wait(30) == 0 and job.text() == "error\n"
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's own choice wins
    job = jobs.start([sys.executable, "-c", show], tmp_path / "chosen.log")
    assert job.wait(30) == 0 and job.text() == "info\n"


def test_the_form_saved_as_a_recipe_is_the_one_start_would_train(space: Workspace) -> None:
    from peftkit.recipe import load_recipe
    from peftkit.ui.training_form import save_form_recipe

    recipe = build_recipe(space, "tiny-bert", {"type": "classification", "dataset": "copy-words"},
                          {"name": "lora", "rank": 4}, {"max_steps": 7}, "saved")  # fmt: skip
    path = save_form_recipe(space, recipe)
    assert path == space.root / "recipes" / "saved.yaml" and load_recipe(path) == recipe
    with pytest.raises(WorkspaceError, match="already exists; choose another run name"):
        save_form_recipe(space, recipe)


def test_a_failing_page_update_changes_nothing_and_the_next_one_retries(capsys) -> None:
    from peftkit.ui.widgets import polled

    calls = []

    def poll(value: int) -> list[int]:
        calls.append(value)
        if len(calls) == 1:
            raise ValueError("event file read while written")
        return [value, value]

    handler = polled(poll, 2)
    kept = handler(1)
    assert len(kept) == 2 and all(update == {"__type__": "update"} for update in kept)
    assert "event file read while written" in capsys.readouterr().err
    assert handler(2) == [2, 2]


@pytest.mark.parametrize("value, problem", [(0, "at least 1, got 0"), (-2, "at least 1"),
                                            (2.5, "whole number")])  # fmt: skip
def test_a_limit_on_kept_checkpoints_is_a_positive_whole_number(value, problem) -> None:
    from peftkit.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match=f"save_total_limit.*{problem}"):
        recipe_from_dict({"training": {"save_total_limit": value}})


def test_a_run_keeps_only_its_newest_checkpoints_and_resumes_from_the_last(tmp_path) -> None:
    from peftkit.cli import main
    from peftkit.training.checkpoints import find_checkpoint

    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"w{i} x,l{i % 2}\n" for i in range(24)))
    recipe, run = tmp_path / "recipe.yaml", tmp_path / "run"
    recipe.write_text(f"model: tiny-bert\ntask: {{type: classification, train_file: {data}}}\n"
                      "training: {max_steps: 8, batch_size: 4, save_steps: 2, "
                      f"save_total_limit: 2}}\noutput_dir: {run}\n")  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    kept = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-6", "checkpoint-8"]  # of 2, 4, 6 and 8
    assert find_checkpoint(run, "latest").name == "checkpoint-8"


def _form_roundtrip(space: Workspace, name: str) -> tuple[object, object]:
    """Load a recipe of the workspace into the Train form's widgets and read them back as the
    page does: (the recipe loaded, the recipe the form then describes)."""
    from peftkit.ui import train_page
    from peftkit.ui import training_form as tf
    from peftkit.ui.forms import field_specs, method_forms, section_values

    loaded = tf.load_form_recipe(space, name)
    values = tf.form_values(space, loaded)
    specs = method_forms()[values.method["name"]]
    method = {"name": values.method["name"]} | section_values(
        specs, [train_page._widget_value(s, values.method) for s in specs], "method"
    )
    training_specs = field_specs(TrainConfig)
    training = section_values(training_specs, [train_page._widget_value(s, values.training)
                                                for s in training_specs], "training")  # fmt: skip
    task = {k: v for k, v in values.task.items() if v is not None}
    if values.train_file:
        task["train_file"] = values.train_file
    again = build_recipe(space, values.model, task, method, training, values.run_name)
    return loaded, again


def test_a_recipe_loaded_into_the_form_reads_back_as_the_same_recipe(space: Workspace) -> None:
    from peftkit.ui.training_form import save_form_recipe

    data = space.root / "uploads" / "d.csv"
    data.parent.mkdir(parents=True)
    data.write_text("q,a\n" + "".join(f"p{i},r{i}\n" for i in range(12)))
    recipe = build_recipe(
        space, "tiny-gpt2",
        {"type": "causal-lm", "train_file": str(data), "prompt_column": "q",
         "response_column": "a", "max_length": 64},
        {"name": "lora", "rank": 4, "target_modules": ["c_attn"]},
        {"max_steps": 7, "save_total_limit": 2, "group_by_length": False}, "orig",
    )  # fmt: skip
    save_form_recipe(space, recipe)
    loaded, again = _form_roundtrip(space, "recipes/orig.yaml")
    assert loaded == recipe
    assert again.output_dir == str(space.root / "orig-copy")  # a clone: a new run name
    assert dataclasses.replace(again, output_dir=recipe.output_dir) == recipe


def test_an_upload_is_mapped_onto_a_formats_fields(space: Workspace, tmp_path: Path) -> None:
    from peftkit.data.files import read_rows
    from peftkit.tasks.conversations import to_messages
    from peftkit.ui.training_form import mapped_rows, write_mapped

    rows = [{"task": "Add", "extra": "1 and 2", "answer": 3, "other": "x"}]
    records = mapped_rows(rows, "alpaca", {"instruction": "task", "input": "extra",
                                           "output": "answer"})  # fmt: skip
    assert to_messages(records[0]) == [{"role": "user", "content": "Add\n\n1 and 2"},
                                       {"role": "assistant", "content": "3"}]  # fmt: skip
    upload = space.root / "uploads" / "qa.csv"
    upload.parent.mkdir(parents=True)
    upload.write_text("question,reply\nhi,hello\n")
    mapped = write_mapped(space, upload, "prompt-completion",
                          {"prompt": "question", "completion": "reply"})  # fmt: skip
    assert mapped == space.root / "uploads" / "qa-prompt-completion.jsonl"
    assert read_rows(mapped) == [{"prompt": "hi", "response": "hello"}]
    assert upload.read_text() == "question,reply\nhi,hello\n"  # the upload stays as it was
    with pytest.raises(DataError, match="needs a column for 'output'"):
        mapped_rows(rows, "alpaca", {"instruction": "task"})
    with pytest.raises(DataError, match="no column 'missing'"):
        mapped_rows(rows, "messages", {"messages": "missing"})


def test_the_preview_shows_rows_as_the_prompt_format_and_chat_template_make_them(
    space: Workspace,
) -> None:
    from peftkit.chat_template import render_chat
    from peftkit.models import load_model
    from peftkit.ui.preview import preview_rows

    data = space.root / "pairs.csv"
    data.write_text("prompt,response\n" + "".join(f"say {i},ok {i}\n" for i in range(10)))
    _, tokenizer = load_model("tiny-gpt2", "causal-lm")
    causal = preview_rows({"type": "causal-lm", "train_file": str(data)}, "tiny-gpt2", 10)
    chat = preview_rows({"type": "chat", "train_file": str(data)}, "tiny-gpt2", 10)
    eos = tokenizer.eos_token
    # Causal-LM: prompt, response and EOS; the loss on the response and EOS (its closed form).
    pairs = {(f"say {i}", f"ok {i}") for i in range(10)}
    shown = {(row.text(), row.learned_text()) for row in causal}
    expected = {(f"{p}{r}{eos}", f"{r}{eos}") for p, r in pairs}
    assert len(causal) == 9 and shown <= expected  # the 90% training split
    # Chat: the conversation through the chat template; the loss on the answer's turn.
    for row in chat:
        prompt = next(p for p, r in pairs if row.learned_text().startswith(r))
        answer = dict(pairs)[prompt]
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        assert row.text() == render_chat(turns, tokenizer)
        assert row.learned_text().startswith(answer) and row.learned < row.tokens


def test_the_chat_answers_are_the_serve_engines_streamed_side_by_side(space: Workspace) -> None:
    import torch

    import peftkit
    from peftkit.api import load
    from peftkit.decoding.generate import generate
    from peftkit.models import load_model
    from peftkit.ui.chat import ChatEngines, chat_stream

    model, tokenizer = load_model("tiny-gpt2", "causal-lm")
    model = peftkit.apply(model, peftkit.LoraConfig(rank=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator()
                                            .manual_seed(1)) * 0.5)  # fmt: skip
    adapter = space.root / "chatty" / "adapter"
    peftkit.save(model, adapter, info={"base_model": "tiny-gpt2", "task": "causal-lm"})
    (space.root / "chatty" / "summary.json").write_text("{}")
    models = {"base": load_model("tiny-gpt2", "causal-lm")[0].eval(),
              "tuned": load(load_model("tiny-gpt2", "causal-lm")[0], adapter).eval()}  # fmt: skip
    engines = ChatEngines(space)
    try:
        service = engines.service_for("tiny-gpt2", "chatty")
        talk = {side: [{"role": "user", "content": "hi"}] for side in models}
        for second in ("and then?", None):
            steps = list(chat_stream(service, talk, 0.0, 1.0, 10))
            for side, chosen in models.items():
                want = generate(chosen, tokenizer, [talk[side]], max_new_tokens=10, chat=True)
                assert steps[-1][side] == want[0].text
                talk[side] = [*talk[side], {"role": "assistant", "content": steps[-1][side]}]
                if second:
                    talk[side].append({"role": "user", "content": second})
            assert len(steps) > 2  # streamed: text arrives piece by piece
            assert steps[-1]["base"] != steps[-1]["tuned"]
        scorer = space.root / "scorer" / "adapter"  # a classification run: no text to chat with
        bert = peftkit.apply(load_model("tiny-bert", "classification")[0],
                             peftkit.LoraConfig(rank=2))  # fmt: skip
        peftkit.save(bert, scorer, info={"base_model": "tiny-bert", "task": "classification"})
        (scorer.parent / "summary.json").write_text("{}")
        with pytest.raises(ConfigError, match="classification adapter does not generate text"):
            engines.service_for("tiny-bert", "scorer")
    finally:
        engines.close()
