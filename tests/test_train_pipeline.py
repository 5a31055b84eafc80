"""The training pipeline end to end on tiny models: recipe in, adapter and summary out; the hooks
callback runs once per optimizer step; the loss is on the response only."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments

import peftkit
from peftkit.cli import main
from peftkit.data.collate import Collator
from peftkit.method import TrainingHooks
from peftkit.models import load_model
from peftkit.tasks.causal_lm import prompt_response_feature
from peftkit.training.trainer import HooksCallback, PeftkitTrainer


def _write_rows(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture
def classification_recipe(tmp_path):
    rows = [
        {
            "text": "good fine great" if i % 2 else "bad awful poor",
            "label": "pos" if i % 2 else "neg",
        }
        for i in range(60)
    ]
    data = _write_rows(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: tiny-bert\n"
        f"task: {{type: classification, train_file: {data}, max_length: 32}}\n"
        f"method: {{name: lora, rank: 4}}\n"
        f"training: {{max_steps: 30, batch_size: 8, learning_rate: 0.02, logging_steps: 10}}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    return recipe


def test_train_eval_merge_on_tiny_classifier(classification_recipe, tmp_path):
    assert main(["train", str(classification_recipe)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps"] == 30
    assert summary["metric"] == "accuracy"
    assert summary["metric_after"] > summary["eval_after"]["majority_baseline"]
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_mib"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    assert main(["eval", str(run)]) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(summary["metric_after"])

    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    base, tokenizer = load_model("tiny-bert", "classification")
    tuned = peftkit.load(base, run / "adapter").eval()
    batch = tokenizer(["good fine", "bad poor"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, tuned(**batch).logits, atol=1e-5, rtol=0)


def test_causal_lm_loss_is_on_response_and_eos_only():
    _, tokenizer = load_model("tiny-llama", "causal-lm")
    feature = prompt_response_feature(tokenizer, "Q: hi ", "hello", max_length=64)
    prompt_len = len(tokenizer("Q: hi ")["input_ids"])
    assert feature["labels"][:prompt_len] == [-100] * prompt_len
    assert feature["labels"][prompt_len:] == feature["input_ids"][prompt_len:]
    assert tokenizer.decode(feature["input_ids"][prompt_len:-1]) == "hello"
    assert feature["input_ids"][-1] == tokenizer.eos_token_id  # EOS is learnt, so tuned models stop
    assert prompt_response_feature(tokenizer, "x" * 80, "y", max_length=16) is None


def test_causal_lm_recipe_lowers_loss(tmp_path):
    rows = [
        {"prompt": f"Repeat {i % 3}: ", "response": f"{i % 3} {i % 3} {i % 3}"} for i in range(40)
    ]
    data = _write_rows(tmp_path / "sft.jsonl", rows)
    assert (
        main(
            [
                "train",
                "recipes/minilm-lora.yaml",
                "--model",
                "tiny-llama",
                "--max-steps",
                "40",
                "--set",
                "task.type=causal-lm",
                "--set",
                "task.dataset=null",
                "--set",
                f"task.train_file={data}",
                "--set",
                "training.learning_rate=0.05",
                "--set",
                "method.target_modules=all-linear",
                "--output-dir",
                str(tmp_path / "run"),
            ]
        )  # fmt: skip
        == 0
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric"] == "eval_loss"
    assert summary["metric_after"] < 0.5 * summary["metric_before"]


def test_hooks_run_once_per_optimizer_step_with_accumulated_gradients(tmp_path):
    model, tokenizer = load_model("tiny-bert", "classification")
    model = peftkit.apply(model, peftkit.LoraConfig(rank=2))
    calls = {"before": [], "after": [], "begin": []}

    def before(m, step):
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        calls["before"].append((step, all(g is not None for g in grads)))

    def after(m, step):
        calls["after"].append(step)

    hooks = TrainingHooks(
        begin_training=lambda m, total: calls["begin"].append(total),
        before_optimizer_step=before,
        after_optimizer_step=after,
        extra_loss=lambda m: torch.tensor(10.0),
    )
    features = [
        {
            "input_ids": tokenizer(f"text {i}")["input_ids"],
            "attention_mask": [1] * 7,
            "labels": i % 2,
        }
        for i in range(16)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, report_to="none", remove_unused_columns=False,
        use_cpu=True, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    trainer = PeftkitTrainer(
        model=model, args=args, train_dataset=features, data_collator=Collator(0),
        callbacks=[HooksCallback(hooks)], hooks=hooks,
    )  # fmt: skip
    result = trainer.train()
    assert calls["before"] == [(0, True), (1, True), (2, True)]  # 3 steps, not 6 micro-batches
    assert calls["after"] == [0, 1, 2]
    assert calls["begin"] == [3]  # told the step budget once, at the start
    assert result.training_loss > 10.0  # the extra term is in the optimised loss


def test_summary_counts_parameters_a_prepare_hook_creates(classification_recipe, tmp_path):
    """Child-Tuning D builds its sparse values in prepare(): the summary must count them."""
    args = ["train", str(classification_recipe), "--set", "method={name: child_tuning, mode: D}"]
    assert main([*args, "--max-steps", "3"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    head = 32 * 2 + 2  # tiny-bert classifier: hidden 32 -> 2 labels
    assert summary["trainable_parameters"] > 10 * head


def test_tensorboard_logs_the_training_loss_in_the_run_folder(classification_recipe, tmp_path):
    """training.report_to=tensorboard: event files under output_dir/logs hold every loss that
    Trainer logged (its own record: trainer_state.json of the final checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = ["training.report_to=tensorboard", "training.logging_steps=2",
                "training.save_steps=6"]  # fmt: skip
    args = ["train", str(classification_recipe), "--max-steps", "6"]
    assert main([*args, *(item for s in settings for item in ("--set", s))]) == 0
    run = tmp_path / "run"
    logs = run / "logs"
    assert list(logs.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logs))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    expected = [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]
    assert [step for step, _ in logged] == [step for step, _ in expected] == [2, 4, 6]
    assert [value for _, value in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_training_memory_counts_what_the_block_allocates_and_not_what_came_before() -> None:
    # A fresh process, as a training run is: in this long-lived test process freed memory
    # already resident would be reused, and a new allocation would not raise the resident set.
    script = """
import torch
from peftkit.training.measure import TrainingMemory
before = torch.ones(64 * 2**20 // 4)  # 64 MiB resident before the block: not counted
with TrainingMemory() as memory:
    inside = torch.ones(128 * 2**20 // 4)  # 128 MiB touched inside the block
    del inside
print(memory.exact, memory.bytes, float(before[0]))
"""
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    exact, measured = output[0] == "True", int(output[1])
    assert exact  # Linux: the high-water mark was reset at the start
    # 128 MiB, give or take what the interpreter itself frees or touches meanwhile (a few pages).
    assert 126 * 2**20 <= measured < (128 + 32) * 2**20
