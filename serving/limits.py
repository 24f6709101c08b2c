"""What all requests together may cost the prediction server: photos in progress, and the memory of
JSON bodies being parsed.

The bounds of one request are checked where it is parsed: photos per request (`protocol.
check_photo_count`), pixels and aspect ratio of one photo (`components.images.decode_image`,
`model.check_aspect_ratio`). Time and concurrency are ASGI middleware (`middleware.py`). Both classes
here are used from the event loop only, so their counters need no lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from .handling import ApiError

MiB = 2**20


class PhotoAdmission:
    """Photos admitted at once: from before the first is decoded until the last is answered.

    Checked before decoding, so a burst of photos is refused while it is still cheap encoded bytes;
    the batcher's own queue can then never overflow after the work of decoding was done.
    """

    def __init__(self, max_photos: int) -> None:
        self.max_photos = max_photos
        self.admitted = 0

    @contextmanager
    def admit(self, count: int) -> Iterator[None]:
        """Hold `count` places while the block runs; 503 (saying what is in progress) when full."""
        if self.admitted + count > self.max_photos:
            raise ApiError(
                503,
                f"{self.admitted} photos are already in progress (being decoded, waiting for or in a "
                f"forward pass) and this request brings {count}; the server holds at most "
                f"{self.max_photos} at once (--max-queue): retry shortly",
            )
        self.admitted += count
        try:
            yield
        finally:
            self.admitted -= count


class MemoryBudget:
    """Bytes that JSON bodies being parsed may take together, by their estimated parsed size.

    A JSON list of floats takes ~17× its text once parsed: without a budget, a few concurrent 20 MiB
    bodies would take the pod's memory. A body whose estimate alone is over the budget is refused
    (413); others wait until enough is free (bounded by the request deadline).
    """

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.used = 0
        self._waiters: list[asyncio.Future] = []

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        if nbytes > self.total:
            raise ApiError(
                413,
                f"this JSON body would take about {nbytes / MiB:.0f} MiB to parse, over the server's "
                f"JSON budget of {self.total / MiB:g} MiB (--json-budget-mb): send the data as binary "
                "tensor data (Inference-Header-Content-Length) or in smaller requests",
            )
        loop = asyncio.get_running_loop()
        while self.used + nbytes > self.total:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        self.used += nbytes
        try:
            yield
        finally:
            self.used -= nbytes
            for waiter in self._waiters:  # each rechecks what is free
                if not waiter.done():
                    waiter.set_result(None)
