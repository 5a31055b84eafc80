"""Text metrics for generated outputs: exact match, token F1 (SQuAD-style), ROUGE-L."""

from __future__ import annotations

import re
from collections import Counter


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding space: what exact match compares."""
    return re.sub(r"\s+", " ", text.strip().lower())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of words, as SQuAD's F1)."""
    predicted, wanted = normalise(prediction).split(), normalise(reference).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    overlap = sum((Counter(predicted) & Counter(wanted)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(wanted)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence), from Google's rouge-score package."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return scorer.score(reference, prediction)["rougeL"].fmeasure


TEXT_METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def score_texts(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every text metric averaged over the pairs."""
    count = max(1, len(references))
    return {
        name: sum(metric(p, r) for p, r in zip(predictions, references, strict=True)) / count
        for name, metric in TEXT_METRICS.items()
    }
