"""TabLLM-style tables: serialisation, few-shot sampling, metrics, the logistic baseline."""

from __future__ import annotations

from collections import Counter
from itertools import product

import pytest

from peftkit.apps import tabular as tb
from peftkit.apps import tabular_baseline as tbb
from peftkit.errors import ConfigError, DataError


def _auc_by_pairs(labels: list[int], scores: list[float]) -> float:
    """AUC as the Mann-Whitney statistic: the share of (positive, negative) pairs ranked right."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in product(positives, negatives))
    return wins / (len(positives) * len(negatives))


def test_format_value() -> None:
    assert tb.format_value(17.99) == "17.99"
    assert tb.format_value(1001.0) == "1001"
    assert tb.format_value(0.07871) == "0.07871"
    assert tb.format_value(0.000012) == "0.000012"
    assert tb.format_value(3) == "3"
    assert tb.format_value(True) == "yes"
    assert tb.format_value(" red ") == "red"


def test_serialisation_templates() -> None:
    row = {"mean radius": 17.99, "colour": "red", "note": None, "area": 1001.0}
    assert tb.serialize_row(row, "text") == (
        "The mean radius is 17.99. The colour is red. The area is 1001."
    )
    assert tb.serialize_row(row, "list") == "- mean radius: 17.99\n- colour: red\n- area: 1001"
    with pytest.raises(ConfigError, match="Unknown serialisation template 'json'"):
        tb.serialize_row(row, "json")


def test_bundled_tables_hold_the_real_data() -> None:
    cancer = tb.load_table("breast_cancer")
    assert len(cancer.rows) == 569 and len(cancer.columns) == 30
    assert Counter(cancer.labels) == {0: 212, 1: 357}  # 212 malignant, 357 benign (UCI WDBC)
    assert tb.serialize_row(cancer.rows[0]).startswith(
        "The mean radius is 17.99. The mean texture is 10.38. The mean perimeter is 122.8. "
        "The mean area is 1001."
    )
    record = tb.row_records(cancer, [0])[0]
    assert record["label"] == "malignant" and record["response"] == " malignant"
    assert record["prompt"].endswith("Is this breast mass malignant or benign?\nAnswer:")
    wine, iris = tb.load_table("wine"), tb.load_table("iris")
    assert (len(wine.rows), len(wine.columns), len(iris.rows), len(iris.columns)) == (
        178,
        13,
        150,
        4,
    )
    assert "The malic acid is 1.71." in tb.serialize_row(wine.rows[0])  # underscores as spaces
    assert iris.label_words == ("setosa", "versicolor", "virginica")
    with pytest.raises(ConfigError, match="breast_cancer"):
        tb.load_table("titanic")


def test_stratified_split_keeps_class_shares() -> None:
    labels = tb.load_table("breast_cancer").labels
    train, test = tb.stratified_split(labels, 0.2, seed=0)
    assert not set(train) & set(test) and sorted(train + test) == list(range(len(labels)))
    assert Counter(labels[i] for i in test) == {0: round(212 * 0.2), 1: round(357 * 0.2)}
    assert tb.stratified_split(labels, 0.2, seed=0) == (train, test)


@pytest.mark.parametrize(
    ("classes", "k", "expected"),
    [
        (2, 4, [2, 2]),
        (2, 16, [8, 8]),
        (2, 64, [32, 32]),
        (3, 16, sorted([6, 5, 5])),
        (3, 4, sorted([2, 1, 1])),
    ],
)
def test_few_shot_is_class_balanced(classes: int, k: int, expected: list[int]) -> None:
    labels = [i % classes for i in range(300)]
    chosen = tb.few_shot_indices(labels, k, seed=3)
    assert len(chosen) == len(set(chosen)) == k
    assert sorted(Counter(labels[i] for i in chosen).values()) == expected


def test_few_shot_seeds_pools_and_shortages() -> None:
    labels = [0] * 50 + [1] * 2  # class 1 is too small for an even share
    chosen = tb.few_shot_indices(labels, 10, seed=0)
    assert Counter(labels[i] for i in chosen) == {0: 8, 1: 2}
    assert tb.few_shot_indices(labels, 10, seed=0) == chosen
    assert tb.few_shot_indices(labels, 10, seed=1) != chosen
    pool = list(range(0, 52, 2))
    assert set(tb.few_shot_indices(labels, 6, seed=0, pool=pool)) <= set(pool)
    assert sorted(tb.few_shot_indices(labels, "all", pool=pool)) == pool
    with pytest.raises(DataError, match="only 52"):
        tb.few_shot_indices(labels, 53)
    for bad in (0, -1, "some", 2.5):
        with pytest.raises(ConfigError, match="positive whole number"):
            tb.few_shot_indices(labels, bad)


def test_metrics_against_closed_forms() -> None:
    labels = [0, 0, 1, 1, 1, 0]
    positive = [0.1, 0.4, 0.35, 0.8, 0.7, 0.6]
    metrics = tbb.classification_metrics(labels, [[1 - p, p] for p in positive])
    assert metrics["auc"] == pytest.approx(_auc_by_pairs(labels, positive))
    assert metrics["accuracy"] == pytest.approx(4 / 6)  # 0.35 and 0.6 fall on the wrong side
    # One-vs-rest: the macro mean of each class's AUC against the rest.
    labels3 = [0, 1, 2, 0, 1, 2, 1]
    probs = [
        [0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3],
        [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1],
    ]  # fmt: skip
    per_class = [
        _auc_by_pairs([int(y == c) for y in labels3], [row[c] for row in probs]) for c in range(3)
    ]
    got = tbb.classification_metrics(labels3, probs)
    assert got["auc"] == pytest.approx(sum(per_class) / 3)
    assert got["accuracy"] == pytest.approx(5 / 7)


def test_logistic_baseline_learns_and_grows_with_k() -> None:
    runs = tbb.baseline_runs("breast_cancer", sizes=(4, "all"), seeds=(0, 1, 2))
    full = next(run for run in runs if run["k"] == "all")
    assert full["train_rows"] == 456 and full["test_rows"] == 42 + 71
    assert full["accuracy"] > 0.93 and full["auc"] > 0.97  # a linear model does well on WDBC
    few = [run for run in runs if run["k"] == 4]
    assert len(few) == 3 and all(run["train_rows"] == 4 for run in few)
    mean_few = sum(run["auc"] for run in few) / len(few)
    assert 0.5 < mean_few < full["auc"]
    iris = tbb.baseline_runs("iris", sizes=(4,), seeds=(0,))[0]
    expected = _reference("load_iris", k=4, seed=0)
    assert iris["accuracy"] == pytest.approx(expected["accuracy"])
    assert iris["auc"] == pytest.approx(expected["auc"])


def _reference(loader: str, k: int, seed: int) -> dict[str, float]:
    """The same baseline computed here from scikit-learn's own arrays (not peftkit's Table): the
    same rows, the same pipeline; accuracy counted, AUC one-vs-rest by pairs."""
    import sklearn.datasets
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = getattr(sklearn.datasets, loader)()
    labels = [int(y) for y in data.target]
    classes = sorted(set(labels))
    train, test = tb.stratified_split(labels, 0.2, seed=0)
    rows = tb.few_shot_indices(labels, k, seed=seed, pool=train)
    model = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(data.data[rows], [labels[i] for i in rows])
    seen = [int(c) for c in model.classes_]
    truth = [labels[i] for i in test]
    predicted = [int(p) for p in model.predict(data.data[test])]
    correct = sum(p == y for p, y in zip(predicted, truth, strict=True))
    probabilities = model.predict_proba(data.data[test])
    per_class = []
    for c in classes:  # a class absent from the k rows scores 0 for every test row
        scores = [row[seen.index(c)] if c in seen else 0.0 for row in probabilities]
        per_class.append(_auc_by_pairs([int(y == c) for y in truth], scores))
    # Two classes: the one AUC of class 1 (class 0's AUC is the same number).
    auc = per_class[1] if len(classes) == 2 else sum(per_class) / len(classes)
    return {"accuracy": correct / len(test), "auc": auc}


def test_baseline_for_a_run_uses_its_rows_and_the_seed_mean() -> None:
    train, test = tb.bundled_split("breast_cancer", k=16)
    report = tbb.baseline_for_records(train, test)
    assert (report["table"], report["train_rows"], report["test_rows"]) == (
        "breast_cancer",
        16,
        113,
    )
    same = _reference("load_breast_cancer", 16, seed=0)  # bundled_split draws with seed 0
    assert report["same_rows"] == pytest.approx(same)
    seeds = [_reference("load_breast_cancer", 16, seed) for seed in (0, 1, 2)]
    assert report["mean_of_seeds"]["seeds"] == [0, 1, 2]
    assert report["mean_of_seeds"]["accuracy"] == pytest.approx(
        sum(s["accuracy"] for s in seeds) / 3
    )
    assert report["mean_of_seeds"]["auc"] == pytest.approx(sum(s["auc"] for s in seeds) / 3)
    # Part of the test split: the rows' own baseline, no seed mean (it is on the whole split).
    assert "mean_of_seeds" not in tbb.baseline_for_records(train, test[:50])
    # Rows of a table peftkit does not bundle, or one class only: nothing to compare, said so.
    foreign = [{"prompt": "x\nWhat?\nAnswer:", "label": "a", "row": 0}]
    assert tbb.baseline_for_records(foreign, foreign) is None
    one_class = [r for r in train if r["label"] == "benign"]
    assert (
        tbb.baseline_for_records(one_class, test)["skipped"] == "the training rows hold one class"
    )


def test_parse_label_word() -> None:
    words = ("malignant", "benign")
    assert tb.parse_label_word(" malignant\n", words) == 0
    assert tb.parse_label_word("Benign.", words) == 1
    assert tb.parse_label_word("It is benign, not malignant", words) == 1
    assert tb.parse_label_word("unsure", words) is None
    assert tb.parse_label_word("nonbenign", words) is None


def test_records_table_and_its_bad_inputs() -> None:
    records = [
        {"age": 41, "job": "teacher", "income": 52000.0, "label": "yes"},
        {"age": 29, "job": "nurse", "income": None, "label": "no"},
    ]
    table = tb.table_from_records(records, "label", label_words=("no", "yes"))
    assert table.labels == (1, 0) and table.columns == ("age", "job", "income")
    assert tb.serialize_row(table.rows[1]) == "The age is 29. The job is nurse."
    with pytest.raises(DataError, match="numeric columns; 'job'"):
        tbb.logistic_baseline(table, [0, 1], [0, 1])
    mixed = records + [{"age": "forty", "job": "clerk", "income": 1.0, "label": "no"}]
    with pytest.raises(DataError, match="Column 'age' mixes types"):
        tb.table_from_records(mixed, "label")
    unlabelled = records + [{"age": 50, "job": "clerk", "income": 1.0}]
    with pytest.raises(DataError, match="lack the label column 'label'.*row 2"):
        tb.table_from_records(unlabelled, "label")
    with pytest.raises(DataError, match=r"labels \['maybe'\]"):
        tb.table_from_records(records + [{"age": 1, "label": "maybe"}], "label", ("no", "yes"))
    with pytest.raises(DataError, match="no rows"):
        tb.table_from_records([], "label")
    with pytest.raises(DataError, match="two classes"):
        tbb.logistic_baseline(tb.load_table("iris"), [0, 1], [60, 120])


def test_bundled_split_records() -> None:
    train, test = tb.bundled_split("wine", k=16, template="list", seed=0)
    assert len(train) == 16 and len(test) == 36
    assert not {r["row"] for r in train} & {r["row"] for r in test}
    assert sorted(Counter(r["label"] for r in train).values()) == [5, 5, 6]
    assert train[0]["text"].startswith("- alcohol: ")
