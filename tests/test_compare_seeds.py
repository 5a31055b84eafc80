"""`peftkit compare --seeds N` and compare's steady-state throughput: per-method mean and spread,
paired differences against scipy's paired t-test, learning rates and machine load recorded."""

import json
import statistics

import pytest
from scipy import stats

from peftkit.cli import main
from peftkit.compare import (
    WARMUP_STEPS,
    add_differences,
    aggregate,
    paired_difference,
    quantile,
    steady_state,
)
from peftkit.errors import ConfigError


def _runs(values: dict[int, float]) -> dict:
    return {"runs": [{"seed": seed, "metric_after": value} for seed, value in values.items()]}


@pytest.mark.parametrize(
    "a, b",
    [
        ({0: 0.80, 1: 0.78, 2: 0.81}, {0: 0.75, 1: 0.74, 2: 0.77}),  # consistent gap
        ({0: 0.80, 1: 0.70, 2: 0.78}, {0: 0.75, 1: 0.76, 2: 0.74}),  # inside the noise
        ({0: 0.5, 1: 0.6, 3: 0.9}, {0: 0.4, 1: 0.45, 2: 0.1}),  # only seeds 0 and 1 shared
    ],
)
def test_paired_difference_agrees_with_scipys_paired_t_test(a, b):
    found = paired_difference(_runs(a), _runs(b))
    shared = sorted(set(a) & set(b))
    test = stats.ttest_rel([a[s] for s in shared], [b[s] for s in shared])
    low, high = test.confidence_interval(0.95)
    assert found["seeds"] == shared
    assert found["mean_difference"] == pytest.approx((low + high) / 2)
    assert found["half_width_95"] == pytest.approx((high - low) / 2, rel=1e-3)  # t to 3 digits
    assert found["exceeds_noise"] == (test.pvalue < 0.05)


def test_paired_difference_needs_two_shared_seeds():
    assert paired_difference(_runs({0: 0.8, 1: 0.7}), _runs({1: 0.6, 2: 0.5})) is None


def test_steady_state_is_the_median_after_the_warm_up():
    seconds = [5.0, 3.0, 1.0, 2.0, 1.0, 4.0, 1.0]  # two slow warm-up steps, then noise
    tokens = [100, 100, 100, 100, 100, 100, 200]
    found = steady_state({"step_seconds": seconds, "step_tokens": tokens, "tokens_per_second": 9})
    rates = [t / s for s, t in zip(seconds[WARMUP_STEPS:], tokens[WARMUP_STEPS:], strict=True)]
    assert found["tokens_per_second"] == statistics.median(rates) == 100.0
    assert found["tokens_per_second_p25"] == pytest.approx(quantile(rates, 0.25))
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25) == 2.0  # numpy's default (linear) quantile
    assert quantile([1.0, 2.0], 0.75) == 1.75
    assert found["throughput_steps"] == 5 and found["tokens_per_second_mean_run"] == 9
    assert steady_state({"tokens_per_second": 9}) == {}  # an older summary: left as it was


def test_seeds_run_each_entry_once_per_seed_with_mean_spread_and_learning_rate(tmp_path, capsys):
    rows = [{"text": "good" if i % 2 else "bad", "label": i % 2} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "base.yaml").write_text(
        f"model: tiny-bert\ntask: {{train_file: {data}, max_length: 16}}\n"
        "method: lora\ntraining: {max_steps: 4, batch_size: 8, seed: 5}\n"
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "recipe: base.yaml\nmethods:\n"
        "  - method: {name: lora, rank: 2}\n    set: {training.learning_rate: 0.01}\n"
    )
    out = tmp_path / "out"
    assert main(["compare", str(plan), "--seeds", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] lora-seed5" in printed and "[2/2] lora-seed6" in printed
    assert "differences beyond the noise over 2 seeds (paired t-test, 95%): none" in printed
    [row] = json.loads((out / "compare.json").read_text())
    runs = [json.loads((out / f"lora-seed{s}" / "summary.json").read_text()) for s in (5, 6)]
    values = [run["metric_after"] for run in runs]
    assert row["seeds"] == [5, 6] and [r["seed"] for r in row["runs"]] == [5, 6]
    assert row["metric_after"] == pytest.approx(statistics.fmean(values))
    assert row["metric_after_sd"] == pytest.approx(statistics.stdev(values))
    assert f"+-{statistics.stdev(values):.4f}" in printed  # the after column shows the spread
    assert all(len(run["step_seconds"]) == len(run["step_tokens"]) == 4 for run in runs)
    assert all(sum(run["step_tokens"]) == run["train_tokens"] for run in runs)
    steady = [(run["step_seconds"][2:], run["step_tokens"][2:]) for run in runs]
    rates = [t / s for seconds, tokens in steady for s, t in zip(seconds, tokens, strict=True)]
    assert row["throughput_steps"] == 2 * (4 - WARMUP_STEPS)  # pooled over both seeds
    assert row["tokens_per_second"] == pytest.approx(statistics.median(rates))
    assert [r["learning_rate"] for r in row["runs"]] == [0.01, 0.01] == [row["learning_rate"]] * 2
    machine = row["runs"][0]["machine"]
    assert machine["cpu_count"] >= 1 and len(machine["load_average"]) == 3
    assert row["differences"] == {}  # one method: nothing to compare it with


def _seeded_row(label: str, values: dict[int, float]) -> list[dict]:
    return [
        {"method": label, "metric": "accuracy", "metric_after": value, "seed": seed,
         "train_seconds": 1.0, "step_seconds": [1.0] * 3, "step_tokens": [10 * seed] * 3}
        for seed, value in values.items()
    ]  # fmt: skip


def test_aggregate_and_differences_name_only_gaps_beyond_the_noise():
    a = aggregate("a", _seeded_row("a", {0: 0.80, 1: 0.78, 2: 0.81}))
    b = aggregate("b", _seeded_row("b", {0: 0.75, 1: 0.74, 2: 0.77}))
    c = aggregate("c", _seeded_row("c", {0: 0.70, 1: 0.85, 2: 0.74}))
    lines = add_differences([a, b, c])
    assert a["metric_after"] == pytest.approx(statistics.fmean([0.80, 0.78, 0.81]))
    assert a["tokens_per_second"] == 10.0  # seeds 0, 1, 2 give 0, 10, 20 tokens/s after step 2
    assert a["differences"]["b"]["exceeds_noise"] and not a["differences"]["c"]["exceeds_noise"]
    assert not b["differences"]["c"]["exceeds_noise"]
    assert len(lines) == 1 and lines[0].startswith("a > b: accuracy +0.0433")
    failed = aggregate("d", [*_seeded_row("d", {0: 0.5}), {"failed": True, "error": "x",
                                                           "log": "d-seed1.log"}])  # fmt: skip
    assert failed["failed"] and failed["log"] == "d-seed1.log" and failed["method"] == "d"


def test_seeds_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"--seeds must be a whole number of at least 1, got 0"):
        from peftkit.compare import compare

        compare(tmp_path / "missing.yaml", tmp_path / "out", seeds=0)
