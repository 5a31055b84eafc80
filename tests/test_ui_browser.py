"""`peftkit ui` in a real browser: headless Chromium (Debian's, driven by Playwright) on the UI
served on a free localhost port with tiny models, used as a person would use it.

Each test ends with a screenshot of its page in the test's temporary folder; with
PEFTKIT_UI_SCREENSHOTS=docs/ui one of each page is also written there (the README's pictures)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from peftkit.cli import main
from peftkit.run_folder import earlier_run
from peftkit.training.checkpoints import find_checkpoint
from peftkit.ui.jobs import process_start_time

CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium, headless, nothing fetched from the network (see docs/ui.md).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
REPOSITORY = Path(__file__).resolve().parent.parent
WAIT_MS = 120_000  # a step of the page that trains or loads a model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui") / "runs"


@pytest.fixture(scope="module")
def server(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`peftkit ui` on a free port of 127.0.0.1, from the repository (its recipes/ plans)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "ui.log"
    command = [sys.executable, "-m", "peftkit.cli", "ui", "--workspace", str(workspace),
               "--port", str(port), "--max-upload-mib", "1"]  # fmt: skip
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                   cwd=REPOSITORY)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise AssertionError(f"peftkit ui did not start:\n{log.read_text()}") from None
            time.sleep(0.25)
    yield url
    process.terminate()  # SIGTERM: the UI stops its children before it exits
    assert process.wait(60) == 0, log.read_text()
    for record in (workspace / ".ui" / "jobs").glob("*.json"):
        pid = json.loads(record.read_text())["pid"]
        assert process_start_time(pid) is None, f"{record.stem} job {pid} outlived the UI"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.is_file(), "Chromium is missing: apt-get install chromium (make test does)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    opened.goto(server)
    opened.wait_for_selector("#train-start")
    yield opened
    context.close()


def screenshot(page: Page, name: str, folder: Path, for_docs: bool = False) -> None:
    """The page as it looks now, into the test's folder (and docs/ui when asked)."""
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    wanted = os.environ.get("PEFTKIT_UI_SCREENSHOTS")
    if wanted and for_docs:
        Path(wanted).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(wanted) / path.name)


def pick(page: Page, elem_id: str, value: str) -> None:
    """Choose a dropdown's option as a person would: open it, click the option."""
    page.click(f"#{elem_id} input")
    page.locator(f"#{elem_id} li[aria-label='{value}']").click()


def type_in(page: Page, elem_id: str, text: object, enter: bool = False) -> None:
    """Type into a text or number box (replacing what it held)."""
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(str(text))
    if enter:
        page.keyboard.press("Enter")


def set_slider(page: Page, elem_id: str, value: float) -> None:
    """Type a slider's value into its number box and leave the box (as letting go does)."""
    page.locator(f"#{elem_id} input[type=number]").fill(str(value))
    page.keyboard.press("Tab")


def write_reviews(path: Path, label: str = "label", count: int = 64) -> Path:
    """A small two-class CSV (64 rows unless told)."""
    words = {"pos": "good fine great nice".split(), "neg": "bad awful poor sad".split()}
    rows = [f"text,{label}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        kind = "pos" if i % 2 else "neg"
        rows.append(f"{' '.join(words[kind][: 1 + i % 4])},{kind}")
    path.write_text("\n".join(rows) + "\n")
    return path


def upload_reviews(page: Page, path: Path) -> None:
    """Train tiny-bert on an uploaded CSV: the data section filled in."""
    pick(page, "train-model", "tiny-bert")
    page.click("#train-source label:has-text('uploaded file')")
    page.set_input_files("#train-upload input[type=file]", str(path))


def set_budget(page: Page, **values: object) -> None:
    """Fill the training fields of the form (training-<field> ids)."""
    for name, value in values.items():
        type_in(page, "training-" + name.replace("_", "-"), value)


def test_a_tiny_run_from_the_train_page_ends_with_its_loss_curve_and_summary(
    page: Page, workspace: Path, tmp_path: Path
) -> None:
    upload_reviews(page, write_reviews(tmp_path / "reviews.csv"))
    page.wait_for_selector("#train-data-status:has-text('data: 58 training rows, 6 held out')")
    type_in(page, "train-run-name", "tiny")
    set_budget(page, max_steps=12, batch_size=8, learning_rate=0.01, logging_steps=2,
               save_steps=12)  # fmt: skip
    page.click("#train-start")
    page.wait_for_selector("#train-summary:has-text('accuracy after')")

    run = workspace / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["model"] == "tiny-bert"
    shown = page.inner_text("#train-summary")
    assert (
        f"{summary['metric_after']:.4f}" in shown
        and f"{summary['trainable_parameters']:,}" in shown
    )
    # The curve: Trainer's own record of the losses it logged (the checkpoint's trainer state).
    state = json.loads((run / "checkpoints/checkpoint-12/trainer_state.json").read_text())
    logged = [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]
    assert [step for step, _ in logged] == [2, 4, 6, 8, 10, 12]
    assert f"loss {logged[-1][1]:.4f} at step 12" in page.inner_text("#train-status")
    axes = page.locator("#train-loss svg [aria-roledescription='axis']")
    labels = [axes.nth(i).get_attribute("aria-label") for i in range(axes.count())]
    # Both axes are numbers (a linear scale), not the logged values as categories.
    assert any("titled 'step' for a linear scale" in label for label in labels), labels
    assert any("titled 'loss' for a linear scale" in label for label in labels), labels
    assert page.locator("#train-loss svg path[aria-roledescription='line mark']").count() == 1
    screenshot(page, "train", tmp_path, for_docs=True)


def test_stop_ends_a_run_leaving_a_valid_folder_that_resumes(
    page: Page, workspace: Path, tmp_path: Path
) -> None:
    upload_reviews(page, write_reviews(tmp_path / "reviews.csv"))
    page.wait_for_selector("#train-data-status:has-text('data:')")
    type_in(page, "train-run-name", "stopped")
    set_budget(page, max_steps=100_000, batch_size=8, save_steps=50, logging_steps=10)
    page.click("#train-start")
    run = workspace / "stopped"
    deadline = time.time() + 120
    while not (run / "checkpoints" / "checkpoint-50").is_dir():
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    page.click("#train-stop")
    page.wait_for_selector("#train-summary:has-text('Stopped; newest checkpoint')")
    assert "stopped" in page.inner_text("#train-status")

    assert earlier_run(run) == "an unfinished run"
    checkpoint = find_checkpoint(run, "latest")  # complete: trainer state and adapter
    step = int(checkpoint.name.split("-")[1])
    assert step % 50 == 0
    assert f"newest checkpoint {checkpoint.name} in" in page.inner_text("#train-summary")
    screenshot(page, "train-stopped", tmp_path)
    # The command the page names continues the run from that checkpoint.
    command = [sys.executable, "-m", "peftkit.cli", "train", str(run / "ui-recipe.yaml"),
               "--resume", "--set", f"training.max_steps={step + 4}"]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == str(checkpoint) and summary["steps"] == step + 4


@pytest.fixture(scope="module")
def steered_adapter(workspace: Path) -> Path:
    """A tiny-gpt2 LoRA adapter whose B matrices are random (not zero), saved as a finished
    run of the workspace: its effect on the greedy text is large enough to see."""
    import torch

    import peftkit
    from peftkit.models import load_model

    model, _ = load_model("tiny-gpt2", "causal-lm")
    model = peftkit.apply(model, peftkit.LoraConfig(rank=4, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    run = workspace / "steered"
    peftkit.save(model, run / "adapter", info={"base_model": "tiny-gpt2", "task": "causal-lm"})
    return run


def wait_for_text(page: Page, elem_id: str, text: str) -> None:
    """Wait until a text box holds exactly `text`."""
    page.wait_for_function(
        f"document.querySelector('#{elem_id} textarea').value === {json.dumps(text)}"
    )


def test_the_playground_shows_alphas_effect_on_greedy_text(
    page: Page, steered_adapter: Path, tmp_path: Path
) -> None:
    from peftkit.api import load
    from peftkit.decoding.generate import generate
    from peftkit.decoding.proxy import WithoutAdapter, proxy_generate
    from peftkit.models import load_model

    prompt, tokens = "the cat", 12
    base, tokenizer = load_model("tiny-gpt2", "causal-lm")
    expert = load(load_model("tiny-gpt2", "causal-lm")[0], steered_adapter / "adapter")
    expected = {alpha: proxy_generate(base, expert, WithoutAdapter(expert), tokenizer, [prompt],
                                      alpha=alpha, max_new_tokens=tokens)[0]
                for alpha in (0.0, 2.0)}  # fmt: skip
    base_text = generate(base, tokenizer, [prompt], max_new_tokens=tokens)[0].text
    assert expected[0.0] == base_text != expected[2.0]  # alpha 0 is the base; 2 moves it

    # The adapter was saved after the page opened: choosing the tab reads the workspace again.
    page.get_by_role("tab", name="Playground").click()
    pick(page, "play-adapters", "steered")
    page.keyboard.press("Escape")
    page.wait_for_function(
        "document.querySelector('#play-model input').value === 'tiny-gpt2'"
    )  # the base follows the adapter's recorded one
    type_in(page, "play-prompt", prompt)
    type_in(page, "play-max", tokens)
    set_slider(page, "play-alpha", 0)
    page.click("#play-generate")
    wait_for_text(page, "play-base", base_text)
    wait_for_text(page, "play-proxy", expected[0.0])

    set_slider(page, "play-alpha", 2)  # letting go of the slider regenerates the proxy text
    wait_for_text(page, "play-proxy", expected[2.0])
    assert page.input_value("#play-base textarea") == base_text
    screenshot(page, "playground", tmp_path, for_docs=True)


def test_a_csv_missing_a_column_shows_the_clis_error_and_the_page_keeps_working(
    page: Page, workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_reviews(tmp_path / "sentiment.csv", label="sentiment")
    upload_reviews(page, data)
    page.wait_for_selector("#train-data-status:has-text('peftkit: error:')")
    shown = page.inner_text("#train-data-status")
    # The same file given to `peftkit train` (the copy the page keeps in the workspace).
    uploaded = workspace / "uploads" / "sentiment.csv"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny-bert\ntask: {{type: classification, train_file: {uploaded}}}\n"
                      f"output_dir: {tmp_path / 'cli-run'}\n")  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    cli_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert cli_line.startswith("peftkit: error: ") and "has no column 'label'" in cli_line
    assert cli_line == shown.strip()
    # Still working: naming the right column reads the file.
    type_in(page, "train-label-column", "sentiment", enter=True)
    page.wait_for_selector("#train-data-status:has-text('data: 58 training rows, 6 held out')")
    screenshot(page, "train-upload-error", tmp_path)


def test_paths_outside_the_workspace_are_refused(page: Page, tmp_path: Path) -> None:
    outside = tmp_path / "model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")  # a model folder, just not in the workspace
    type_in(page, "train-model", str(outside), enter=True)
    page.click("#train-estimate")
    page.wait_for_selector("#train-estimate-result:has-text('is outside the workspace')")
    type_in(page, "train-model", "../model", enter=True)
    page.click("#train-start")
    page.wait_for_selector("#train-message:has-text('is outside the workspace')")
    pick(page, "train-model", "tiny-bert")  # and the page goes on: an estimate for a good one
    page.click("#train-estimate")
    page.wait_for_selector("#train-estimate-result:has-text('estimated peak')")


@pytest.fixture(scope="module")
def reviews_run(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny-bert LoRA run of the workspace, trained by `peftkit train`."""
    folder = tmp_path_factory.mktemp("cli")
    (workspace / "data").mkdir(parents=True, exist_ok=True)
    data = write_reviews(workspace / "data" / "reviews.csv")  # the UI reads only its workspace
    recipe = folder / "recipe.yaml"
    run = workspace / "cli-run"
    recipe.write_text(f"model: tiny-bert\ntask: {{type: classification, train_file: {data}}}\n"
                      "training: {max_steps: 8, batch_size: 8, learning_rate: 0.01}\n"
                      f"output_dir: {run}\n")  # fmt: skip
    command = [sys.executable, "-m", "peftkit.cli", "train", str(recipe)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return run


def test_the_runs_page_lists_a_run_and_re_evaluates_it(
    page: Page, reviews_run: Path, tmp_path: Path
) -> None:  # the page opens before the run exists (fixtures in order)
    summary = json.loads((reviews_run / "summary.json").read_text())
    page.get_by_role("tab", name="Runs").click()  # the run is newer than the page: no Refresh
    # The table's cells, row by row (Gradio's table rows are laid out without a box of their own,
    # which Playwright counts as hidden: read their text instead).
    page.wait_for_function("document.querySelector('#runs-table').textContent.includes('cli-run')")
    rows = page.evaluate(
        "[...document.querySelectorAll('#runs-table tr')]"
        ".map(row => [...row.querySelectorAll('th, td')].map(cell => cell.textContent.trim()))"
    )
    header = next(cells for cells in rows if any(c.startswith("after") for c in cells))
    row = next(cells for cells in rows if "cli-run" in cells)
    column = {name: [i for i, c in enumerate(header) if c.startswith(name)][0]
              for name in ("state", "after")}  # fmt: skip
    assert row[column["state"]] == "finished", rows
    assert row[column["after"]] == f"{summary['metric_after']:.4f}", rows
    pick(page, "runs-run", "cli-run")
    page.wait_for_selector("#runs-details:has-text('a finished run')")
    expect(page.locator("#runs-export")).to_be_disabled()  # GGUF takes causal LMs, not tiny-bert
    page.click("#runs-re-evaluate")
    page.wait_for_selector("#runs-details:has-text('re-evaluated:')")
    # `peftkit eval` scored the saved adapter on the recipe's held-out rows: the accuracy the run
    # measured on the same rows at its end.
    evaluated = json.loads((reviews_run / "eval.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(summary["metric_after"])
    assert f"accuracy {evaluated['accuracy']:.4f}" in page.inner_text("#runs-details")
    page.wait_for_selector("#runs-status:has-text('finished')")
    screenshot(page, "runs", tmp_path, for_docs=True)


def test_the_compare_page_runs_a_plan_and_shows_its_table_and_chart(
    page: Page, workspace: Path, tmp_path: Path
) -> None:
    plans = workspace / "plans"
    plans.mkdir(exist_ok=True)
    data = write_reviews(plans / "reviews.csv")
    (plans / "tiny-base.yaml").write_text(
        f"model: tiny-bert\ntask: {{type: classification, train_file: {data}}}\n"
        "training: {max_steps: 50, batch_size: 8, learning_rate: 0.01}\n"
    )
    (plans / "tiny.yaml").write_text(
        "recipe: tiny-base.yaml\nmethods:\n  - method: {name: lora, rank: 2}\n"
        "  - method: {name: bitfit}\n  - method: {name: full}\nquick: {training.max_steps: 3}\n"
    )
    page.get_by_role("tab", name="Compare").click()  # the plan is newer than the page
    pick(page, "compare-plan", "plans/tiny.yaml")
    # The page opens on another plan whose methods include these names too: wait until the
    # checkboxes are this plan's three (all ticked), or a click could land before the server's
    # reply re-ticks every box.
    expect(page.locator("#compare-methods label")).to_have_count(3)
    expect(page.locator("#compare-methods input:checked")).to_have_count(3)
    page.click("#compare-methods label:has-text('full')")  # two of the plan's three
    expect(page.locator("#compare-methods input:checked")).to_have_count(2)
    type_in(page, "compare-output", "compare-tiny")
    page.click("#compare-run")
    page.wait_for_selector("#compare-status:has-text('finished')")

    output = workspace / "compare-tiny"
    assert not (output / "full").exists()
    rows = page.locator("#compare-table tbody tr")
    assert rows.count() == 2
    for index, method in enumerate(["lora", "bitfit"]):
        summary = json.loads((output / method / "summary.json").read_text())
        cells = rows.nth(index).locator("td").all_inner_texts()
        assert summary["steps"] == 3  # the plan's quick budget
        headers = page.locator("#compare-table thead th").all_inner_texts()
        assert cells[headers.index("method")] == method
        assert cells[headers.index("trainable")] == f"{summary['trainable_parameters']:,}"
        assert cells[headers.index("after")] == f"{summary['metric_after']:.4f}"
    assert page.locator("#compare-chart img").count() == 1
    screenshot(page, "compare", tmp_path, for_docs=True)


def train_status(page: Page, text: str) -> None:
    """Wait until the Train page's status line holds `text`."""
    page.wait_for_selector(f"#train-status:has-text({json.dumps(text, ensure_ascii=False)})")


def test_a_reload_or_a_second_tab_attaches_to_the_running_job(
    page: Page, browser: Browser, server: str, workspace: Path, tmp_path: Path
) -> None:
    upload_reviews(page, write_reviews(tmp_path / "reviews.csv"))
    page.wait_for_selector("#train-data-status:has-text('data:')")
    type_in(page, "train-run-name", "attached")
    set_budget(page, max_steps=100_000, batch_size=8, save_steps=10, logging_steps=5)
    page.click("#train-start")
    run = workspace / "attached"
    deadline = time.time() + 120
    while not (run / "checkpoints" / "checkpoint-10").is_dir():
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    # A second tab opens, and the first is reloaded: both show the job, its curve and its log.
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    other = context.new_page()
    other.set_default_timeout(WAIT_MS)
    other.goto(server)
    page.reload()
    for each in (page, other):
        train_status(each, "running · step")
        each.wait_for_selector("#train-loss svg path[aria-roledescription='line mark']")
        each.locator("#train-output").get_by_text("output", exact=True).first.click()
        each.wait_for_selector("#train-log:has-text('it/s')")
    # Stop from the second tab ends the run; both pages say so.
    other.click("#train-stop")
    for each in (page, other):
        each.wait_for_selector("#train-summary:has-text('Stopped; newest checkpoint')")
        train_status(each, "stopped")
    assert earlier_run(run) == "an unfinished run"
    # Resumed from the Runs page of one tab, the run shows on the Train page of the other.
    page.get_by_role("tab", name="Runs").click()
    pick(page, "runs-run", "attached")
    page.click("#runs-resume")
    page.wait_for_selector("#runs-message:has-text('resuming: peftkit train')")
    train_status(other, "running · step")
    assert "Stopped" not in other.inner_text("#train-summary")
    screenshot(other, "train-attached", tmp_path)
    other.click("#train-stop")
    train_status(other, "stopped")
    assert "about" not in other.inner_text("#train-status")  # no time left on a stopped run
    context.close()


def test_a_cleared_or_replaced_upload_is_not_what_trains(
    page: Page, workspace: Path, tmp_path: Path
) -> None:
    from peftkit.ui.training_form import check_data

    first = write_reviews(tmp_path / "first" / "reviews.csv")
    upload_reviews(page, first)
    page.wait_for_selector("#train-data-status:has-text('data: 58 training rows, 6 held out')")
    page.locator("#train-upload button[aria-label='Clear']").first.click()
    type_in(page, "train-run-name", "after-clear")
    page.click("#train-start")
    page.wait_for_selector("#train-message:has-text('Upload a data file first')")
    assert not (workspace / "after-clear").exists()
    # Another file of the same name: it is what trains, and the first upload stays as it was.
    second = write_reviews(tmp_path / "second" / "reviews.csv", count=40)
    page.set_input_files("#train-upload input[type=file]", str(second))
    rows = check_data({"type": "classification", "train_file": str(second)})
    page.wait_for_selector(f"#train-data-status:has-text('data: {rows}')")
    set_budget(page, max_steps=2, batch_size=8, save_steps=2, logging_steps=1)
    page.click("#train-start")
    page.wait_for_selector("#train-summary:has-text('accuracy after')")
    run = workspace / "after-clear"
    recipe = (run / "ui-recipe.yaml").read_text()
    [kept] = (run / "data").iterdir()  # the run's own copy: resume and re-evaluate read it
    assert f"train_file: {kept}" in recipe and kept.read_text() == second.read_text()
    uploads = sorted(p.read_text() for p in (workspace / "uploads").glob("reviews*.csv"))
    assert sorted([first.read_text(), second.read_text()]) == uploads


def test_start_asks_again_when_the_estimate_does_not_fit(page: Page, workspace: Path) -> None:
    pick(page, "train-model", "tiny-bert")
    type_in(page, "train-run-name", "too-big")
    set_budget(page, batch_size=100_000_000)
    page.click("#train-start")
    page.wait_for_selector("#train-message:has-text('does NOT fit')")
    page.wait_for_selector("#train-estimate-result:has-text('does NOT fit')")
    assert "Press Start again" in page.inner_text("#train-message")
    assert not (workspace / "too-big").exists()  # nothing written until it starts


def test_a_failed_runs_action_shows_its_whole_error_line(
    page: Page, workspace: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = workspace / "broken"  # an adapter with no recipe beside it
    (broken / "adapter").mkdir(parents=True)
    (broken / "adapter" / "peftkit.json").write_text('{"base_model": "tiny-bert"}')
    assert main(["eval", str(broken)]) == 2
    cli_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert cli_line.startswith("peftkit: error: ") and len(cli_line) > 80
    page.get_by_role("tab", name="Runs").click()
    pick(page, "runs-run", "broken")
    page.click("#runs-re-evaluate")
    page.wait_for_selector("#runs-status:has-text('failed: peftkit eval')")
    assert cli_line in page.inner_text("#runs-status")


def test_causal_lm_trains_on_a_bundled_pairs_set_by_picking_its_columns(page: Page) -> None:
    from peftkit.ui.training_form import check_data

    pick(page, "train-model", "tiny-gpt2")
    pick(page, "train-task-type", "causal-lm")
    pick(page, "train-dataset", "copy-words")  # source and target, not prompt and response
    page.wait_for_selector("#train-data-status:has-text(\"has no column 'prompt'\")")
    for name, column in (("prompt", "source"), ("response", "target")):
        pick(page, f"train-{name}-column", column)  # the pickers offer the set's own columns
    rows = check_data({"type": "causal-lm", "dataset": "copy-words", "prompt_column": "source",
                       "response_column": "target"})  # fmt: skip
    page.wait_for_selector(f"#train-data-status:has-text('data: {rows}')")
    page.click("#train-estimate")  # the recipe the form makes is a valid one
    page.wait_for_selector("#train-estimate-result:has-text('estimated peak')")


def test_the_train_form_saves_as_a_recipe_for_the_terminal(page: Page, workspace: Path) -> None:
    from peftkit.recipe import load_recipe

    pick(page, "train-model", "tiny-bert")
    type_in(page, "train-run-name", "saved-form")
    set_budget(page, max_steps=7)
    page.click("#train-save")
    saved = workspace / "recipes" / "saved-form.yaml"
    page.wait_for_selector(f"#train-message:has-text('peftkit train {saved}')")
    recipe = load_recipe(saved)
    assert recipe.model == "tiny-bert" and recipe.training.max_steps == 7
    assert recipe.output_dir == str(workspace / "saved-form")
    assert not (workspace / "saved-form").exists()  # saving trains nothing


def test_the_form_loads_a_saved_recipe_or_an_earlier_runs_to_clone_it(
    page: Page, workspace: Path
) -> None:
    from peftkit.recipe import load_recipe, save_recipe
    from peftkit.ui.training_form import build_recipe
    from peftkit.ui.workspace import Workspace

    pick(page, "train-model", "tiny-bert")
    type_in(page, "train-run-name", "clone-me")
    set_budget(page, max_steps=7, save_total_limit=2)  # the limit on kept checkpoints
    page.click("#train-save")
    page.wait_for_selector("#train-message:has-text('clone-me.yaml')")
    saved = load_recipe(workspace / "recipes" / "clone-me.yaml")
    assert saved.training.save_total_limit == 2 and saved.training.max_steps == 7
    # An earlier run trained on its own copy of an uploaded file.
    old = workspace / "old-run"
    (old / "adapter").mkdir(parents=True)
    (old / "summary.json").write_text("{}")
    data = write_reviews(old / "data" / "reviews.csv")
    space = Workspace(workspace)
    save_recipe(build_recipe(space, "tiny-bert", {"type": "classification",
                                                  "train_file": str(data)},
                             {"name": "lora", "rank": 4}, {"max_steps": 3}, "old-run"),
                old / "recipe.yaml")  # fmt: skip

    page.reload()  # an empty form: the loaded settings come from the file
    pick(page, "train-load-source", "recipes/clone-me.yaml")
    page.click("#train-load")
    page.wait_for_selector("#train-message:has-text('loaded')")
    assert page.input_value("#train-run-name input") == "clone-me-copy"
    assert page.input_value("#training-save-total-limit input") == "2"
    page.click("#train-save")
    page.wait_for_selector("#train-message:has-text('clone-me-copy.yaml')")
    copy = load_recipe(workspace / "recipes" / "clone-me-copy.yaml")
    assert dataclasses.replace(copy, output_dir=saved.output_dir) == saved

    pick(page, "train-load-source", "old-run/recipe.yaml")  # a run: its data come too
    page.click("#train-load")
    page.wait_for_selector("#train-data-status:has-text('data: 58 training rows, 6 held out')")
    assert page.input_value("#train-run-name input") == "old-run-copy"
    assert page.locator("[id=method-rank]:visible input").input_value() == "4"
    page.click("#train-save")
    page.wait_for_selector("#train-message:has-text('old-run-copy.yaml')")
    clone = load_recipe(workspace / "recipes" / "old-run-copy.yaml")
    original = load_recipe(old / "recipe.yaml")
    assert dataclasses.replace(clone, output_dir=original.output_dir) == original


def test_an_upload_mapped_to_a_format_previews_as_the_chat_template_renders_it(
    page: Page, workspace: Path, tmp_path: Path
) -> None:
    from peftkit.chat_template import render_chat
    from peftkit.models import load_model

    pairs = {f"say {i}": f"ok {i}" for i in range(10)}
    upload = tmp_path / "qa.csv"
    upload.write_text("question,reply\n" + "".join(f"{q},{a}\n" for q, a in pairs.items()))
    pick(page, "train-model", "tiny-gpt2")
    pick(page, "train-task-type", "chat")
    page.click("#train-source label:has-text('uploaded file')")
    page.set_input_files("#train-upload input[type=file]", str(upload))
    page.wait_for_selector("#train-data-status:has-text('data: 9 training rows')")
    page.click("#train-preview-button")  # the records are in no chat format: the preview says so
    page.wait_for_selector("#train-preview:has-text(\"has fields ['question', 'reply']\")")
    page.locator("#train-format-box").get_by_text("format of the uploaded file").click()
    pick(page, "train-format", "prompt-completion")
    pick(page, "train-format-field-1", "question")
    pick(page, "train-format-field-2", "reply")
    page.click("#train-format-apply")
    page.wait_for_selector("#train-message:has-text('uploads/qa-prompt-completion.jsonl')")
    assert (workspace / "uploads" / "qa.csv").read_text() == upload.read_text()  # kept as it was
    page.click("#train-preview-button")
    page.wait_for_selector("#train-preview:has-text('row 3')")

    _, tokenizer = load_model("tiny-gpt2", "chat")
    rendered = {render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                            tokenizer): a for q, a in pairs.items()}  # fmt: skip
    boxes = page.locator("#train-preview pre")
    assert boxes.count() == 3
    for index in range(3):
        text = boxes.nth(index).evaluate("box => box.textContent")
        assert text in rendered  # the whole conversation as the template renders it
        learned = boxes.nth(index).locator("mark").first.evaluate("mark => mark.textContent")
        assert learned.startswith(rendered[text])  # the loss starts on the answer


def chat_answers(page: Page, side: str) -> list[str]:
    """The answers a chat window shows, in order."""
    return page.evaluate(
        f"[...document.querySelectorAll('#chat-{side} [data-testid=bot]')].map(m => m.textContent)"
    )


def test_the_chat_page_streams_base_and_adapter_side_by_side_over_two_turns(
    page: Page, steered_adapter: Path, tmp_path: Path
) -> None:
    from peftkit.api import load
    from peftkit.decoding.generate import generate
    from peftkit.models import load_model

    base, tokenizer = load_model("tiny-gpt2", "causal-lm")
    models = {"base": base.eval(),
              "tuned": load(load_model("tiny-gpt2", "causal-lm")[0],
                            steered_adapter / "adapter").eval()}  # fmt: skip
    page.get_by_role("tab", name="Chat").click()
    pick(page, "chat-adapter", "steered")
    page.wait_for_function("document.querySelector('#chat-model input').value === 'tiny-gpt2'")
    set_slider(page, "chat-temperature", 0)  # greedy: the text is known
    type_in(page, "chat-max-tokens", 8)
    talks = {side: [] for side in models}
    for turn, message in enumerate(("hi", "and then?"), 1):
        for talk in talks.values():
            talk.append({"role": "user", "content": message})
        type_in(page, "chat-message", message, enter=True)
        # This turn's answers are in both windows and the stream has ended.
        page.wait_for_function(
            "document.querySelectorAll('#chat-tuned [data-testid=bot]').length === "
            f"{turn} && document.querySelector('#chat-status').textContent.includes('done')"
        )
        for side, model in models.items():
            want = generate(model, tokenizer, [talks[side]], max_new_tokens=8, chat=True)[0].text
            talks[side].append({"role": "assistant", "content": want})
            shown = chat_answers(page, side)
            assert [s.strip() for s in shown] == [
                t["content"].strip() for t in talks[side] if t["role"] == "assistant"
            ], side
    assert talks["base"][-1] != talks["tuned"][-1]
    screenshot(page, "chat", tmp_path, for_docs=True)
