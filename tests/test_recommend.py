"""peftkit.recommend: budgets, ranking by measured compare results, and refusals."""

import json

import pytest

from peftkit.errors import ConfigError
from peftkit.models import load_model
from peftkit.recommend import GIB, parse_memory, recommend


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


def _compare_json(path, entries) -> str:  # noqa: ANN001
    rows = [{"method": label, "model": "tiny-bert", "metric": metric, "metric_after": value,
             "tokens_per_second": 100.0} for label, metric, value in entries]  # fmt: skip
    rows.append({"method": "prompt_tuning", "failed": True, "error": "boom", "log": "x.log"})
    path.write_text(json.dumps(rows))
    return str(path)


def test_methods_that_fit_are_ranked_by_measured_quality(tmp_path) -> None:  # noqa: ANN001
    compare = _compare_json(tmp_path / "compare.json", [
        ("lora", "accuracy", 0.80), ("full", "accuracy", 0.85), ("bitfit", "accuracy", 0.82),
        ("child_tuning_f", "accuracy", 0.83),
    ])  # fmt: skip
    methods = ["full", "lora", "bitfit", "child_tuning", "prompt_tuning"]
    result = recommend("64GiB", "tiny-bert", "classification", batch_size=2, seq_len=16,
                       methods=methods, compare=compare)  # fmt: skip
    assert result.basis == "measured"
    labels = [r["label"] for r in result.fitting]
    # Measured first, best accuracy first; the failed run (prompt_tuning) counts as unmeasured.
    assert labels == ["full", "child_tuning_f", "bitfit", "lora", "prompt_tuning"]
    assert result.fitting[0]["why"].startswith("measured accuracy 0.8500")
    assert "measured accuracy" in result.table


def test_a_loss_metric_ranks_lowest_first(tmp_path) -> None:  # noqa: ANN001
    compare = _compare_json(tmp_path / "compare.json",
                            [("full", "eval_loss", 1.5), ("lora", "eval_loss", 1.2)])  # fmt: skip
    result = recommend("64GiB", "tiny-bert", "classification", batch_size=2, seq_len=16,
                       methods=["full", "lora"], compare=compare)  # fmt: skip
    assert [r["label"] for r in result.fitting] == ["lora", "full"]


def test_the_best_measured_method_is_left_out_when_it_does_not_fit(tmp_path) -> None:  # noqa: ANN001
    compare = _compare_json(tmp_path / "compare.json",
                            [("full", "accuracy", 0.9), ("lora", "accuracy", 0.8)])  # fmt: skip
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
