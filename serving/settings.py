"""Server settings and choices, in a module light enough for `shopvision --help` to import."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")  # serve --runtime; see runtime.py
DEFAULT_MAX_ASPECT_RATIO = 20.0  # longer side / shorter side of one photo the server preprocesses
DEFAULT_MODEL_NAME = "shopvision"  # the OIP name of a model that is not from the registry
CGROUP = Path("/sys/fs/cgroup")


def available_cores(cgroup: Path = CGROUP) -> int:
    """The CPU cores this process may really use: its cgroup CPU quota, rounded up, when it has one
    (a pod's `limits.cpu`), else the cores it is pinned to.

    `os.cpu_count()` is the node's count: a 2-core pod on a 64-core node that sizes its thread pools
    by it runs 32 times too many threads, all throttled by the quota.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else max(1, cores)


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs allowed by the quota (cgroup v2 `cpu.max`, else v1 `cpu.cfs_*`); None without a quota."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # "-1" without a quota
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


@dataclass
class ServerSettings:
    model_name: str = DEFAULT_MODEL_NAME  # the NAME in /v2/models/NAME and /v1/models/NAME
    max_batch_size: int = 32  # most photos in one forward pass
    max_wait_ms: float = 5.0  # longest the oldest waiting photo waits for company
    max_body_bytes: int = 20 * 2**20
    decode_threads: int = field(default_factory=lambda: min(8, available_cores()))
    forward_workers: int | None = None  # forward passes in flight at once; None: auto_forward_workers
    # Bounds on what one request, and all of them together, may cost (see serving/limits.py):
    max_photos: int = 64  # photos in one request, on every route; more: 413 before any is decoded
    max_queue: int = 512  # photos admitted at once (decoding, waiting, in a forward pass); more: 503
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO  # of one photo; more: 422
    json_budget_bytes: int = 512 * 2**20  # estimated memory of JSON bodies being parsed at once
    request_timeout: float = 30.0  # seconds from request to answer; later: 504
    max_concurrency: int = 64  # POST requests in progress at once; more: 503 (JSON, from the app)
    max_connections: int = 256  # uvicorn's limit_concurrency: connections or requests; more: 503


def auto_forward_workers(device_type: str, cores: int) -> int:
    """One on a GPU (one stream runs passes in turn anyway). On a CPU one single-threaded pass per core
    up to 4, then more threads per pass: several passes at once keep every core busy without the
    barrier waits of one pass spread thin, which cost most when other work shares the cores."""
    return 1 if device_type != "cpu" else max(1, min(4, cores))
