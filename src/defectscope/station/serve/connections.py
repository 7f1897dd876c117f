"""The station's HTTP server settings: uvicorn with h11, a cap on open connections and a deadline for headers.

uvicorn alone never closes a connection that has not sent a complete request (a fresh idle socket, or headers
trickling in a byte at a time), and accepts connections until the process runs out of file descriptors. The
protocol here adds both bounds: a connection beyond ``max_connections`` is answered 503 and closed at once, and a
connection that has not sent a whole request head within ``header_timeout`` seconds of connecting (or of its
previous answer) is closed. The body has its own deadline (:class:`defectscope.station.serve.limits.RequestLimits`)
and an idle keep-alive connection closes after ``keep_alive`` seconds (uvicorn's ``timeout_keep_alive``).
h11 bounds a request head to :data:`MAX_HEAD_BYTES`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from defectscope.station.serve.config import ServeConfig

__all__ = ["MAX_HEAD_BYTES", "guarded_protocol", "uvicorn_config"]

MAX_HEAD_BYTES = 16 << 10
_BUSY_BODY = b'{"detail": "busy: too many open connections, retry shortly"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


def guarded_protocol(max_connections: int, header_timeout: float,
                     on_refused: Callable[[], None] = lambda: None) -> type[asyncio.Protocol]:
    """An h11 protocol class for uvicorn with the connection cap and the header deadline."""

    class GuardedH11Protocol(H11Protocol):
        _refused = False
        _timer: asyncio.TimerHandle | None = None
        _armed_for: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                self._refused = True
                on_refused()
                transport.write(BUSY)
                transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self.cycle is not self._armed_for:
                self._disarm()  # a request head arrived whole

        def on_response_complete(self) -> None:
            self._arm()  # before a pipelined request may start its cycle
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._armed_for = self.cycle
            self._timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app: Any, config: ServeConfig, log_level: str = "info") -> Any:
    """The ``uvicorn.Config`` the station runs with (the tests run exactly this)."""
    import uvicorn

    metrics = getattr(app.state, "metrics", None)
    refused = (lambda: metrics.rejected.labels("connections").inc()) if metrics is not None else (lambda: None)
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, lifespan="on",
                          proxy_headers=True, ws="none", limit_max_requests=None,
                          http=guarded_protocol(config.max_connections, config.header_timeout, refused),
                          timeout_keep_alive=config.keep_alive, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
