"""The drift baseline of a model version: what its answers look like on held-out photos.

Written by evaluate (OUT/drift_baseline.json, and beside the model copy in OUT/model/), logged with
the registered version by register, and read by the server, which compares its live answers with it
(`serving/drift.py`). Three statistics, each computed the same way here and live:

- the top-1 confidence, counted in CONFIDENCE_BINS fixed bins of equal width over [0, 1] (fixed so
  that a baseline and a live window are always comparable, whatever the model);
- the predicted (top-1) category, counted per category of the model;
- the low-confidence rate: the share of photos whose top-1 confidence is under the served threshold
  (the one evaluation chose on validation photos, else the server default), the photos a person
  would be asked to check.

Counts, not shares, are stored, so a reader knows how many photos the baseline rests on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.naming import atomic_write_text
from ..errors import StepError

BASELINE_FILE = "drift_baseline.json"
FORMAT = "shopvision-drift-baseline/1"
CONFIDENCE_BINS = 10  # [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]


def confidence_bin(confidence: float) -> int:
    """The fixed bin of a top-1 confidence (1.0 falls in the last bin; values are clamped to [0, 1])."""
    if not math.isfinite(confidence):
        return 0
    return min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))


def bin_edges() -> list[float]:
    return [round(i / CONFIDENCE_BINS, 10) for i in range(CONFIDENCE_BINS + 1)]


@dataclass
class Baseline:
    labels: list[str]  # the model's categories, in its order
    confidence_counts: list[int]  # photos per confidence bin
    category_counts: list[int]  # photos per predicted category, aligned with labels
    low_confidence: int  # photos under the threshold
    photos: int
    threshold: float  # the served threshold the low-confidence rate was counted at
    photos_from: str = "test"  # which held-out photos: evaluate's test folder
    model_version: str | None = None  # set when logged with a registered version

    @property
    def low_confidence_rate(self) -> float:
        return self.low_confidence / self.photos if self.photos else 0.0

    def to_json(self) -> str:
        body = {"format": FORMAT, "confidence_bin_edges": bin_edges(), **asdict(self)}
        body["low_confidence_rate"] = self.low_confidence_rate
        return json.dumps(body, indent=1) + "\n"


def baseline_from_answers(
    labels: Sequence[str],
    top1_labels: Sequence[str],
    top1_confidences: Sequence[float],
    threshold: float,
    photos_from: str = "test",
) -> Baseline:
    """The baseline of these answers (top-1 category and confidence per photo) at `threshold`."""
    if len(top1_labels) != len(top1_confidences):
        raise ValueError("one confidence per predicted category is needed")
    index = {label: i for i, label in enumerate(labels)}
    confidence_counts = [0] * CONFIDENCE_BINS
    category_counts = [0] * len(labels)
    low = 0
    for label, confidence in zip(top1_labels, top1_confidences, strict=True):
        confidence_counts[confidence_bin(confidence)] += 1
        category_counts[index[label]] += 1
        low += confidence < threshold
    return Baseline(
        labels=list(labels),
        confidence_counts=confidence_counts,
        category_counts=category_counts,
        low_confidence=low,
        photos=len(top1_labels),
        threshold=float(threshold),
        photos_from=photos_from,
    )


def write_baseline(path: Path, baseline: Baseline) -> Path:
    atomic_write_text(Path(path), baseline.to_json())
    return Path(path)


def parse_baseline(text: str, where: str = "baseline") -> Baseline:
    """A Baseline from its JSON; a StepError naming what is wrong for anything else."""
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise StepError(f"{where} is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise StepError(f"{where} is not a drift baseline written by 'shopvision evaluate' ({FORMAT})")
    if body.get("confidence_bin_edges") != bin_edges():
        raise StepError(f"{where} has other confidence bins than this version of shopvision uses")
    try:
        baseline = Baseline(
            labels=[str(x) for x in body["labels"]],
            confidence_counts=[int(x) for x in body["confidence_counts"]],
            category_counts=[int(x) for x in body["category_counts"]],
            low_confidence=int(body["low_confidence"]),
            photos=int(body["photos"]),
            threshold=float(body["threshold"]),
            photos_from=str(body.get("photos_from", "test")),
            model_version=body.get("model_version"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StepError(f"{where} is missing or has a malformed field: {exc}") from None
    if len(baseline.category_counts) != len(baseline.labels) or baseline.photos < 1:
        raise StepError(f"{where}: one count per category and at least one photo are needed")
    return baseline


def read_baseline(path: Path) -> Baseline:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise StepError(f"cannot read drift baseline {path}: {exc.strerror or exc}") from None
    return parse_baseline(text, str(path))
