"""Live answer statistics over a rolling window, and how far they drifted from the version's baseline.

The server keeps, over the last `window_photos` photos (or the last `window_minutes` minutes, at most
MAX_WINDOW_PHOTOS photos), the three statistics the baseline holds (`components/evaluation/baseline.py`):
the top-1 confidence in fixed bins, the predicted category, and the low-confidence rate at the served
threshold. Each one's drift score is the Jensen–Shannon divergence, base 2 (0: the same distribution,
1: nothing in common), between the window's distribution and the baseline's; the low-confidence rate
is scored as the two-outcome distribution (under / at or over the threshold). Both sides get a
pseudo-count of 0.5 per bin (Jeffreys), so a category the 30-odd held-out photos never predicted is
rare, not impossible. JS rather than the population stability index: it is bounded and needs no
special case for empty bins, so one threshold means the same for 10 bins or 1,000 categories.

A score is only given once the window holds `min_photos`: below that, sampling noise alone exceeds
any useful threshold, and an alert must not fire on the first three photos after a restart.

Everything here runs on the event loop (observe after an answer, snapshot for /metrics and the JSON
route), so it needs no lock; each photo costs O(1), a snapshot O(bins + categories).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shopvision.components.evaluation.baseline import CONFIDENCE_BINS, Baseline, bin_edges, confidence_bin

STATISTICS = ("confidence", "category", "low_confidence")
# Drift scores above these are drift; the alert rules (manifests/base/alerts/) fire on the same values
# held for 30 minutes (tests/test_alert_rules.py checks they agree).
DRIFT_THRESHOLDS = {"confidence": 0.1, "category": 0.15, "low_confidence": 0.05}
DEFAULT_WINDOW_PHOTOS = 1000
DEFAULT_MIN_PHOTOS = 100
MAX_WINDOW_PHOTOS = 100_000  # a minutes window is also bounded in photos (memory)
TOP_CATEGORIES = 10  # categories named in /metrics; the rest are summed as "other"
PSEUDO_COUNT = 0.5


def jensen_shannon(
    p_counts: Sequence[float], q_counts: Sequence[float], pseudo: float = PSEUDO_COUNT
) -> float:
    """Jensen–Shannon divergence, base 2, between two count vectors (each smoothed by `pseudo`)."""
    if len(p_counts) != len(q_counts) or not p_counts:
        raise ValueError("two count vectors of one non-zero length are needed")
    p_total = sum(p_counts) + pseudo * len(p_counts)
    q_total = sum(q_counts) + pseudo * len(q_counts)
    divergence = 0.0
    for p_count, q_count in zip(p_counts, q_counts, strict=True):
        p, q = (p_count + pseudo) / p_total, (q_count + pseudo) / q_total
        m = (p + q) / 2
        if p > 0:
            divergence += 0.5 * p * math.log2(p / m)
        if q > 0:
            divergence += 0.5 * q * math.log2(q / m)
    return max(0.0, min(1.0, divergence))


@dataclass(frozen=True)
class WindowSpec:
    photos: int | None = DEFAULT_WINDOW_PHOTOS  # the last N photos ...
    minutes: float | None = None  # ... or the photos of the last M minutes (at most MAX_WINDOW_PHOTOS)
    min_photos: int = DEFAULT_MIN_PHOTOS

    def describe(self) -> str:
        return f"last {self.minutes:g} min" if self.minutes else f"last {self.photos} photos"


class DriftMonitor:
    """The rolling window of one serving model version, scored against that version's baseline."""

    def __init__(
        self,
        window: WindowSpec,
        *,
        thresholds: dict[str, float] | None = None,
        top_categories: int = TOP_CATEGORIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.thresholds = dict(thresholds or DRIFT_THRESHOLDS)
        self.top_categories = top_categories
        self.clock = clock
        self.switch("none", [], 0.5, None)

    def switch(
        self, version: str, labels: Sequence[str], threshold: float, baseline: Baseline | None
    ) -> None:
        """Start an empty window for a newly served version (its labels, threshold and baseline)."""
        self.version = version
        self.labels = list(labels)
        self.threshold = threshold
        self.baseline = baseline
        self.baseline_problem: str | None = None if baseline is not None else "no baseline for this version"
        self._baseline_categories: list[int] | None = None
        if baseline is not None:
            if sorted(baseline.labels) != sorted(self.labels):
                self.baseline_problem = "the baseline's categories are not the model's: category not scored"
            else:
                counts = dict(zip(baseline.labels, baseline.category_counts, strict=True))
                self._baseline_categories = [counts[label] for label in self.labels]
        self._index = {label: i for i, label in enumerate(self.labels)}
        self._entries: deque[tuple[float, int, int, bool]] = deque()  # (time, bin, category, low)
        self._confidence = [0] * CONFIDENCE_BINS
        self._categories = [0] * len(self.labels)
        self._low = 0
        self.observed = 0  # photos since the switch

    def observe(self, predictions: Sequence) -> None:
        """Add answered photos (serving Predictions: labels, probabilities, best first) to the window."""
        now = self.clock()
        for prediction in predictions:
            if prediction.model_version != self.version:
                continue  # a photo answered by the version being swapped out
            confidence = prediction.probabilities[0]
            entry = (now, confidence_bin(confidence), self._index.get(prediction.labels[0], -1),
                     confidence < self.threshold)  # fmt: skip
            self._add(entry, +1)
            self._entries.append(entry)
            self.observed += 1
        self._trim(now)

    def _add(self, entry: tuple[float, int, int, bool], sign: int) -> None:
        _, bin_index, category, low = entry
        self._confidence[bin_index] += sign
        if category >= 0:
            self._categories[category] += sign
        self._low += sign * low

    def _trim(self, now: float) -> None:
        limit = self.window.photos if not self.window.minutes else MAX_WINDOW_PHOTOS
        oldest = now - self.window.minutes * 60 if self.window.minutes else -math.inf
        while self._entries and (len(self._entries) > limit or self._entries[0][0] < oldest):
            self._add(self._entries.popleft(), -1)

    @property
    def photos(self) -> int:
        return len(self._entries)

    def snapshot_low_rate(self) -> float | None:
        """The window's low-confidence rate (None while it is empty)."""
        return self._low / self.photos if self.photos else None

    def scores(self) -> dict[str, float | None]:
        """The drift score of each statistic; None without a baseline or below `min_photos`."""
        self._trim(self.clock())
        scores: dict[str, float | None] = dict.fromkeys(STATISTICS)
        if self.baseline is None or self.photos < self.window.min_photos:
            return scores
        b = self.baseline
        scores["confidence"] = jensen_shannon(self._confidence, b.confidence_counts)
        if self._baseline_categories is not None:
            scores["category"] = jensen_shannon(self._categories, self._baseline_categories)
        scores["low_confidence"] = jensen_shannon(
            [self._low, self.photos - self._low], [b.low_confidence, b.photos - b.low_confidence]
        )
        return scores

    def top_categories_shares(self) -> list[tuple[str, float, float | None]]:
        """(category, window share, baseline share) for the most predicted categories, then "other"."""
        total = max(1, self.photos)
        base = self._baseline_categories
        base_total = max(1, sum(base)) if base is not None else 1
        ranked = sorted(range(len(self.labels)), key=lambda i: (-self._categories[i], self.labels[i]))
        top = [i for i in ranked[: self.top_categories] if self._categories[i] > 0]
        rows = [
            (self.labels[i], self._categories[i] / total, base[i] / base_total if base is not None else None)
            for i in top
        ]
        rest = [i for i in range(len(self.labels)) if i not in set(top)]
        rows.append(
            (
                "other",
                sum(self._categories[i] for i in rest) / total,
                sum(base[i] for i in rest) / base_total if base is not None else None,
            )
        )
        return rows

    def snapshot(self) -> dict:
        """Everything /metrics shows, as the JSON of GET /v2/models/NAME/drift."""
        scores = self.scores()
        photos = self.photos
        b = self.baseline
        return {
            "model_version": self.version,
            "measure": "jensen-shannon divergence, base 2, pseudo-count 0.5 per bin",
            "window": {
                "kind": "minutes" if self.window.minutes else "photos",
                "size": self.window.minutes or self.window.photos,
                "photos": photos,
                "min_photos": self.window.min_photos,
                "photos_since_start": self.observed,
            },
            "threshold": self.threshold,
            "scores": scores,
            "thresholds": self.thresholds,
            "drifting": sorted(s for s, v in scores.items() if v is not None and v > self.thresholds[s]),
            "live": {
                "confidence_bin_edges": bin_edges(),
                "confidence_counts": list(self._confidence),
                "low_confidence_rate": self.snapshot_low_rate(),
                "top_categories": [
                    {"category": c, "share": share, "baseline_share": base}
                    for c, share, base in self.top_categories_shares()
                ],
            },
            "baseline": None
            if b is None
            else {
                "photos": b.photos,
                "photos_from": b.photos_from,
                "model_version": b.model_version,
                "confidence_counts": b.confidence_counts,
                "low_confidence_rate": b.low_confidence_rate,
                "threshold": b.threshold,
            },
            "baseline_problem": self.baseline_problem,
        }
