"""`app-eval --app tabular`: label-word probabilities, calibrated and not, beside the baseline.

Each test row is scored by the probability of each label word right after its prompt (summed
token log-probabilities, normalised over the classes): accuracy (arg-max) and AUC. The same scores
are then read through two calibrations fitted without test labels (`tabular_calibration`):
contextual calibration from content-free inputs, and a threshold fitted on the k training rows'
own scores. The logistic-regression baseline on the same rows comes alongside
(`tabular_baseline.baseline_for_records`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.apps import tabular_calibration as calibration
from peftkit.apps.tabular import BUNDLED, bundled_table_name
from peftkit.apps.tabular_baseline import baseline_for_records, classification_metrics
from peftkit.data.collate import pad_batch
from peftkit.decoding.prompts import pad_id
from peftkit.errors import DataError

Records = list[dict[str, Any]]
Scorer = Callable[[list[str]], list[list[float]]]


def label_word_log_probs(
    model: nn.Module, tokenizer: Any, prompts: list[str], words: list[str], batch_size: int = 16
) -> list[list[float]]:
    """log P(" word" | prompt) for each prompt and label word: the word's token log-probs summed."""
    word_ids = [tokenizer(f" {word}", add_special_tokens=False)["input_ids"] for word in words]
    # Single-token words are all scored by one forward of the prompt alone (half the cost or less).
    pairs = (
        [(p, -1) for p in range(len(prompts))]
        if all(len(ids) == 1 for ids in word_ids)
        else [(p, w) for p in range(len(prompts)) for w in range(len(words))]
    )
    prompt_ids = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]
    scores = [[0.0] * len(words) for _ in prompts]
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [prompt_ids[p] + (word_ids[w] if w >= 0 else []) for p, w in chunk]
        with torch.no_grad():
            logits = model(**pad_batch(rows, pad_id(tokenizer), side="right")).logits
        for row_index, (p, w) in enumerate(chunk):
            first = len(prompt_ids[p])  # position of the word's first token
            if w < 0:  # every word is one token, predicted at the prompt's last position
                log_probs = logits[row_index, first - 1].log_softmax(-1)
                for word, ids in enumerate(word_ids):
                    scores[p][word] = float(log_probs[ids[0]])
                continue
            # The logits at position t predict token t + 1.
            positions = torch.arange(first - 1, first - 1 + len(word_ids[w]))
            log_probs = logits[row_index, positions].log_softmax(-1)
            tokens = torch.tensor(word_ids[w])
            scores[p][w] = float(log_probs[torch.arange(len(tokens)), tokens].sum())
    return scores


def tabular_label_words(records: Records) -> list[str] | None:
    """The label words of a bundled table whose question the records ask, else None."""
    name = bundled_table_name(records)
    return list(BUNDLED[name][1]) if name else None


def _check_records(records: Records, what: str, words: list[str] | None = None) -> None:
    """Refuse records without prompt and label, or with a label outside the label words."""
    for index, record in enumerate(records):
        if "prompt" not in record or "label" not in record:
            raise DataError(
                f"{what} {index} needs 'prompt' and 'label' fields; it has {sorted(record)}."
            )
    unknown = sorted({str(r["label"]) for r in records} - set(words or []))
    if words is not None and unknown:
        raise DataError(f"{what}s hold labels {unknown} outside the label words {words}.")


def fit_calibrations(
    score: Scorer, template_prompt: str, train_records: Records, words: list[str]
) -> dict[str, dict[str, Any]]:
    """Per-class biases fitted without test labels: "contextual" from content-free versions of
    template_prompt (only its column names are read), "threshold" from the training rows' scores
    and labels (two classes). A calibration that cannot be fitted says why instead of a bias."""
    fitted: dict[str, dict[str, Any]] = {}
    try:
        prompts = calibration.content_free_prompts(template_prompt)
    except DataError as error:
        fitted["contextual"] = {"skipped": str(error)}
    else:
        content_free = score(prompts)
        fitted["contextual"] = {
            "bias": calibration.contextual_bias(content_free),
            "content_free_values": list(calibration.CONTENT_FREE_VALUES),
            "content_free_probabilities": [calibration.softmax(row) for row in content_free],
        }
    if len(words) != 2 or not train_records:
        reason = "two classes" if len(words) != 2 else "the training rows"
        fitted["threshold"] = {"skipped": f"a threshold needs {reason}"}
        return fitted
    scores = score([r["prompt"] for r in train_records])
    margins = [row[1] - row[0] for row in scores]
    labels = [words.index(str(r["label"])) for r in train_records]
    threshold = calibration.fit_threshold(margins, labels)
    fitted["threshold"] = {
        "bias": calibration.threshold_bias(threshold),
        "threshold": threshold,
        "train_rows": len(train_records),
        "train_accuracy": calibration.cut_accuracy(margins, labels, threshold),
        "train_accuracy_uncalibrated": calibration.cut_accuracy(margins, labels, 0.0),
        "train_log_odds": margins,
    }
    return fitted


def evaluate_tabular(
    model: nn.Module, tokenizer: Any, records: Records, label_words: list[str] | None = None,
    batch_size: int = 16, train_records: Records | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Accuracy and AUC of the label-word probabilities on prompt/label records, uncalibrated and
    calibrated (fitted on train_records and content-free inputs only), beside the baseline."""
    _check_records(records, "Tabular record")
    train_records = list(train_records or [])
    words = list(label_words or sorted({str(r["label"]) for r in records}))
    _check_records(records, "Tabular record", words)
    _check_records(train_records, "Tabular training record", words)

    def score(prompts: list[str]) -> list[list[float]]:
        return label_word_log_probs(model, tokenizer, prompts, words, batch_size)

    scores = score([r["prompt"] for r in records])
    # Fitted before any test label is read, from the training rows (or a test row's column names).
    fitted = fit_calibrations(score, (train_records or records)[0]["prompt"], train_records, words)
    labels = [words.index(str(r["label"])) for r in records]
    probabilities = {"": [calibration.softmax(row) for row in scores]}
    for name, fit in fitted.items():
        if "bias" in fit:
            probabilities[f"_{name}"] = [calibration.apply_bias(row, fit["bias"]) for row in scores]
    result: dict[str, Any] = {"count": len(records)}
    for suffix, rows in probabilities.items():
        metrics = classification_metrics(labels, rows, len(words))
        result |= {f"{metric}{suffix}": value for metric, value in metrics.items()}
    for name in fitted:
        result.setdefault(f"accuracy_{name}", None)
    baseline = baseline_for_records(train_records, records)
    result["logistic_accuracy"] = (baseline or {}).get("same_rows", {}).get("accuracy")
    per_example = []
    for index, record in enumerate(records):
        entry = {"row": record.get("row"), "label": record["label"],
                 "probabilities": dict(zip(words, probabilities[""][index], strict=True)),
                 "log_probs": dict(zip(words, scores[index], strict=True))}  # fmt: skip
        for suffix, rows in probabilities.items():
            best = max(range(len(words)), key=rows[index].__getitem__)
            entry[f"predicted{suffix}"] = words[best]
        per_example.append(entry)
    return {**result, "label_words": words, "calibration": fitted,
            "logistic_regression": baseline, "records": per_example}  # fmt: skip
