"""Dynamic batching: photos from concurrent requests share one forward pass.

A request hands its preprocessed photos to `submit` and awaits their predictions. One loop on the
event loop gathers what is pending into a batch: it runs as soon as `max_batch_size` photos wait, or
when the oldest has waited `max_wait_ms`. The forward pass runs on one worker thread (torch releases
the GIL), so the event loop keeps accepting and decoding requests meanwhile, and what arrives during a
pass forms the next batch. Under load batches fill by themselves; when idle a lone photo waits at
most `max_wait_ms`.

Each photo carries the model that preprocessed it, so a hot swap never mixes versions inside one
request: a batch holding photos for two versions runs as two passes, and the old model lives until
its last photo is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger("shopvision.serving")


class BatchModel(Protocol):
    def predict(self, batch: torch.Tensor) -> list[Any]: ...


class Overloaded(RuntimeError):
    """More photos are waiting than the queue allows; the client should retry later."""


class NotRunning(RuntimeError):
    """The batcher is stopped (the server is shutting down)."""


@dataclass
class _Pending:
    model: BatchModel
    tensor: torch.Tensor
    future: asyncio.Future
    enqueued: float  # event-loop clock


class DynamicBatcher:
    def __init__(
        self,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        on_batch: Callable[[int, float], None] | None = None,
        workers: int = 1,
        worker_init: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1 or workers < 1:
            raise ValueError(
                "max_batch_size, max_queue and workers must be positive, max_wait_ms not negative"
            )
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # called with (photos, seconds) after each forward pass
        self._pending: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # Forward passes in flight at once: 1 on a GPU (one stream runs them in turn anyway); on a CPU
        # several single-threaded passes can beat one pass spread over all cores.
        self.workers = workers
        self._free: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="forward", initializer=worker_init
        )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start the gathering loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._free = asyncio.Semaphore(self.workers)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Stop gathering; photos still waiting fail with NotRunning."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.gather(*self._running, return_exceptions=True)
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(NotRunning("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, model: BatchModel, tensors: Sequence[torch.Tensor]) -> list[Any]:
        """Predictions for these photos (each 3×H×W), in order, computed by `model`."""
        if not self.running:
            raise NotRunning("the batcher is not running")
        if len(self._pending) + len(tensors) > self.max_queue:
            raise Overloaded(
                f"{len(self._pending)} photos are already waiting for a forward pass and this request "
                f"brings {len(tensors)}; the server queues at most {self.max_queue}: retry shortly"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = [loop.create_future() for _ in tensors]
        self._pending.extend(_Pending(model, t, f, now) for t, f in zip(tensors, futures, strict=True))
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            # A client that went away or ran out of time: its photos leave the queue at once, unrun
            # (photos of other requests in the same forward pass are answered as usual).
            for future in futures:
                future.cancel()
            self._drop_cancelled()
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Gather only once a worker is free: photos that arrive while all are busy join the batch.
            await self._free.acquire()
            batch = await self._gather(loop)
            task = loop.create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._free.release()

    async def _run_batch(self, batch: list[_Pending]) -> None:
        for group in _by_model(batch):
            await self._run(group)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        while True:
            self._drop_cancelled()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for a full batch, but never past the oldest photo's deadline.
            deadline = self._pending[0].enqueued + self.max_wait
            while len(self._pending) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            self._drop_cancelled()
            if self._pending:
                count = min(self.max_batch_size, len(self._pending))
                return [self._pending.popleft() for _ in range(count)]

    def _drop_cancelled(self) -> None:
        if any(item.future.done() for item in self._pending):
            self._pending = deque(item for item in self._pending if not item.future.done())

    async def _run(self, group: list[_Pending]) -> None:
        model = group[0].model
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, _forward, model, [item.tensor for item in group]
            )
        except Exception as exc:  # a real server fault (out of memory, a broken model): fail this batch only
            log.exception("forward pass of %d photos failed", len(group))
            for item in group:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(group), time.perf_counter() - started)
        for item, output in zip(group, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)


def _forward(model: BatchModel, tensors: list[torch.Tensor]) -> list[Any]:
    return model.predict(torch.stack(tensors))


def _by_model(batch: list[_Pending]) -> list[list[_Pending]]:
    """Split a batch by model, keeping arrival order (normally there is one group)."""
    groups: dict[int, list[_Pending]] = {}
    for item in batch:
        groups.setdefault(id(item.model), []).append(item)
    return list(groups.values())
