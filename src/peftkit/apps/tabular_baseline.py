"""Scoring tabular predictions, and the logistic-regression baseline a tuned model must beat.

- `classification_metrics`: accuracy (arg-max) and AUC (binary, or one-vs-rest macro AUC);
- `logistic_baseline` / `baseline_runs`: logistic regression (scikit-learn, mean imputation,
  standardised features, L2 with C = 1) fitted on the same k rows as the language model, scored on
  the same fixed test split (`docs/results/tabllm-baseline.json` holds seeds 0, 1, 2);
- `baseline_for_records`: that baseline for the records a run trained and is scored on (found
  through their table's question and their row numbers), beside the mean of seeds 0-2 at that k."""

from __future__ import annotations

from typing import Any

from peftkit.apps.tabular import (
    FEW_SHOT_SIZES,
    Table,
    bundled_table_name,
    cell_kind,
    few_shot_indices,
    load_table,
    stratified_split,
)
from peftkit.errors import DataError


def classification_metrics(
    labels: list[int], probabilities: list[list[float]], num_classes: int | None = None
) -> dict[str, float]:
    """Accuracy (arg-max) and AUC: binary AUC, or one-vs-rest macro AUC for more classes."""
    from sklearn.metrics import roc_auc_score

    num_classes = num_classes or len(probabilities[0])
    predicted = [max(range(num_classes), key=row.__getitem__) for row in probabilities]
    accuracy = sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
    if num_classes == 2:
        auc = roc_auc_score(labels, [row[1] for row in probabilities])
    else:
        auc = roc_auc_score(
            labels, probabilities, multi_class="ovr", average="macro", labels=range(num_classes)
        )
    return {"accuracy": float(accuracy), "auc": float(auc)}


def _matrix(table: Table, indices: list[int]) -> list[list[float]]:
    """Feature rows as numbers; a text column needs encoding the baseline does not do."""
    matrix = []
    for index in indices:
        row = table.rows[index]
        values = []
        for column in table.columns:
            value = row.get(column)
            if cell_kind(value) not in ("number", "boolean", None):
                raise DataError(
                    f"The logistic baseline needs numeric columns; '{column}' holds {value!r}."
                )
            values.append(float("nan") if cell_kind(value) is None else float(value))
        matrix.append(values)
    return matrix


def logistic_baseline(table: Table, train: list[int], test: list[int]) -> dict[str, float]:
    """Logistic regression on standardised features: fit on train rows, score on test rows."""
    import numpy as np
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    num_classes = len(table.label_words)
    y_train = [table.labels[i] for i in train]
    if len(set(y_train)) < 2:
        raise DataError(f"The baseline needs training rows of two classes or more; k={len(train)}.")
    model = make_pipeline(
        SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=5000, C=1.0)
    )
    model.fit(_matrix(table, train), y_train)
    seen = model.predict_proba(_matrix(table, test))
    # A class absent from the k training rows gets probability 0, so columns stay aligned.
    probabilities = np.zeros((len(test), num_classes))
    probabilities[:, model.classes_] = seen
    labels = [table.labels[i] for i in test]
    return classification_metrics(labels, probabilities.tolist(), num_classes)


def baseline_runs(
    name: str, sizes: tuple[int | str, ...] = FEW_SHOT_SIZES, seeds: tuple[int, ...] = (0, 1, 2),
    test_fraction: float = 0.2,
) -> list[dict[str, Any]]:  # fmt: skip
    """The logistic baseline on a bundled table for each k and seed, on one fixed test split."""
    table = load_table(name)
    train, test = stratified_split(table.labels, test_fraction, seed=0)
    runs = []
    for k in sizes:
        for seed in seeds if k != "all" else seeds[:1]:  # "all" rows: every seed is the same
            rows = few_shot_indices(table.labels, k, seed=seed, pool=train)
            metrics = logistic_baseline(table, rows, test)
            runs.append({"table": name, "k": k, "seed": seed, "train_rows": len(rows),
                         "test_rows": len(test), **metrics})  # fmt: skip
    return runs


def baseline_for_records(
    train_records: list[dict[str, Any]], test_records: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The baseline on the rows of a bundled table the records hold (None for other tables):
    fitted on exactly the training records' rows, and the mean of seeds 0-2 at the same k."""
    name = bundled_table_name(test_records)
    rows = [record.get("row") for record in [*train_records, *test_records]]
    if name is None or not train_records or not all(isinstance(row, int) for row in rows):
        return None
    table = load_table(name)
    train = [record["row"] for record in train_records]
    test = [record["row"] for record in test_records]
    report: dict[str, Any] = {"table": name, "train_rows": len(train), "test_rows": len(test)}
    if len({table.labels[row] for row in train}) < 2:
        return report | {"skipped": "the training rows hold one class"}
    report["same_rows"] = logistic_baseline(table, train, test)
    pool, full_test = stratified_split(table.labels)
    k = "all" if len(train) == len(pool) else len(train)
    if k in FEW_SHOT_SIZES and sorted(test) == full_test:
        runs = baseline_runs(name, sizes=(k,))
        report["mean_of_seeds"] = {
            "seeds": [run["seed"] for run in runs],
            "accuracy": sum(run["accuracy"] for run in runs) / len(runs),
            "auc": sum(run["auc"] for run in runs) / len(runs),
        }
    return report
