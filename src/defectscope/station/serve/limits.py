"""Refusals that protect the station: a body over its route's limit (413), a body that does not arrive in time
(408), a NUL in the query string (422) and a full inference queue (503).

Every route has a body limit: ``/v1/predict`` the request limit (its images are streamed to the form parser,
never held whole), every other route a small one (a review is a few hundred bytes), read here in full before the
route sees it, so that no parser downstream can turn an oversized body into a 400 or buffer it. A refused body is
read and thrown away first (up to :data:`DRAIN_BYTES` and :data:`DRAIN_SECONDS`), so that the client reads the
413 instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from defectscope.station.serve.batching import Batcher, QueueFull

if TYPE_CHECKING:  # metrics imports from here
    from defectscope.station.serve.config import ServeConfig
    from defectscope.station.serve.metrics import Metrics

__all__ = ["DRAIN_BYTES", "DRAIN_SECONDS", "STREAMED", "BodyTimeout", "BodyTooLarge", "RequestLimits",
           "body_refused", "reserve", "send_json"]

STREAMED = frozenset({"/v1/predict"})  # routes that read their own (large) body as a stream
DRAIN_BYTES = 256 << 20
DRAIN_SECONDS = 5.0
_CLOSE = [(b"connection", b"close")]


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body too large: over the {limit} byte limit of this route")


class BodyTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"request body not received within {seconds:g} s; send it faster or in a smaller request")


async def send_json(send: Callable, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
                    ) -> None:
    """Answer ``{"detail": ...}`` straight from ASGI (ASCII JSON: it always encodes)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """Pure ASGI middleware applying the body limits and the body timeout of every route."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.streamed_limit, self.limit, self.timeout = config.max_request_bytes, config.max_body_bytes, \
            config.body_timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        query = scope.get("query_string") or b""
        if b"%00" in query or b"\x00" in query:
            self.metrics.rejected.labels("nul").inc()
            return await send_json(send, 422, "query string: NUL characters (%00) are not allowed")
        streamed = scope["path"] in STREAMED
        limit = self.streamed_limit if streamed else self.limit
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.metrics.rejected.labels("too_large").inc()
            await _drain(receive)
            return await send_json(send, 413, str(BodyTooLarge(limit)), _CLOSE)
        deadline = asyncio.get_running_loop().time() + self.timeout
        if streamed:
            return await self.app(scope, self._streaming(receive, limit, deadline), send)
        try:
            body = await self._read(receive, limit, deadline)
        except BodyTooLarge as exc:
            self.metrics.rejected.labels("too_large").inc()
            return await send_json(send, 413, str(exc), _CLOSE)
        except BodyTimeout as exc:
            self.metrics.rejected.labels("slow_body").inc()
            return await send_json(send, 408, str(exc), _CLOSE)
        if body is None:
            return None  # the client left
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Callable, limit: int, deadline: float) -> bytes | None:
        chunks, seen = [], 0
        while True:
            message = await _receive_by(receive, deadline, self.timeout)
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await _drain(receive)
                raise BodyTooLarge(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _streaming(self, receive: Callable, limit: int, deadline: float) -> Callable[[], Awaitable[dict]]:
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await _receive_by(receive, deadline, self.timeout)
            seen += len(message.get("body", b""))
            if seen > limit:
                if message.get("more_body"):
                    await _drain(receive)
                raise BodyTooLarge(limit)
            return message

        return limited


async def _receive_by(receive: Callable, deadline: float, timeout: float) -> dict:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(receive(), max(remaining, 0.001))
    except asyncio.TimeoutError:
        raise BodyTimeout(timeout) from None


async def _drain(receive: Callable) -> None:
    """Read and drop what is left of a refused body, within bounds of bytes and time."""
    loop = asyncio.get_running_loop()
    deadline, seen = loop.time() + DRAIN_SECONDS, 0
    while seen < DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            return
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def body_refused(metrics: Metrics) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """The exception handler answering a streamed body that outgrew its limit (413) or its time (408)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        too_large = isinstance(exc, BodyTooLarge)
        metrics.rejected.labels("too_large" if too_large else "slow_body").inc()
        return JSONResponse({"detail": str(exc)}, status_code=413 if too_large else 408,
                            headers={"Connection": "close"})

    return handler


def reserve(batcher: Batcher, n: int, metrics: Metrics) -> None:
    """Hold ``n`` places in the inference queue, else a 503 with ``Retry-After``."""
    try:
        batcher.reserve(n)
    except QueueFull:
        metrics.rejected.labels("queue_full").inc()
        raise HTTPException(503, "busy: the request queue is full, retry shortly",
                            headers={"Retry-After": "1"}) from None
