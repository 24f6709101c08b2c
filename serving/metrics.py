"""Prometheus metrics of the prediction server, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The *_created series only double the output; Prometheus does not need them.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "shopvision_requests",
            "HTTP requests answered, by route and status code",
            ["route", "code"],
            registry=r,
        )
        self.errors = Counter(
            "shopvision_request_errors",
            "HTTP requests answered with 4xx or 5xx",
            ["route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "shopvision_request_duration_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("shopvision_images", "Photos classified", registry=r)
        self.batch_size = Histogram(
            "shopvision_batch_size", "Photos per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_passes = Counter("shopvision_forward_passes", "Forward passes run", registry=r)
        self.forward_seconds = Histogram(
            "shopvision_forward_seconds", "Time of one forward pass", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queued = Gauge("shopvision_queued_images", "Photos waiting for a forward pass", registry=r)
        self.requests_in_progress = Gauge(
            "shopvision_requests_in_progress",
            "POST requests being answered (bounded by --max-concurrency)",
            registry=r,
        )
        self.in_progress = Gauge(
            "shopvision_photos_in_progress",
            "Photos admitted: being decoded, waiting for or in a forward pass (bounded by --max-queue)",
            registry=r,
        )
        self.json_budget_used = Gauge(
            "shopvision_json_budget_used_bytes",
            "Estimated memory of the JSON bodies being parsed (bounded by --json-budget-mb)",
            registry=r,
        )
        self.model_info = Gauge(
            "shopvision_model_info",
            "The model version being served (value 1)",
            ["model", "version", "source", "device", "precision", "runtime", "threads"],
            registry=r,
        )
        self.model_version = Gauge(
            "shopvision_model_version",
            "Registry version number served (-1 when not from a registry)",
            registry=r,
        )
        self.swaps = Counter("shopvision_model_swaps", "Hot swaps to a new champion", registry=r)
        self.swap_failures = Counter(
            "shopvision_model_swap_failures",
            "New champions that failed to load or warm up (the old version kept serving)",
            registry=r,
        )
        self.registry_errors = Counter(
            "shopvision_registry_poll_errors", "Alias polls that could not reach the registry", registry=r
        )
        self.similar_queries = Counter(
            "shopvision_similar_queries", "Photos searched for similar catalogue photos", registry=r
        )
        self.similar_seconds = Histogram(
            "shopvision_similar_seconds",
            "Time to embed one photo and search the similar-photo index",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.similar_index_size = Gauge(
            "shopvision_similar_index_size",
            "Catalogue photos in the similar-photo index (0: none configured)",
            registry=r,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.forward_passes.inc()
        self.batch_size.observe(size)
        self.forward_seconds.observe(seconds)
        self.images.inc(size)

    def observe_similar(self, seconds: float) -> None:
        self.similar_queries.inc()
        self.similar_seconds.observe(seconds)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        if code >= 400:
            self.errors.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def set_model(
        self,
        *,
        model: str,
        version: str,
        source: str,
        device: str,
        precision: str,
        runtime: str = "torch",
        threads: int = 0,
    ) -> None:
        self.model_info.clear()
        self.model_info.labels(model, version, source, device, precision, runtime, str(threads)).set(1)
        self.model_version.set(int(version) if version.isdigit() else -1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
