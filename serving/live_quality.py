"""What the server watches of its own answers: drift against the baseline, the prediction log, the shadow.

The routes call `observe` once a request's answers are ready, with the photos they answered; it
only updates counters (drift), and hands records to bounded queues (log, shadow), so it costs a
request microseconds and never waits. `/metrics` shows it through `DriftCollector` (the window's
gauges, computed at scrape time) and the cumulative `shopvision_top1_confidence` histogram;
GET /v2/models/NAME/drift returns `snapshot()`.

Label cardinality stays bounded whatever the number of categories: drift scores are labelled by
statistic (3), and predicted-category shares name only the TOP_CATEGORIES most predicted categories
of the window plus "other".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

from shopvision.components.evaluation.baseline import Baseline, bin_edges

from .drift import STATISTICS, DriftMonitor, WindowSpec
from .prediction_log import PredictionLog
from .shadow import ShadowChallenger

log = logging.getLogger("shopvision.serving")


class DriftCollector:
    """The window's statistics and drift scores as gauges, read from the monitor at each scrape."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def describe(self):
        return []  # collected lazily: the set of series depends on the window

    def collect(self):
        m = self.monitor
        scores = m.scores()
        score = GaugeMetricFamily(
            "shopvision_drift_score",
            "Jensen-Shannon divergence (base 2) of the window's statistic from the version's baseline; "
            "absent without a baseline or under the minimum photos",
            labels=["statistic"],
        )
        for statistic in STATISTICS:
            if scores[statistic] is not None:
                score.add_metric([statistic], scores[statistic])
        yield score
        yield GaugeMetricFamily(
            "shopvision_drift_window_photos", "Photos in the drift window", value=m.photos
        )
        yield GaugeMetricFamily(
            "shopvision_drift_baseline_photos",
            "Held-out photos the drift baseline rests on (0: no baseline for the served version)",
            value=m.baseline.photos if m.baseline is not None else 0,
        )
        if m.photos:
            yield GaugeMetricFamily(
                "shopvision_low_confidence_rate",
                "Share of the window's photos under the served confidence threshold",
                value=m.snapshot_low_rate(),
            )
        if m.baseline is not None:
            yield GaugeMetricFamily(
                "shopvision_baseline_low_confidence_rate",
                "The low-confidence rate of the served version on its held-out photos",
                value=m.baseline.low_confidence_rate,
            )
        shares = GaugeMetricFamily(
            "shopvision_predicted_category_share",
            "Share of the window's photos predicted as each of the most predicted categories, and the "
            'rest as category="other"',
            labels=["category"],
        )
        for category, share, _ in m.top_categories_shares():
            shares.add_metric([category], share)
        yield shares


class LiveQuality:
    def __init__(
        self,
        registry: CollectorRegistry,
        model_name: str,
        window: WindowSpec,
        *,
        prediction_log: PredictionLog | None = None,
        shadow: ShadowChallenger | None = None,
    ) -> None:
        self.model_name = model_name
        self.drift = DriftMonitor(window)
        self.prediction_log = prediction_log
        self.shadow = shadow
        self.confidence = Histogram(
            "shopvision_top1_confidence",
            "Top-1 confidence of every answered photo (fixed bins of the drift baseline)",
            buckets=bin_edges()[1:],
            registry=registry,
        )
        registry.register(DriftCollector(self.drift))

    def serve(self, model, baseline: Baseline | None) -> None:
        """Watch `model` (a PhotoClassifier) from now on, against its baseline (None: none found)."""
        if baseline is not None and abs(baseline.threshold - model.threshold) > 1e-9:
            log.warning("the drift baseline counted low confidence at %g, the server applies %g",
                        baseline.threshold, model.threshold)  # fmt: skip
        self.drift.switch(model.version, model.labels, model.threshold, baseline)
        log.info("drift: %s, %s", self.drift.window.describe(),
                 f"baseline of {baseline.photos} held-out photos" if baseline else "no baseline: no scores")  # fmt: skip

    def start(self) -> None:
        if self.prediction_log is not None:
            self.prediction_log.start()
        if self.shadow is not None:
            self.shadow.start()

    def stop(self) -> None:
        if self.shadow is not None:
            self.shadow.stop()
        if self.prediction_log is not None:
            self.prediction_log.stop()

    def observe(self, predictions: Sequence, *, blobs: Sequence[bytes] | None = None, tensors=None) -> None:
        """After a request's answers are ready: count them, log them, offer them to the shadow."""
        for prediction in predictions:
            self.confidence.observe(prediction.probabilities[0])
        self.drift.observe(predictions)
        if self.prediction_log is not None:
            self.prediction_log.offer(self.model_name, predictions)
        if self.shadow is not None:
            self.shadow.offer(predictions, blobs=blobs, tensors=tensors)

    def snapshot(self) -> dict:
        body = self.drift.snapshot()
        body["shadow"] = self.shadow.snapshot() if self.shadow is not None else None
        body["prediction_log"] = self.prediction_log.describe() if self.prediction_log is not None else None
        return body


def find_baseline(ref, override: str | None = None) -> Baseline | None:
    """The drift baseline of the version `ref` (a registry_watch.ModelRef) names, or None.

    `override` (serve --drift-baseline: a file or an MLflow artifact URI) wins. A registered version's
    baseline is the drift_baseline.json logged with it (register does that); a model folder's is the
    one beside it (evaluate writes OUT/model/drift_baseline.json). A baseline that cannot be read is
    an error when asked for by name, and a warning (no drift scores) when looked for."""
    from shopvision.components.errors import StepError
    from shopvision.components.evaluation.baseline import BASELINE_FILE, read_baseline
    from shopvision.components.training.model_source import MLFLOW_SCHEMES, download_mlflow_artifacts

    if override:
        local = download_mlflow_artifacts(override) if override.startswith(MLFLOW_SCHEMES) else override
        return read_baseline(Path(local))
    try:
        if ref.name is not None:  # models:/NAME/VERSION
            found = read_baseline(download_mlflow_artifacts(f"{ref.uri}/{BASELINE_FILE}"))
            found.model_version = ref.version
            return found
        folder = Path(ref.uri)
        if folder.is_dir() and (folder / BASELINE_FILE).is_file():
            return read_baseline(folder / BASELINE_FILE)
    except StepError as exc:
        log.warning("drift: no usable baseline for %s (%s): no drift scores", ref.requested, exc)
        return None
    log.warning("drift: %s has no %s: no drift scores (evaluate writes one, register logs it)",
                ref.requested, BASELINE_FILE)  # fmt: skip
    return None
