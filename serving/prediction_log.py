"""The prediction log: one JSON line per answered photo, for a later run to study or relabel real traffic.

Each line holds the time (UTC), the served model name and version, the top-5 categories with their
probabilities, the top-1 confidence and whether it reached the threshold: never the photo, nor the
client's file name (both are the client's, not ours to keep). Lines go to `PATH`, which is rotated
to `PATH.1` ... `PATH.<backups>` when it would pass `max_bytes`, so the log never holds more than
(backups + 1) × max_bytes.

No request waits for the disk: the routes hand records to a bounded queue (`offer`, never blocking)
that one background thread writes. When the queue is full (a slow or stalled disk) the record is
dropped and counted (`shopvision_prediction_log_dropped_total`); a write that fails (disk full) is
counted as an error and its record dropped, and the writer carries on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("shopvision.serving")

DEFAULT_MAX_MB = 64.0
DEFAULT_BACKUPS = 3
DEFAULT_QUEUE = 10_000  # records waiting for the writer; more are dropped
_STOP = object()


def prediction_record(model_name: str, prediction, now: float | None = None) -> dict:
    """The logged form of one answer (a serving Prediction)."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return {
        "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "model": model_name,
        "model_version": prediction.model_version,
        "top": [
            {"label": label, "probability": round(float(p), 6)}
            for label, p in zip(prediction.labels, prediction.probabilities, strict=True)
        ],
        "confidence": round(float(prediction.probabilities[0]), 6),
        "confident": bool(prediction.confident),
    }


class PredictionLog:
    def __init__(
        self,
        path: Path,
        registry: CollectorRegistry,
        *,
        max_bytes: int = int(DEFAULT_MAX_MB * 2**20),
        backups: int = DEFAULT_BACKUPS,
        queue_size: int = DEFAULT_QUEUE,
    ) -> None:
        if max_bytes < 1024 or backups < 0 or queue_size < 1:
            raise ValueError("the prediction log needs max_bytes >= 1 KiB, backups >= 0 and a queue >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self.counts = {"written": 0, "dropped": 0, "write_errors": 0}  # what describe() reports
        self.written = Counter(
            "shopvision_prediction_log_records", "Answers written to the prediction log", registry=registry
        )
        self.dropped = Counter(
            "shopvision_prediction_log_dropped",
            "Answers not logged because the prediction log's queue was full (a slow disk)",
            registry=registry,
        )
        self.errors = Counter(
            "shopvision_prediction_log_write_errors",
            "Prediction log writes that failed (their records dropped)",
            registry=registry,
        )
        self.waiting = Gauge(
            "shopvision_prediction_log_queued", "Answers waiting to be written to the prediction log",
            registry=registry,
        )  # fmt: skip
        self.waiting.set_function(self._queue.qsize)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to `timeout` seconds), then stop the writer."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None

    def offer(self, model_name: str, predictions: Sequence) -> None:
        """Queue the answers for writing; never blocks (a full queue drops and counts them)."""
        now = time.time()
        for prediction in predictions:
            try:
                self._queue.put_nowait(prediction_record(model_name, prediction, now))
            except queue.Full:
                self.dropped.inc()
                self.counts["dropped"] += 1

    def describe(self) -> dict:
        return {
            "path": self.path.name,
            "max_bytes": self.max_bytes,
            "backups": self.backups,
            **self.counts,
            "queued": self._queue.qsize(),
        }

    def _write_loop(self) -> None:
        handle = None
        size = 0
        while True:
            record = self._queue.get()
            if record is _STOP:
                break
            line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
            try:
                if handle is None:
                    handle = open(self.path, "ab")  # noqa: SIM115 - held open across records
                    size = os.fstat(handle.fileno()).st_size  # a FIFO or device: 0
                if size and size + len(line) > self.max_bytes:
                    handle.close()
                    handle = None
                    self._rotate()
                    handle = open(self.path, "ab")  # noqa: SIM115
                    size = 0
                handle.write(line)
                size += len(line)
                self.written.inc()
                self.counts["written"] += 1
                if self._queue.empty():
                    handle.flush()
            except OSError as exc:
                self.errors.inc()
                self.counts["write_errors"] += 1
                log.warning("prediction log: cannot write %s: %s", self.path, exc)
                if handle is not None:
                    with contextlib.suppress(OSError):
                        handle.close()
                handle = None
        if handle is not None:
            handle.close()

    def _rotate(self) -> None:
        """PATH -> PATH.1 -> ... -> PATH.<backups>; the oldest falls off."""
        if self.backups == 0:
            os.replace(self.path, self.path.with_name(self.path.name + ".old"))
            os.unlink(self.path.with_name(self.path.name + ".old"))
            return
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
