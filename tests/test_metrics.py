"""Metric functions against values computed by hand on a small fixed prediction set.

The set: categories a, b, c and six photos.

    photo  true  ranked predictions  top-1 prob  top-1 right
    1      a     a b c               0.90        yes
    2      a     a c b               0.60        yes
    3      a     b c a               0.80        no   (a is third)
    4      b     b a c               0.50        yes
    5      b     c b a               0.70        no   (b is second)
    6      c     c a b               0.95        yes

Confusion (rows true, columns predicted): a [2 1 0], b [0 1 1], c [0 0 1].
"""

from __future__ import annotations

from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest

from shopvision.components.errors import StepError
from shopvision.components.evaluation import metrics as m
from shopvision.components.evaluation.evaluate import (
    CHOOSE_HERE,
    compute_metrics,
    headline_metrics,
    read_taxonomy,
)
from shopvision.components.evaluation.predict import PhotoPrediction

LABELS = ["a", "b", "c"]
TRUE = ["a", "a", "a", "b", "b", "c"]
RANKED = [
    ["a", "b", "c"],
    ["a", "c", "b"],
    ["b", "c", "a"],
    ["b", "a", "c"],
    ["c", "b", "a"],
    ["c", "a", "b"],
]
TOP1_PROB = [0.90, 0.60, 0.80, 0.50, 0.70, 0.95]
TRUE_INDEX = [LABELS.index(c) for c in TRUE]
RANKED_INDEX = [[LABELS.index(c) for c in r] for r in RANKED]
CORRECT = [r[0] == t for r, t in zip(RANKED, TRUE, strict=True)]


def _predictions() -> list[PhotoPrediction]:
    out = []
    for i, (ranked, p1) in enumerate(zip(RANKED, TOP1_PROB, strict=True)):
        rest = (1 - p1) / 2
        out.append(
            PhotoPrediction(
                Path(f"{TRUE[i]}/p{i}_1.jpg"),
                tuple(LABELS.index(c) for c in ranked),
                tuple(ranked),
                (p1, rest, rest),
            )
        )
    return out


def test_confusion_matrix_by_hand():
    matrix = m.confusion_matrix(TRUE_INDEX, [r[0] for r in RANKED_INDEX], 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m.normalise_rows(matrix)[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0])
    assert m.normalise_rows(np.zeros((2, 2))).tolist() == [[0, 0], [0, 0]]  # no photos: no division


def test_top_k_accuracy_by_hand():
    assert m.top_k_accuracy(TRUE_INDEX, RANKED_INDEX, 1) == pytest.approx(4 / 6)
    assert m.top_k_accuracy(TRUE_INDEX, RANKED_INDEX, 2) == pytest.approx(5 / 6)  # photo 3 still misses
    assert m.top_k_accuracy(TRUE_INDEX, RANKED_INDEX, 3) == 1.0
    assert m.top_k_accuracy(TRUE_INDEX, RANKED_INDEX, 5) == 1.0  # k beyond the ranking: all of it
    assert m.top_k_accuracy([], [], 1) == 0.0


def test_per_category_precision_recall_f1_and_averages_by_hand():
    report = m.per_category_report(m.confusion_matrix(TRUE_INDEX, [r[0] for r in RANKED_INDEX], 3), LABELS)
    rows = report["per_category"]
    expected = {  # precision = hits / predicted, recall = hits / support
        "a": (F(2, 2), F(2, 3), F(4, 5), 3),
        "b": (F(1, 2), F(1, 2), F(1, 2), 2),
        "c": (F(1, 2), F(1, 1), F(2, 3), 1),
    }
    for label, (precision, recall, f1, support) in expected.items():
        assert rows[label]["precision"] == pytest.approx(float(precision))
        assert rows[label]["recall"] == pytest.approx(float(recall))
        assert rows[label]["f1"] == pytest.approx(float(f1))
        assert rows[label]["support"] == support
    assert report["macro_avg"] == pytest.approx(
        {"precision": float(F(2, 3)), "recall": float(F(13, 18)), "f1": float(F(59, 90))}
    )
    assert report["weighted_avg"] == pytest.approx(
        {"precision": 0.75, "recall": float(F(4, 6)), "f1": float(F(61, 90))}
    )


def test_categories_without_photos_are_left_out_of_the_macro_average():
    # Category d is known to the model but absent from the test data and never predicted.
    matrix = np.array([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    report = m.per_category_report(matrix, [*LABELS, "d"])
    assert report["per_category"]["d"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
        "predicted": 0,
    }
    assert report["macro_avg"]["f1"] == pytest.approx(float(F(59, 90)))
    assert report["categories_averaged"] == 3


def test_per_category_report_agrees_with_scikit_learn_on_random_predictions():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    true, predicted = rng.integers(0, 7, 300), rng.integers(0, 7, 300)
    report = m.per_category_report(m.confusion_matrix(true, predicted, 7), [str(i) for i in range(7)])
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        true, predicted, labels=range(7), zero_division=0
    )
    for i in range(7):
        row = report["per_category"][str(i)]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i])
        )
    for average in ("macro", "weighted"):
        p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(
            true, predicted, average=average, zero_division=0
        )
        assert report[f"{average}_avg"] == pytest.approx({"precision": p, "recall": r, "f1": f})


def test_top_confusions_most_photos_then_largest_share_first():
    matrix = m.confusion_matrix(TRUE_INDEX, [r[0] for r in RANKED_INDEX], 3)
    assert m.top_confusions(matrix, LABELS) == [
        {"true_category": "b", "predicted_category": "c", "count": 1, "share": 0.5},
        {"true_category": "a", "predicted_category": "b", "count": 1, "share": pytest.approx(1 / 3)},
    ]
    assert len(m.top_confusions(matrix, LABELS, limit=1)) == 1


def test_coverage_curve_by_hand():
    curve = {p.threshold: p for p in m.coverage_curve(TOP1_PROB, CORRECT)}
    assert list(curve) == [i / 100 for i in range(100)]
    cases = {  # threshold: (photos with top-1 prob >= threshold, right among them)
        0.0: (6, 4),
        0.5: (6, 4),
        0.51: (5, 3),
        0.6: (5, 3),  # prob 0.60 is covered at threshold 0.60 (>=, as serving compares)
        0.61: (4, 2),
        0.7: (4, 2),
        0.71: (3, 2),
        0.8: (3, 2),
        0.81: (2, 2),
        0.95: (1, 1),
        0.96: (0, 0),
        0.99: (0, 0),
    }
    for threshold, (covered, right) in cases.items():
        point = curve[threshold]
        assert point.covered == covered, threshold
        assert point.coverage == pytest.approx(covered / 6), threshold
        assert point.accuracy == (pytest.approx(right / covered) if covered else None), threshold


def test_lowest_threshold_reaching_the_target():
    curve = m.coverage_curve(TOP1_PROB, CORRECT)
    assert m.lowest_threshold(curve, 0.6) == 0.0  # everything together already reaches 4/6
    assert m.lowest_threshold(curve, 2 / 3) == 0.0
    # Accuracy dips (0.6 at 0.51, 0.5 at 0.61) before it rises: the first threshold reaching 0.7 is 0.81.
    assert m.lowest_threshold(curve, 0.7) == 0.81
    assert m.lowest_threshold(curve, 0.95) == 0.81
    assert m.lowest_threshold(curve, 1.0) == 0.81
    assert m.lowest_threshold(m.coverage_curve(TOP1_PROB, [False] * 6), 0.5) is None
    assert m.lowest_threshold(m.coverage_curve([0.3, 0.4], [True, True]), 1.0) == 0.0


def test_macro_category_roll_up_by_hand():
    taxonomy = {"a": "X", "b": "X", "c": "Y"}
    rolled = m.macro_category_accuracy(TRUE, [r[0] for r in RANKED], taxonomy)
    # Photo 3 (a taken for b) is right at the macro level; photo 5 (b taken for c) is not.
    assert rolled["accuracy"] == pytest.approx(5 / 6)
    assert rolled["per_macro_category"] == {
        "X": {"support": 5, "correct": 4, "accuracy": pytest.approx(0.8)},
        "Y": {"support": 1, "correct": 1, "accuracy": 1.0},
    }
    with pytest.raises(StepError, match="no macro category for 1 categories: c"):
        m.macro_category_accuracy(TRUE, [r[0] for r in RANKED], {"a": "X", "b": "X"})


def test_compute_metrics_assembles_the_hand_computed_values():
    # The threshold comes from validation photos; here 0.81 is reported on these (test) photos.
    metrics, matrix, classes, curve = compute_metrics(
        LABELS,
        TRUE,
        _predictions(),
        target_accuracy=0.95,
        taxonomy={"a": "X", "b": "X", "c": "Y"},
        threshold=0.81,
    )
    assert classes == LABELS and matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert metrics["top1_accuracy"] == pytest.approx(4 / 6)
    assert metrics["top5_accuracy"] == 1.0 and metrics["top_k"] == 3
    assert metrics["counts"] == {
        "images": 6,
        "correct_top1": 4,
        "correct_top5": 6,
        "test_categories": 3,
        "model_categories": 3,
        "categories_unknown_to_model": [],
    }
    assert metrics["confidence_threshold"] == 0.81
    assert metrics["coverage"] == {
        "target_accuracy": 0.95,
        "confidence_threshold": 0.81,
        "served_threshold": 0.81,
        "covered": 2,
        "coverage": pytest.approx(2 / 6),
        "accuracy": 1.0,
    }
    assert metrics["macro_category"]["accuracy"] == pytest.approx(5 / 6)
    assert metrics["macro_avg"]["f1"] == pytest.approx(float(F(59, 90)))
    headline = headline_metrics(metrics)
    assert headline["test_top1_accuracy"] == pytest.approx(4 / 6)
    assert headline["test_confidence_threshold"] == 0.81
    assert headline["test_macro_category_accuracy"] == pytest.approx(5 / 6)


def test_a_test_category_the_model_does_not_know_counts_as_wrong():
    predictions = _predictions()
    true = [*TRUE[:-1], "z"]  # the last photo is labelled with a category the model lacks
    metrics, matrix, classes, _ = compute_metrics(LABELS, true, predictions)
    assert classes == [*LABELS, "z"]
    assert metrics["top1_accuracy"] == pytest.approx(3 / 6)
    assert metrics["counts"]["categories_unknown_to_model"] == ["z"]
    assert metrics["per_category"]["z"]["recall"] == 0.0 and metrics["per_category"]["z"]["support"] == 1
    assert matrix[3].tolist() == [0, 0, 1, 0]


def test_no_threshold_reaching_the_target_is_null():
    metrics, *_ = compute_metrics(
        LABELS, ["b"] * 6, _predictions(), target_accuracy=0.99, threshold=CHOOSE_HERE
    )
    assert metrics["confidence_threshold"] is None
    assert "test_confidence_threshold" not in headline_metrics(metrics)
    # With no threshold the server's default 0.5 applies, and the coverage is reported at it.
    assert metrics["coverage"]["served_threshold"] == 0.5
    sure = [p for p in TOP1_PROB if p >= 0.5]
    assert metrics["coverage"]["covered"] == len(sure)


def test_choosing_on_the_scored_photos_is_only_on_request():
    chosen, *_ = compute_metrics(LABELS, TRUE, _predictions(), target_accuracy=0.95, threshold=CHOOSE_HERE)
    given, *_ = compute_metrics(LABELS, TRUE, _predictions(), target_accuracy=0.95)
    assert chosen["confidence_threshold"] == 0.81 and given["confidence_threshold"] is None


def test_read_taxonomy(tmp_path):
    sample = read_taxonomy(Path(__file__).resolve().parents[1] / "data" / "sample" / "taxonomy.csv")
    assert sample["Granny-Smith"] == sample["Pink-Lady"] == "Apple" and len(sample) == 12
    (tmp_path / "bad.csv").write_text("micro,macro\na,X\n")
    with pytest.raises(StepError, match="category,macro_category"):
        read_taxonomy(tmp_path / "bad.csv")
    (tmp_path / "twice.csv").write_text("category,macro_category\na,X\na,Y\n")
    with pytest.raises(StepError, match="line 3"):
        read_taxonomy(tmp_path / "twice.csv")
