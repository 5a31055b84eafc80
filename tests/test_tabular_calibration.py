"""Calibration of label-word scores: content-free prompts, Zhao et al.'s closed form, the
threshold fitted on training rows by the midpoint rule, and that test labels never reach a fit."""

from __future__ import annotations

import random

import numpy as np
import pytest

from peftkit.apps import tabular as tb
from peftkit.apps import tabular_calibration as cal
from peftkit.apps.tabular_baseline import classification_metrics
from peftkit.apps.tabular_evaluation import evaluate_tabular, label_word_log_probs
from peftkit.errors import DataError
from peftkit.models import load_model


@pytest.mark.parametrize("template", tb.TEMPLATES)
def test_content_free_prompts_keep_the_template_and_drop_the_values(template: str) -> None:
    table = tb.load_table("breast_cancer")
    prompt = tb.row_records(table, [7], template)[0]["prompt"]
    got = cal.content_free_prompts(prompt)
    # Built here from the table's own columns, not from the prompt.
    expected = [
        tb.row_prompt(
            tb.serialize_row(dict.fromkeys(table.columns, value), template), table.question
        )
        for value in ("N/A", "[MASK]")
    ]
    assert got[:2] == expected
    assert got[2] == f"\n{table.question}\nAnswer:"  # the empty value: a row with no cells
    if template == "text":
        assert got[0].startswith("The mean radius is N/A. The mean texture is N/A. ")
    else:
        assert got[1].startswith("- mean radius: [MASK]\n- mean texture: [MASK]\n")
    assert not any(tb.format_value(value) in got[0] for value in table.rows[7].values())


def test_content_free_prompts_refuse_other_prompts() -> None:
    with pytest.raises(DataError, match="three parts"):
        cal.content_free_prompts("Is this row benign?")
    with pytest.raises(DataError, match="Cannot read the columns"):
        cal.content_free_prompts("Some free text about a patient.\nBenign?\nAnswer:")


def test_contextual_calibration_equals_zhao_closed_form() -> None:
    rng = np.random.default_rng(0)
    content_free = rng.normal(size=(3, 3)) * 2  # three content-free inputs, three classes
    scores = rng.normal(size=(5, 3)) * 2

    # Zhao et al.: p_cf = mean of the softmaxed content-free scores; q = normalise(diag(p_cf)^-1 p).
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p_cf = softmax(content_free).mean(axis=0)
    expected = softmax(scores) / p_cf
    expected /= expected.sum(axis=-1, keepdims=True)
    bias = cal.contextual_bias(content_free.tolist())
    got = [cal.apply_bias(row, bias) for row in scores.tolist()]
    assert np.allclose(got, expected)
    # A content-free input itself would score every class alike (one content-free input).
    single = cal.contextual_bias(content_free[:1].tolist())
    assert cal.apply_bias(content_free[0].tolist(), single) == pytest.approx([1 / 3] * 3)


def test_threshold_by_hand() -> None:
    # Separable: the middle of the gap between the last malignant (-1) and first benign (0.5).
    assert cal.fit_threshold([-3.0, -1.0, 0.5, 2.0], [0, 0, 1, 1]) == pytest.approx(-0.25)
    # Not separable: cuts -0.5 and 2.25 both classify 4 of 5 right; -0.5 sits in the wider gap
    # (between -2 and 1: 3.0, against 1.5 between 1.5 and 3).
    margins, labels = [-2.0, 1.0, 1.5, 3.0, 4.0], [0, 1, 0, 1, 1]
    assert cal.fit_threshold(margins, labels) == pytest.approx(-0.5)
    assert cal.cut_accuracy(margins, labels, -0.5) == cal.cut_accuracy(margins, labels, 2.25) == 0.8
    # A shift of every score shifts the cut with it (k = 4, two of each class).
    shifted = cal.fit_threshold([m + 7 for m in (-3.0, -1.0, 0.5, 2.0)], [0, 0, 1, 1])
    assert shifted == pytest.approx(6.75)
    # One class only: the cut goes beyond every score, all rows to that class.
    assert cal.fit_threshold([-1.0, -2.0], [1, 1]) == pytest.approx(-3.0)
    with pytest.raises(DataError, match="two classes"):
        cal.fit_threshold([0.0, 1.0], [0, 2])
    with pytest.raises(DataError, match="one label for each"):
        cal.fit_threshold([0.0, 1.0], [0])


def test_threshold_is_as_accurate_as_any_cut() -> None:
    rng = random.Random(1)
    for _ in range(50):
        labels = [rng.randint(0, 1) for _ in range(rng.randint(1, 12))]
        margins = [round(rng.gauss(y, 1.5), 1) for y in labels]  # rounded: ties happen
        cut = cal.fit_threshold(margins, labels)
        grid = [x / 20 for x in range(-200, 201)]  # every cut worth trying, independently
        best = max(cal.cut_accuracy(margins, labels, g) for g in grid)
        assert cal.cut_accuracy(margins, labels, cut) == best
        assert cut not in margins  # never on a training score


def test_two_class_calibration_keeps_the_auc() -> None:
    rng = np.random.default_rng(2)
    labels = [0, 1] * 10
    scores = (rng.normal(size=(20, 2)) + np.array(labels)[:, None] * [0, 1]).tolist()
    raw = classification_metrics(labels, [cal.softmax(row) for row in scores])
    for bias in (cal.threshold_bias(1.3), cal.contextual_bias([[0.4, -2.0], [1.0, 0.0]])):
        moved = classification_metrics(labels, [cal.apply_bias(row, bias) for row in scores])
        assert moved["auc"] == pytest.approx(raw["auc"])


def _records() -> tuple[list[dict], list[dict]]:
    train, test = tb.bundled_split("breast_cancer", k=4)
    return train, test[:3] + test[-3:]  # both classes in the test rows


def test_evaluation_fits_on_training_rows_only() -> None:
    model, tokenizer = load_model("tiny-llama", "causal-lm")
    train, test = _records()
    words = ["malignant", "benign"]
    result = evaluate_tabular(model, tokenizer, test, words, batch_size=4, train_records=train)
    # The fitted threshold equals one fitted here from the training rows' scores alone.
    scores = label_word_log_probs(model, tokenizer, [r["prompt"] for r in train], words)
    margins = [b - m for m, b in scores]
    expected = cal.fit_threshold(margins, [words.index(r["label"]) for r in train])
    assert result["calibration"]["threshold"]["threshold"] == pytest.approx(expected, abs=1e-4)
    # Test labels flipped: every fitted number and every prediction stays as it was.
    flipped = [dict(r, label=words[1 - words.index(r["label"])]) for r in test]
    again = evaluate_tabular(model, tokenizer, flipped, words, batch_size=4, train_records=train)
    assert again["calibration"] == result["calibration"]
    for name in ("predicted", "predicted_contextual", "predicted_threshold"):
        assert [r[name] for r in again["records"]] == [r[name] for r in result["records"]]
    for name in ("accuracy", "accuracy_contextual", "accuracy_threshold"):
        assert again[name] == pytest.approx(1 - result[name])
    # The threshold's accuracy is the share of test rows on the right side of the fitted cut.
    test_margins = [
        r["log_probs"]["benign"] - r["log_probs"]["malignant"] for r in result["records"]
    ]
    right = [
        (m > expected) == (r["label"] == "benign") for m, r in zip(test_margins, test, strict=True)
    ]
    assert result["accuracy_threshold"] == pytest.approx(sum(right) / len(right), abs=1e-9)
