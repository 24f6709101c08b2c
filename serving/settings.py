"""Server settings and choices, in a module light enough for `shopvision --help` to import."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ServerSettings:
    model_name: str = "shopvision"  # the NAME in /v2/models/NAME and /v1/models/NAME
    max_batch_size: int = 32  # most photos in one forward pass
    max_wait_ms: float = 5.0  # longest the oldest waiting photo waits for company
    max_body_bytes: int = 20 * 2**20
    decode_threads: int = min(8, os.cpu_count() or 1)
    forward_workers: int | None = None  # forward passes in flight at once; None: auto_forward_workers


def auto_forward_workers(device_type: str, cores: int) -> int:
    """One on a GPU (one stream runs passes in turn anyway). On a CPU one single-threaded pass per core
    up to 4, then more threads per pass: several passes at once keep every core busy without the
    barrier waits of one pass spread thin, which cost most when other work shares the cores."""
    return 1 if device_type != "cpu" else max(1, min(4, cores))
