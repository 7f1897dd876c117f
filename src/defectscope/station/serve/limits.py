"""Refusals that protect the station: a request body over the limit (413) and a full inference queue (503)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from defectscope.station.serve.batching import Batcher, QueueFull

if TYPE_CHECKING:  # metrics imports BodyTooLarge from here
    from defectscope.station.serve.metrics import Metrics

__all__ = ["BodyLimit", "BodyTooLarge", "body_too_large", "reserve"]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Pure ASGI middleware: refuse a request body over ``limit`` bytes, announced or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse({"detail": f"request body too large (over {self.limit} bytes)"},
                                    status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


def body_too_large(metrics: Metrics) -> Callable[[Request, BodyTooLarge], Awaitable[JSONResponse]]:
    """The exception handler answering a body that outgrew the limit while a route read it."""

    async def handler(request: Request, exc: BodyTooLarge) -> JSONResponse:
        metrics.rejected.labels("too_large").inc()
        return JSONResponse({"detail": "request body too large"}, status_code=413)

    return handler


def reserve(batcher: Batcher, n: int, metrics: Metrics) -> None:
    """Hold ``n`` places in the inference queue, else a 503 with ``Retry-After``."""
    try:
        batcher.reserve(n)
    except QueueFull:
        metrics.rejected.labels("queue_full").inc()
        raise HTTPException(503, "busy: the request queue is full, retry shortly",
                            headers={"Retry-After": "1"}) from None
