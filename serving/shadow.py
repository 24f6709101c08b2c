"""A shadow challenger: a second model version answers a fraction of live photos off the answer path.

`shopvision serve --shadow models:/NAME@challenger --shadow-fraction 0.1` loads the challenger on a
thread of its own after the server is ready, then runs it on about that fraction of answered photos.
A route hands the photos it already answered (their encoded bytes, or the client's tensors) and the
served answers to `offer`, which only samples and puts them in a queue bounded in requests and
bytes: it never waits, and a full queue drops the photos (counted). One worker thread, at the lowest
CPU priority, decodes them with the challenger's own preprocessing (so it may differ from the
champion's) and runs the challenger, so the client's answer, and when it is sent, never depend on
the challenger. What it reports, in /metrics and in the drift
JSON: how often its top-1 category agrees with the served one (over the last AGREEMENT_WINDOW
compared photos, and in total), its top-1 confidence distribution, and its time per request.

A challenger that fails (cannot be loaded, or raises on a photo) is counted and its last error shown;
nothing of it reaches a client. The challenger is resolved once at start: a moved alias is not
followed (restart the server to shadow another version).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shopvision.components.evaluation.baseline import bin_edges

log = logging.getLogger("shopvision.serving")

DEFAULT_FRACTION = 0.1
DEFAULT_QUEUE = 64  # requests' photos waiting for the challenger; more are dropped
DEFAULT_QUEUE_BYTES = 64 * 2**20  # and at most this many bytes of photos waiting
AGREEMENT_WINDOW = 1000  # compared photos the agreement rate is taken over
SHADOW_NICE = 19  # the shadow thread's niceness
SHADOW_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300]


class ShadowChallenger:
    def __init__(
        self,
        requested: str,
        load: Callable[[], object],
        registry: CollectorRegistry,
        *,
        fraction: float = DEFAULT_FRACTION,
        queue_size: int = DEFAULT_QUEUE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        thread_init: Callable[[], None] | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"the shadow fraction must be in (0, 1], got {fraction}")
        self.requested = requested
        self._load = load
        self.fraction = fraction
        self._thread_init = thread_init
        self._random = random.Random(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._queue_bytes = queue_bytes
        self._bytes_waiting = 0  # of the photos in the queue (under _lock)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the worker writes what /metrics and the JSON route read
        self.model = None
        self.state = "loading"  # loading, ready, failed to load, stopped
        self.last_error: str | None = None
        self._agreements: deque[bool] = deque(maxlen=AGREEMENT_WINDOW)
        self.counts = {"offered": 0, "compared": 0, "agreed": 0, "failed": 0, "dropped": 0, "skipped": 0}
        r = registry
        self.compared = Counter(
            "shopvision_shadow_photos", "Photos the shadow challenger answered too", registry=r
        )
        self.agreed = Counter(
            "shopvision_shadow_agreements", "Shadowed photos whose top-1 category the challenger agreed on",
            registry=r,
        )  # fmt: skip
        self.failures = Counter(
            "shopvision_shadow_failures",
            "Shadowed photos the challenger failed on (an error, or it could not be loaded)",
            registry=r,
        )
        self.dropped = Counter(
            "shopvision_shadow_dropped",
            "Photos sampled for the shadow but dropped: its queue was full, or the photo cannot reach it",
            registry=r,
        )
        self.confidence = Histogram(
            "shopvision_shadow_confidence", "Top-1 confidence of the shadow challenger",
            buckets=bin_edges()[1:], registry=r,
        )  # fmt: skip
        self.seconds = Histogram(
            "shopvision_shadow_seconds",
            "Time the challenger took for one request's sampled photos (decoding and forward pass)",
            buckets=SHADOW_BUCKETS,
            registry=r,
        )
        self.agreement_rate = Gauge(
            "shopvision_shadow_agreement_rate",
            f"Share of the last {AGREEMENT_WINDOW} shadowed photos whose top-1 category the challenger agreed on",
            registry=r,
        )
        self.agreement_rate.set_function(lambda: self.rate() if self.rate() is not None else float("nan"))
        self.up = Gauge(
            "shopvision_shadow_up", "1 while the shadow challenger is loaded and running", registry=r
        )
        self.up.set_function(lambda: 1.0 if self.state == "ready" else 0.0)

    # --- the answer path: sampling and a non-blocking hand-over ---

    def offer(self, predictions: Sequence, blobs: Sequence[bytes] | None = None, tensors=None) -> None:
        """Sample the answered photos and queue them for the challenger; never blocks nor raises."""
        chosen = [i for i in range(len(predictions)) if self._random.random() < self.fraction]
        if not chosen:
            return
        self.counts["offered"] += len(chosen)
        if self.state in ("failed to load", "stopped"):
            self.failures.inc(len(chosen) if self.state == "failed to load" else 0)
            self.counts["failed"] += len(chosen) if self.state == "failed to load" else 0
            return
        item = (
            [predictions[i] for i in chosen],
            [blobs[i] for i in chosen] if blobs is not None else None,
            [tensors[i] for i in chosen] if tensors is not None else None,
        )
        size = _item_bytes(item)
        with self._lock:
            fits = self._bytes_waiting + size <= self._queue_bytes
            if fits:
                try:
                    self._queue.put_nowait(item)
                    self._bytes_waiting += size
                except queue.Full:
                    fits = False
        if not fits:
            self.dropped.inc(len(chosen))
            self.counts["dropped"] += len(chosen)

    # --- the worker ---

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self.state = "stopped" if self.state == "ready" else self.state
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None

    def _work(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        # The lowest CPU priority for this thread only (Linux schedules threads alone): the challenger
        # gets the cores the serving threads leave idle, and never slows an answer by competing.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
        try:
            self.model = self._load()
        except BaseException as exc:  # anything at all: the served model must not notice
            self.state, self.last_error = "failed to load", _first_line(exc)
            log.error("shadow challenger %s could not be loaded (%s); serving goes on without it",
                      self.requested, self.last_error)  # fmt: skip
            return
        self.state = "ready"
        log.info("shadow challenger %s ready (version %s) on %g of photos",
                 self.requested, getattr(self.model, "version", "?"), self.fraction)  # fmt: skip
        while (item := self._queue.get()) is not None:
            with self._lock:
                self._bytes_waiting -= _item_bytes(item)
            self._compare(*item)

    def _compare(self, served: list, blobs: list[bytes] | None, tensors: list | None) -> None:
        import torch

        model = self.model
        started = time.perf_counter()
        try:
            if blobs is not None:
                inputs = [model.preprocess(blob) for blob in blobs]
            elif tensors is not None and tuple(tensors[0].shape) == tuple(model.input_shape):
                inputs = list(tensors)  # the client's own preprocessed tensors, if the challenger takes them
            else:
                self.dropped.inc(len(served))
                self.counts["skipped"] += len(served)
                return
            answers = model.predict(torch.stack(inputs))
        except Exception as exc:  # the challenger's fault, never the client's: count and carry on
            self.failures.inc(len(served))
            with self._lock:
                self.counts["failed"] += len(served)
                first = self.last_error is None
                self.last_error = _first_line(exc)
            if first:
                log.warning("shadow challenger %s failed on %d photo(s): %s (counted in "
                            "shopvision_shadow_failures_total)", self.requested, len(served),
                            self.last_error)  # fmt: skip
            return
        self.seconds.observe(time.perf_counter() - started)
        with self._lock:
            for mine, theirs in zip(answers, served, strict=True):
                same = mine.labels[0] == theirs.labels[0]
                self._agreements.append(same)
                self.counts["compared"] += 1
                self.counts["agreed"] += same
                self.compared.inc()
                self.agreed.inc(same)
                self.confidence.observe(mine.probabilities[0])

    # --- what is reported ---

    def rate(self) -> float | None:
        with self._lock:
            return sum(self._agreements) / len(self._agreements) if self._agreements else None

    def snapshot(self) -> dict:
        rate = self.rate()
        with self._lock:
            counts = dict(self.counts)
            window = len(self._agreements)
        return {
            "challenger": self.requested,
            "version": getattr(self.model, "version", None),
            "state": self.state,
            "fraction": self.fraction,
            "agreement_rate": rate,
            "agreement_window": window,
            **counts,
            "queued": self._queue.qsize(),
            "confidence_histogram": _histogram(self.confidence),
            "seconds": _histogram(self.seconds),
            "last_error": self.last_error,
        }


def _item_bytes(item: tuple) -> int:
    """The memory a queued item holds: its encoded photos, or its float32 tensors."""
    _, blobs, tensors = item
    return sum(map(len, blobs)) if blobs is not None else sum(t.numel() * 4 for t in tensors or [])


def _histogram(histogram: Histogram) -> dict:
    """A Histogram's cumulative buckets, count and sum, as JSON."""
    buckets, count, total = {}, 0.0, 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                buckets[sample.labels["le"]] = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return {"le": buckets, "count": count, "sum": total}
