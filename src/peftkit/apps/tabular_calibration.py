"""Calibrating label-word scores, fitted without a single test row.

A small tuned model can rank the rows well (a high AUC) and still answer one label for every row:
its label-word scores are shifted toward one word. Both corrections here subtract a per-class bias
from the label-word log-probabilities (then normalise over the classes), and both are fitted
without test rows:

- contextual calibration (Zhao et al., 2021, *Calibrate Before Use*): the class probabilities the
  model gives content-free inputs (the row's template with every value "N/A", with "[MASK]", and
  with no cells at all), averaged; each row's probabilities are divided by them and renormalised,
  so that a content-free input would score every class alike. Nothing labelled is used.
- a threshold fitted on the k training rows' own scores (two classes only): the cut on the log-odds
  log P(second word) - log P(first word) that classifies the most training rows right; among cuts
  that tie, the middle of the widest gap between neighbouring scores (the midpoint rule, a
  maximum-margin cut). One number fitted, never at a training score itself, so even k = 4 cannot
  overfit it beyond choosing which gap it sits in.

For two classes either correction is one constant added to every row's log-odds: the ranking of
the rows, and so the AUC, is unchanged; only where the rows are cut (the accuracy) moves. For more
classes contextual calibration changes the one-vs-rest AUC too."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from peftkit.apps.tabular import TEMPLATES, row_prompt, serialize_row
from peftkit.errors import DataError

# Zhao et al. average over "N/A", "[MASK]" and the empty string; an empty row here has no cells.
CONTENT_FREE_VALUES = ("N/A", "[MASK]", "")
_SENTENCE = re.compile(r"The (.+?) is (.*)\.")


def split_prompt(prompt: str) -> tuple[str, str]:
    """(serialised row, question) of a prompt built by `tabular.row_prompt`."""
    parts = prompt.rsplit("\n", 2)
    if len(parts) != 3 or parts[2] != "Answer:":
        raise DataError(
            f"Not a tabular prompt (row, question, 'Answer:' on three parts): {prompt[-80:]!r}."
        )
    return parts[0], parts[1]


def row_columns(text: str) -> tuple[str, list[str]]:
    """(template, column names) of a row serialised by `tabular.serialize_row`."""
    if text.startswith("- "):
        lines = text.split("\n")
        if all(line.startswith("- ") and ": " in line for line in lines):
            return "list", [line[2:].split(": ", 1)[0] for line in lines]
    else:
        # Sentences end at ". The "; decimal points inside values are followed by digits.
        sentences = re.split(r"(?<=\.) (?=The )", text)
        matches = [_SENTENCE.fullmatch(sentence) for sentence in sentences]
        if all(matches):
            return "text", [match.group(1) for match in matches if match]
    raise DataError(
        f"Cannot read the columns of this row; contextual calibration needs a row written by "
        f"one of the templates {TEMPLATES}: {text[:80]!r}."
    )


def content_free_prompts(prompt: str, values: Sequence[str] = CONTENT_FREE_VALUES) -> list[str]:
    """The prompt's row template with every value replaced by each content-free value."""
    text, question = split_prompt(prompt)
    template, columns = row_columns(text)
    # serialize_row leaves out empty cells, so the empty value gives a row with no cells at all.
    return [
        row_prompt(serialize_row(dict.fromkeys(columns, value), template), question)
        for value in values
    ]


def softmax(values: Sequence[float]) -> list[float]:
    """Probabilities from log-scores, normalised over the classes."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def contextual_bias(content_free_scores: Sequence[Sequence[float]]) -> list[float]:
    """log of the mean class probabilities over the content-free inputs (Zhao et al.'s p_cf)."""
    probabilities = [softmax(row) for row in content_free_scores]
    count = len(probabilities)
    return [
        math.log(sum(p[c] for p in probabilities) / count) for c in range(len(probabilities[0]))
    ]


def fit_threshold(margins: Sequence[float], labels: Sequence[int]) -> float:
    """The log-odds cut that classifies the most training rows right (class 1 above it); among
    ties the middle of the widest gap between neighbouring margins, then the lowest such cut."""
    if len(margins) != len(labels) or not margins:
        raise DataError("The threshold needs one label for each training score, and some scores.")
    if set(labels) - {0, 1}:
        raise DataError(
            f"A threshold separates two classes; the labels hold {sorted(set(labels))}."
        )
    points = sorted(set(margins))
    # Cuts between neighbours carry their gap's width; cuts beyond either end carry none, so
    # "every row is one class" wins only when it is strictly more accurate.
    cuts = [((a + b) / 2, b - a) for a, b in zip(points, points[1:], strict=False)]
    cuts += [(points[0] - 1.0, 0.0), (points[-1] + 1.0, 0.0)]

    best = max(cuts, key=lambda c: (cut_accuracy(margins, labels, c[0]), c[1], -c[0]))
    return best[0]


def cut_accuracy(margins: Sequence[float], labels: Sequence[int], cut: float) -> float:
    """The share of rows a cut classifies right: class 1 above it, class 0 at or below."""
    return sum((m > cut) == (y == 1) for m, y in zip(margins, labels, strict=True)) / len(labels)


def threshold_bias(threshold: float) -> list[float]:
    """The per-class bias that moves the two-class decision to the given log-odds."""
    return [0.0, threshold]


def apply_bias(scores: Sequence[float], bias: Sequence[float]) -> list[float]:
    """Class probabilities from log-scores minus a per-class bias."""
    return softmax([s - b for s, b in zip(scores, bias, strict=True)])
