"""Plain ASGI middleware of the prediction server: they see every response, 404s and 413s included.

Outermost first: RequestMetrics, WorkLimit (requests in progress), Deadline (time from request to
answer), BodyLimit (body size); then the routes.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse

from .handling import error
from .metrics import ServingMetrics


class RequestMetrics:
    """Counts requests by route template and status, and times them."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(route, status[0], time.perf_counter() - started)


class BodyLimit:
    """Refuses bodies over `max_bytes` with 413, declared (Content-Length) or streamed.

    The body is read here and replayed to the app. An oversized body is still read to its end (up to
    a cap) before answering, so the client reads the 413 instead of a reset connection.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.drain_cap = 8 * max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.drain_cap:  # not worth reading: refuse and close
            response = self._too_large()
            response.headers["connection"] = "close"
            return await response(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes:
                while more and size <= self.drain_cap:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    size += len(message.get("body", b""))
                    more = message.get("more_body", False)
                response = self._too_large()
                if more:
                    response.headers["connection"] = "close"
                return await response(scope, receive, send)
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    def _too_large(self) -> JSONResponse:
        limit = self.max_bytes / 2**20
        return error(413, f"request body over the limit of {limit:g} MiB (--max-body-mb)")


class WorkLimit:
    """At most `max_requests` POST requests (the ones that do work) in progress at once; beyond, a
    JSON 503 at once, before the body is read. Health, metadata and metrics (GET) are never refused
    here, so probes still answer when the server is saturated. (uvicorn's own `limit_concurrency`,
    `--max-connections`, bounds connections behind this, with a plain-text 503.)"""

    def __init__(self, app, max_requests: int, metrics: ServingMetrics) -> None:
        self.app, self.max_requests = app, max_requests
        self.in_progress = 0
        metrics.requests_in_progress.set_function(lambda: self.in_progress)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        if self.in_progress >= self.max_requests:
            response = error(
                503,
                f"{self.in_progress} requests are already in progress; the server runs at most "
                f"{self.max_requests} at once (--max-concurrency): retry shortly",
            )
            response.headers["retry-after"] = "1"
            response.headers["connection"] = "close"  # the body was not read
            return await response(scope, receive, send)
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class Deadline:
    """Answers 504 when a request is not answered within `seconds`, body upload included (a client
    that trickles its body holds no slot forever).

    The request's task is cancelled: its decodes not yet started are dropped and its photos leave the
    batcher's queue; photos of other requests in the same forward pass are answered as usual.
    """

    def __init__(self, app, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_and_note(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            async with asyncio.timeout(self.seconds) as deadline:
                await self.app(scope, receive, send_and_note)
        except TimeoutError:
            if not deadline.expired():
                raise  # not ours
            if started:
                return  # too late to answer anything else: uvicorn closes the connection
            response = error(
                504,
                f"the request was not answered within the server's limit of {self.seconds:g} s "
                "(--request-timeout)",
            )
            response.headers["connection"] = "close"  # the body may not have been read to its end
            await response(scope, receive, send)
