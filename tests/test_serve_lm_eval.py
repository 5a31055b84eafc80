"""lm-evaluation-harness against `peftkit serve` (issue 27, item 13): a small multiple-choice task
defined here (its own YAML and JSONL, offline), run through lm-eval's `local-completions` model
against the server with an adapter, picks the same choice for every question, with the same
log-likelihoods, as lm-eval's own `hf` model loading that adapter through its `peft=` argument."""

from __future__ import annotations

import json

import pytest
from serve_support import MODEL, make_adapter

from peftkit.models import load_model
from peftkit.serve.server import ServeOptions, running

QUESTIONS = [
    ("The sky on a clear day is", [" blue", " green", " loud"], 0),
    ("Two plus two is", [" four", " seven", " a fish"], 0),
    ("A cat says", [" woof", " meow", " moo"], 1),
    ("Water freezes when it is", [" hot", " cold", " purple"], 1),
    ("The opposite of up is", [" down", " left", " sideways"], 0),
    ("Bread is made from", [" stone", " glass", " flour"], 2),
]
TASK = """task: peftkit_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def per_question(results):
    """(chosen index, [log-likelihood of each choice]) per question, in document order."""
    samples = sorted(results["samples"]["peftkit_tiny_mc"], key=lambda s: s["doc_id"])
    out = []
    for sample in samples:
        scores = [float(response[0]) for response in sample["filtered_resps"]]
        out.append((scores.index(max(scores)), scores))
    return out


def test_lm_eval_local_completions_against_the_server_matches_hf_with_peft(tmp_path):
    import lm_eval  # the dev extra installs it (make install)
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_model(MODEL, "causal-lm")
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = make_adapter(tmp_path / "adapter", seed=1, rank=4)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "questions.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    (tasks / "peftkit_tiny_mc.yaml").write_text(TASK.format(data=data))
    manager = TaskManager(include_path=str(tasks))

    direct = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={base},peft={adapter},dtype=float32",
        tasks=["peftkit_tiny_mc"], task_manager=manager, log_samples=True, batch_size=1,
        device="cpu",
    )  # fmt: skip
    options = ServeOptions(model=str(base), served_name="base", adapters={"a": adapter}, port=0)
    with running(options) as served:
        args = (
            f"model=base:a,base_url={served.url}/completions,tokenizer={base},"
            "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,"
            "max_retries=1"
        )
        through_server = lm_eval.simple_evaluate(
            model="local-completions", model_args=args, tasks=["peftkit_tiny_mc"],
            task_manager=manager, log_samples=True, batch_size=1,
        )  # fmt: skip
    want, got = per_question(direct), per_question(through_server)
    assert len(got) == len(want) == len(QUESTIONS)
    assert [choice for choice, _ in got] == [choice for choice, _ in want]
    for (_, got_scores), (_, want_scores) in zip(got, want, strict=True):
        assert got_scores == pytest.approx(want_scores, abs=1e-3)
    acc = "acc,none"
    assert (
        through_server["results"]["peftkit_tiny_mc"][acc]
        == direct["results"]["peftkit_tiny_mc"][acc]
    )
