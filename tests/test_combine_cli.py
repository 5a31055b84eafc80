"""`peftkit combine` end to end on two tiny runs trained on two different tasks: the table, the
kept shares and flags recomputed from the reported numbers, the task-arithmetic row against a
model with the exact weighted update added to its weights by hand, and every bad input refused
before a model loads or a file is written."""

import json

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.data.collate import Collator
from peftkit.models import load_model
from peftkit.recipe import load_recipe
from peftkit.tasks.types import get_task_type, split_rows

TASKS = {
    "count": lambda i: (f"count from {i}:", " " + " ".join(str(i + k) for k in range(4))),
    "echo": lambda i: (f"say {'abc'[i % 3]} twice:", f" {'abc'[i % 3]} {'abc'[i % 3]}"),
}


def _train(folder, task, rank=4, model="tiny-llama", steps=12, targets="q_proj, v_proj"):
    rows = [dict(zip(("prompt", "response"), TASKS[task](i), strict=True)) for i in range(40)]
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = folder / f"{task}-r{rank}-{model}-{targets.replace(', ', '-')}"
    recipe = folder / f"{run.name}.yaml"
    recipe.write_text(
        f"model: {model}\n"
        f"task: {{type: causal-lm, train_file: {data}, max_length: 48}}\n"
        f"method: {{name: lora, rank: {rank}, alpha: {2 * rank}, dropout: 0.0, "
        f"target_modules: [{targets}]}}\n"
        f"training: {{max_steps: {steps}, batch_size: 8, learning_rate: 0.02, threads: 1, "
        "logging_steps: 6, eval_batch_size: 8}\n"
        f"output_dir: {run}\n"
    )
    assert main(["train", str(recipe)]) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    return {task: _train(folder, task) for task in TASKS}


def test_combine_scores_every_combination_on_every_task(runs, tmp_path, capsys):
    out = tmp_path / "out"
    hows = ["task_arithmetic", "linear", "ties_svd", "dare_ties"]
    code = main(["combine", f"count={runs['count']}", f"echo={runs['echo']}", "--how", *hows,
                 "--weights", "1", "1", "--density", "0.5", "--max-loss", "0.2",
                 "--output-dir", str(out), "--save-adapters"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "combine.json").read_text())
    labels = ["base", "count", "echo", "task_arithmetic", "linear", "ties_svd-d50",
              "dare_ties-d50"]  # fmt: skip
    assert list(report["headline"]) == labels
    printed = capsys.readouterr().out
    assert report["table"] in printed
    headline = report["headline"]
    # The flag rule, recomputed: keeps less than 80% of a task's gain over the base.
    for label in labels[3:]:
        lost = []
        for task in TASKS:
            base, own = headline["base"][task], headline[task][task]
            assert own < base, "each source adapter lowers its own task's loss"
            if (headline[label][task] - base) / (own - base) < 0.8:
                lost.append(task)
        assert report["flagged"].get(label, []) == lost
        assert (out / "adapters" / label / "adapter_config.json").is_file()

    # task_arithmetic's loss equals that of the base with the exact sum of updates added.
    base, tokenizer = load_model("tiny-llama", "causal-lm")
    modules = dict(base.named_modules())
    for task in TASKS:
        loaded = peftkit.load(load_model("tiny-llama", "causal-lm")[0], runs[task] / "adapter")
        with torch.no_grad():
            for name, module in loaded.named_modules():
                if hasattr(module, "get_delta_weight") and "default" in module.lora_A:
                    target = modules[name.removeprefix("base_model.model.")]
                    target.weight += module.get_delta_weight("default")
    for task in TASKS:
        recipe = load_recipe(runs[task] / "recipe.yaml")
        kind = get_task_type("causal-lm")
        train, held_out = split_rows(recipe.task)
        data = kind.prepare(recipe.task, tokenizer, train[:1], held_out)
        loss = kind.evaluate(base, data, Collator(tokenizer.pad_token_id), 8)["eval_loss"]
        assert abs(loss - headline["task_arithmetic"][task]) < 1e-4


def test_bad_inputs_are_refused_before_anything_is_written(runs, tmp_path):
    folder = tmp_path / "more"
    folder.mkdir()
    wide = _train(folder, "echo", rank=8, steps=2)
    qwen = _train(folder, "echo", model="tiny-qwen2", steps=2)
    narrow = _train(folder, "echo", steps=2, targets="q_proj")
    out = tmp_path / "out"
    count, echo = str(runs["count"]), str(runs["echo"])
    cases = [
        ([count], "at least two runs"),
        ([count, str(qwen)], "different base models"),
        ([count, echo, "--weights", "1"], "one weight per run: 2 runs, 1 weights"),
        ([count, echo, "--how", "ties", "--density", "0"], r"density in \(0, 1\]"),
        ([count, echo, "--how", "dare_linear", "--density", "1.2"], r"density in \(0, 1\]"),
        ([count, echo, "--how", "ties_svd"], r"density in \(0, 1\]"),
        ([count, str(wide), "--how", "linear"], "needs equal ranks"),
        ([count, echo, "--how", "average"], "Unknown combination 'average'"),
        ([count, echo, "--how", "cat", "cat"], "named twice"),
        ([count, str(narrow)], "adapt different modules"),
        ([count, str(tmp_path)], "not a finished peftkit run"),
        ([count, echo, "--max-loss", "2"], "--max-loss"),
    ]
    for arguments, message in cases:
        with pytest.raises(Exception, match=message):
            from peftkit.cli import build_parser

            args = build_parser().parse_args(["combine", *arguments, "--output-dir", str(out)])
            args.handler(args)
        assert not out.exists(), f"{arguments} wrote something"
    # The same through main: one error line, exit status 2.
    assert main(["combine", count, str(qwen), "--output-dir", str(out)]) == 2
    # An earlier report is not replaced without --overwrite.
    out.mkdir()
    (out / "combine.json").write_text("{}")
    assert main(["combine", count, echo, "--output-dir", str(out)]) == 2
    assert (out / "combine.json").read_text() == "{}"
