"""peftkit.memory.recommend: budgets, ranking by measured compare results (only those measured on
the same model and task), refusals, and every registered method taken from the registry."""

import json

import pytest
from made_up_method import register

from peftkit.errors import ConfigError
from peftkit.memory.estimate import estimate
from peftkit.memory.recommend import GIB, parse_memory, recommend
from peftkit.models import load_model


def test_memory_budgets_are_read_with_their_units() -> None:
    assert parse_memory("8GiB") == 8 * 2**30
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("16GB") == 16 * 10**9
    assert parse_memory(2) == 2 * 2**30  # a bare number is GiB
    for bad in ("eight gigs", "8 parsecs", "0GiB", -1):
        with pytest.raises(ConfigError, match="memory budget"):
            parse_memory(bad)


def test_full_fine_tuning_needs_sixteen_bytes_a_parameter() -> None:
    # Closed form: fp32 AdamW keeps weight, gradient, m and v: 16 B for every parameter, so a
    # budget one byte under 16 N cannot hold full fine-tuning, while LoRA (4 B a frozen weight)
    # fits in it at a tiny batch.
    model, _ = load_model("tiny-llama", "causal-lm")
    parameters = sum(p.numel() for p in model.parameters())
    budget = f"{16 * parameters - 1}B"
    result = recommend(budget, "tiny-llama", "causal-lm", batch_size=1, seq_len=8, compare=None)
    by_method = {r["method"]: r for r in result.records}
    assert not by_method["full"]["fits"]
    assert by_method["full"]["rank"] is None
    assert by_method["lora"]["fits"]
    assert [r["rank"] for r in result.fitting] == list(range(1, len(result.fitting) + 1))
    assert all(r["peak_gib"] * GIB <= 16 * parameters - 1 for r in result.fitting)
    assert result.basis == "estimated"
    assert "needs" in by_method["full"]["why"] and "budget" in by_method["full"]["why"]


def test_a_budget_nothing_fits_says_what_the_smallest_needs() -> None:
    roomy = recommend("64GiB", "tiny-bert", "classification", batch_size=2, seq_len=16,
                      compare=None)  # fmt: skip
    smallest = min(roomy.records, key=lambda r: r["peak_gib"])
    with pytest.raises(ConfigError, match="Nothing fits in 10.0 KiB") as error:
        recommend("10KiB", "tiny-bert", "classification", batch_size=2, seq_len=16, compare=None)
    assert f"the smallest is {smallest['label']}" in str(error.value)


def test_a_method_that_cannot_serve_the_model_is_refused_with_its_reason() -> None:
    # A Llama-style causal LM has no bias terms and no new head: BitFit trains nothing there.
    with pytest.raises(ConfigError, match="cannot serve") as error:
        recommend("8GiB", "tiny-llama", "causal-lm", methods=["bitfit"], compare=None)
    assert "no bias" in str(error.value)
    result = recommend("8GiB", "tiny-llama", "causal-lm", compare=None)
    bitfit = next(r for r in result.records if r["method"] == "bitfit")
    assert not bitfit["serves"] and not bitfit["fits"] and bitfit["rank"] is None
    assert result.records[-1] is bitfit  # refused methods come last


def test_a_model_without_that_task_form_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot serve task type 'seq2seq'"):
        recommend("8GiB", "tiny-gpt2", "seq2seq", compare=None)
    with pytest.raises(ConfigError, match="Unknown task type"):
        recommend("8GiB", "tiny-gpt2", "summarise", compare=None)


def test_an_unknown_method_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        recommend("8GiB", "tiny-bert", "classification", methods=["lorra"], compare=None)


def _compare_json(path, entries, model="tiny-bert", task="classification") -> str:  # noqa: ANN001
    """A compare.json as `peftkit compare` writes it: label, method section, model, task, result."""
    rows = [{"method": label, "method_section": section, "model": model, "task": task,
             "metric": metric, "metric_after": value, "tokens_per_second": 100.0}
            for label, section, metric, value in entries]  # fmt: skip
    rows.append({"method": "prompt_tuning", "failed": True, "error": "boom", "log": "x.log"})
    path.write_text(json.dumps(rows))
    return str(path)


def _ran(name: str, **options) -> dict:  # noqa: ANN003
    return {"name": name, **options}


def test_methods_that_fit_are_ranked_by_measured_quality(tmp_path) -> None:  # noqa: ANN001
    compare = _compare_json(tmp_path / "compare.json", [
        ("lora", _ran("lora"), "accuracy", 0.80), ("full", _ran("full"), "accuracy", 0.85),
        ("bitfit", _ran("bitfit"), "accuracy", 0.82),
        ("ct_f", _ran("child_tuning", mode="F"), "accuracy", 0.83),
    ])  # fmt: skip
    methods = ["full", "lora", "bitfit", "child_tuning", "prompt_tuning"]
    result = recommend("64GiB", "tiny-bert", "classification", batch_size=2, seq_len=16,
                       methods=methods, compare=compare)  # fmt: skip
    assert result.basis == "measured"
    labels = [r["label"] for r in result.fitting]
    # Measured first, best accuracy first; the failed run (prompt_tuning) counts as unmeasured.
    assert labels == ["full", "ct_f", "bitfit", "lora", "prompt_tuning"]
    assert result.fitting[0]["why"].startswith("measured accuracy 0.8500")
    assert "measured accuracy" in result.table
    # The label's own method section is what is estimated: Child-Tuning F trains every weight.
    by_label = {r["label"]: r for r in result.records}
    assert by_label["ct_f"]["trainable_parameters"] == by_label["full"]["trainable_parameters"]


def test_a_loss_metric_ranks_lowest_first(tmp_path) -> None:  # noqa: ANN001
    compare = _compare_json(tmp_path / "compare.json", [
        ("full", _ran("full"), "eval_loss", 1.5), ("lora", _ran("lora"), "eval_loss", 1.2),
    ])  # fmt: skip
    result = recommend("64GiB", "tiny-bert", "classification", batch_size=2, seq_len=16,
                       methods=["full", "lora"], compare=compare)  # fmt: skip
    assert [r["label"] for r in result.fitting] == ["lora", "full"]


def test_results_from_another_model_or_task_are_set_aside_with_a_note(tmp_path) -> None:  # noqa: ANN001
    entries = [("lora", _ran("lora"), "accuracy", 0.9), ("full", _ran("full"), "accuracy", 0.5)]
    settings = {"batch_size": 2, "seq_len": 16, "methods": ["full", "lora"]}
    for model, task in [("minilm", "classification"), ("tiny-llama", "causal-lm")]:
        compare = _compare_json(tmp_path / "compare.json", entries, model=model, task=task)
        result = recommend("64GiB", "tiny-llama", "classification", compare=compare, **settings)
        assert result.basis == "estimated"
        assert all(r["measured"] is None for r in result.records)
        note = next(n for n in result.notes if n.startswith("set aside"))
        assert f"{model} ({task})" in note and "tiny-llama (classification)" in note
        # ranked by the estimate alone: full fine-tuning trains more
        assert [r["label"] for r in result.fitting] == ["full", "lora"]
    same = _compare_json(tmp_path / "compare.json", entries, model="tiny-llama")
    result = recommend("64GiB", "tiny-llama", "classification", compare=same, **settings)
    assert result.basis == "measured"
    assert [r["label"] for r in result.fitting] == ["lora", "full"]


def test_a_label_is_never_read_as_a_method_name(tmp_path) -> None:  # noqa: ANN001
    # An entry that records no method section: its run folder's recipe.yaml says what ran ...
    compare = tmp_path / "compare.json"
    rows = [{"method": label, "model": "tiny-bert", "task": "classification",
             "metric": "accuracy", "metric_after": value, "tokens_per_second": 1.0}
            for label, value in [("lora_r2", 0.9), ("bitfit_x", 0.8)]]  # fmt: skip
    compare.write_text(json.dumps(rows))
    (tmp_path / "lora_r2").mkdir()
    (tmp_path / "lora_r2" / "recipe.yaml").write_text("method: {name: lora, rank: 2}\n")
    result = recommend("64GiB", "tiny-bert", "classification", batch_size=2, seq_len=16,
                       methods=["lora", "bitfit"], compare=compare)  # fmt: skip
    by_label = {r["label"]: r for r in result.records}
    assert by_label["lora_r2"]["method_section"] == {"name": "lora", "rank": 2}
    assert by_label["lora_r2"]["measured"]["value"] == 0.9
    # ... and without either, its label's prefix is not taken for a method: it is set aside.
    assert "bitfit_x" not in by_label and by_label["bitfit"]["measured"] is None
    assert any("bitfit_x" in note and "unknown" in note for note in result.notes)


def test_trainable_parameters_are_what_each_method_really_trains() -> None:
    result = recommend("64GiB", "tiny-bert", "classification", batch_size=2, seq_len=16,
                       compare=None)  # fmt: skip
    by_method = {r["method"]: r for r in result.records}
    for name in ("child_tuning", "full", "lora"):
        expected = estimate("tiny-bert", name, 2, 16, "fp32", task="classification")
        assert by_method[name]["trainable_parameters"] == expected.trainable_parameters
    # Child-Tuning D (the default mode) trains its 30% share, not every weight.
    child, full = by_method["child_tuning"], by_method["full"]
    assert child["trainable_parameters"] < 0.35 * full["trainable_parameters"]


def test_a_method_registered_elsewhere_is_recommended(monkeypatch) -> None:  # noqa: ANN001
    register(monkeypatch)
    result = recommend("64GiB", "tiny-llama", "causal-lm", batch_size=2, seq_len=16,
                       compare=None)  # fmt: skip
    made_up = next(r for r in result.records if r["method"] == "norms_only")
    assert made_up["fits"] and made_up["trainable_parameters"] == 2 * 2 * 32 + 32


def test_the_best_measured_method_is_left_out_when_it_does_not_fit(tmp_path) -> None:  # noqa: ANN001
    compare = _compare_json(tmp_path / "compare.json", [
        ("full", _ran("full"), "accuracy", 0.9), ("lora", _ran("lora"), "accuracy", 0.8),
    ])  # fmt: skip
    settings = {"batch_size": 2, "seq_len": 16, "methods": ["full", "lora"], "compare": compare}
    roomy = recommend("64GiB", "tiny-bert", "classification", **settings)
    peaks = {r["method"]: r["peak_gib"] * GIB for r in roomy.records}
    assert peaks["lora"] < peaks["full"]
    budget = f"{int((peaks['lora'] + peaks['full']) / 2)}B"
    tight = recommend(budget, "tiny-bert", "classification", **settings)
    assert [r["label"] for r in tight.fitting] == ["lora"]
    assert tight.records[1]["label"] == "full" and not tight.records[1]["fits"]


def test_a_missing_compare_file_is_an_error(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="No compare results"):
        recommend("8GiB", "tiny-bert", "classification", compare=tmp_path / "none.json")
