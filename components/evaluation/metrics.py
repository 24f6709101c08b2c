"""Classification metrics as pure functions of predictions: no files, no torch, no MLflow.

Everything here takes category indices or labels and probabilities that the evaluation step (or a
test) already has, so each number can be checked against a hand-computed value. Conventions:

- a ratio whose denominator is zero (precision of a category never predicted, recall of a category
  absent from the test data, accuracy above a threshold nobody reaches) is 0.0, as scikit-learn's
  `zero_division=0`, except coverage accuracy, which is None ("no photo is that sure");
- macro averages are taken over the categories that occur in the test data (support > 0), so a
  category the model knows but the test split lacks does not drag the average down;
  weighted averages weight each category by its support.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import StepError

# 0.00, 0.01, ..., 0.99: the confidence thresholds of the coverage curve (exact two-decimal values).
COVERAGE_THRESHOLDS: tuple[float, ...] = tuple(round(i / 100, 2) for i in range(100))
_EPS = 1e-12


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def confusion_matrix(
    true_index: Sequence[int], predicted_index: Sequence[int], num_classes: int
) -> np.ndarray:
    """Counts: row = true category, column = predicted (top-1) category."""
    true_index = np.asarray(true_index, dtype=np.int64)
    predicted_index = np.asarray(predicted_index, dtype=np.int64)
    if true_index.shape != predicted_index.shape:
        raise ValueError("true and predicted indices differ in length")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true_index, predicted_index), 1)
    return matrix


def top_k_accuracy(true_index: Sequence[int], ranked_index: Sequence[Sequence[int]], k: int) -> float:
    """Share of photos whose true category is among the first k ranked predictions."""
    true_index = np.asarray(true_index, dtype=np.int64)
    if true_index.size == 0:
        return 0.0
    ranked = np.asarray(ranked_index, dtype=np.int64)[:, :k]
    return float((ranked == true_index[:, None]).any(axis=1).mean())


def per_category_report(matrix: np.ndarray, labels: Sequence[str]) -> dict:
    """Precision, recall, F1 and support per category, with macro and weighted averages."""
    matrix = np.asarray(matrix)
    hits = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    per_category = {}
    for i, label in enumerate(labels):
        precision = _ratio(hits[i], predicted[i])
        recall = _ratio(hits[i], support[i])
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_category[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
    present = [row for row in per_category.values() if row["support"] > 0]
    total = sum(row["support"] for row in present)
    averages = {}
    for name in ("precision", "recall", "f1"):
        averages[f"macro_{name}"] = _ratio(sum(row[name] for row in present), len(present))
        averages[f"weighted_{name}"] = _ratio(sum(row[name] * row["support"] for row in present), total)
    return {
        "per_category": per_category,
        "macro_avg": {k.removeprefix("macro_"): v for k, v in averages.items() if k.startswith("macro_")},
        "weighted_avg": {
            k.removeprefix("weighted_"): v for k, v in averages.items() if k.startswith("weighted_")
        },
        "categories_averaged": len(present),
    }


def top_confusions(matrix: np.ndarray, labels: Sequence[str], limit: int | None = 20) -> list[dict]:
    """Off-diagonal cells, most photos first: which true category is taken for which, how often.

    `share` is the part of the true category's photos that went to that wrong category.
    """
    matrix = np.asarray(matrix)
    support = matrix.sum(axis=1)
    rows, cols = np.nonzero(matrix)
    cells = [
        {
            "true_category": labels[r],
            "predicted_category": labels[c],
            "count": int(matrix[r, c]),
            "share": _ratio(matrix[r, c], support[r]),
        }
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
        if r != c
    ]
    cells.sort(
        key=lambda cell: (-cell["count"], -cell["share"], cell["true_category"], cell["predicted_category"])
    )
    return cells if limit is None else cells[:limit]


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall on the diagonal); rows without photos stay zero."""
    matrix = np.asarray(matrix, dtype=np.float64)
    sums = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)


@dataclass(frozen=True)
class CoveragePoint:
    threshold: float
    covered: int  # photos whose top-1 probability is >= threshold
    coverage: float  # covered / all photos
    accuracy: float | None  # top-1 accuracy on the covered photos; None when none is covered


def coverage_curve(
    top1_probability: Sequence[float],
    top1_correct: Sequence[bool],
    thresholds: Sequence[float] = COVERAGE_THRESHOLDS,
) -> list[CoveragePoint]:
    """For each threshold: how many photos the model is at least that sure of, and how often it is right.

    A photo counts as covered when its top-1 probability is >= the threshold (the same comparison
    serving makes), so threshold 0.0 covers every photo.
    """
    probability = np.asarray(top1_probability, dtype=np.float64)
    correct = np.asarray(top1_correct, dtype=bool)
    if probability.shape != correct.shape:
        raise ValueError("probabilities and correctness differ in length")
    total = probability.size
    points = []
    for threshold in thresholds:
        covered = probability >= threshold - _EPS
        count = int(covered.sum())
        accuracy = float(correct[covered].mean()) if count else None
        points.append(CoveragePoint(float(threshold), count, _ratio(count, total), accuracy))
    return points


def lowest_threshold(curve: Sequence[CoveragePoint], target_accuracy: float) -> float | None:
    """The lowest threshold whose covered photos reach the target accuracy; None when none does.

    The lowest one keeps the most photos answered without flagging. Accuracy is not always
    monotonic in the threshold; the first threshold that reaches the target is the one chosen.
    """
    for point in sorted(curve, key=lambda p: p.threshold):
        if point.accuracy is not None and point.accuracy >= target_accuracy - _EPS:
            return point.threshold
    return None


def macro_category_accuracy(
    true_categories: Sequence[str], predicted_categories: Sequence[str], taxonomy: Mapping[str, str]
) -> dict:
    """Top-1 accuracy after mapping each micro category to its macro category, overall and per macro.

    Every true and predicted category must be in the taxonomy: a roll-up that guessed would be wrong.
    """
    missing = sorted({c for c in (*true_categories, *predicted_categories) if c not in taxonomy})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise StepError(f"the taxonomy has no macro category for {len(missing)} categories: {shown}")
    per_macro: dict[str, dict] = {}
    right = 0
    for true, predicted in zip(true_categories, predicted_categories, strict=True):
        macro = taxonomy[true]
        hit = taxonomy[predicted] == macro
        right += hit
        row = per_macro.setdefault(macro, {"support": 0, "correct": 0})
        row["support"] += 1
        row["correct"] += int(hit)
    for row in per_macro.values():
        row["accuracy"] = _ratio(row["correct"], row["support"])
    return {
        "accuracy": _ratio(right, len(true_categories)),
        "correct": right,
        "images": len(true_categories),
        "per_macro_category": dict(sorted(per_macro.items())),
    }
