"""The evaluate step's figures: the row-normalised confusion matrix and the coverage curve, as PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import metrics as m

# Beyond these many categories, names and cell values would overlap on any sensible figure size.
NAMED_TICKS_UP_TO = 40
CELL_VALUES_UP_TO = 15


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], target: Path) -> None:
    """Row-normalised matrix as a PNG that stays readable from a handful to hundreds of categories.

    Few categories: names on both axes and the share in each cell. Many: a heat map with category
    indices (the order of `per_category` in metrics.json) and no text that would overlap; the top
    confusions are listed in metrics.json and confusions.csv instead.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize, PowerNorm
    from matplotlib.figure import Figure

    n = len(labels)
    shares = m.normalise_rows(matrix)
    side = float(np.clip(4 + 0.3 * n, 6, 16))  # inches; 100 dpi keeps 200 categories at ~7 px a cell
    figure = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # With many categories most confusions are a few percent of a row: a square-root colour scale
    # keeps them visible next to the diagonal.
    many = n > NAMED_TICKS_UP_TO
    norm = PowerNorm(0.5, vmin=0.0, vmax=1.0) if many else Normalize(vmin=0.0, vmax=1.0)
    image = axes.imshow(shares, cmap="Blues", norm=norm, interpolation="nearest", aspect="equal")
    scale = " (square-root colour scale)" if many else ""
    figure.colorbar(
        image, ax=axes, fraction=0.046, pad=0.04, label=f"share of the true category's photos{scale}"
    )
    if not many:
        size = 9 if n <= 15 else 7
        axes.set_xticks(range(n), labels, rotation=90, fontsize=size)
        axes.set_yticks(range(n), labels, fontsize=size)
        axes.set_xlabel("predicted category")
        axes.set_ylabel("true category")
    else:
        step = max(1, int(np.ceil(n / 10)))
        axes.set_xticks(range(0, n, step))
        axes.set_yticks(range(0, n, step))
        axes.set_xlabel("predicted category (index, as ordered in metrics.json)")
        axes.set_ylabel("true category (index)")
    if n <= CELL_VALUES_UP_TO:
        for (row, col), value in np.ndenumerate(shares):
            if value >= 0.005:
                axes.text(
                    col,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.6 else "black",
                )
    photos = int(np.asarray(matrix).sum())
    title = f"confusion matrix, row-normalised: {photos} photos, {n} categories"
    if many:
        title += "\n(top confusions: confusions.csv)"
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(target, dpi=100)


def plot_coverage(
    curve: Sequence[m.CoveragePoint], target_accuracy: float, threshold: float | None, target: Path
) -> None:
    """Coverage and accuracy against the confidence threshold, the target and the chosen threshold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    thresholds = [p.threshold for p in curve]
    axes.plot(thresholds, [p.coverage for p in curve], label="coverage (share of photos answered)")
    axes.plot(
        thresholds,
        [np.nan if p.accuracy is None else p.accuracy for p in curve],
        label="top-1 accuracy on them",
    )
    axes.axhline(
        target_accuracy, color="grey", linestyle="--", linewidth=1, label=f"target {target_accuracy:g}"
    )
    if threshold is not None:
        axes.axvline(threshold, color="red", linestyle=":", linewidth=1.5, label=f"threshold {threshold:.2f}")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("confidence threshold (top-1 probability ≥)")
    axes.legend(loc="lower left", fontsize=8)
    axes.set_title(
        "accuracy vs coverage" + ("" if threshold is not None else " (no threshold reaches the target)")
    )
    figure.tight_layout()
    figure.savefig(target, dpi=100)
