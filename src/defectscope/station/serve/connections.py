"""The station's HTTP server settings: uvicorn with a cap on open connections, a deadline for headers and a bound
on a request head, on httptools (llhttp, C) when it is installed, else on h11 (pure Python).

uvicorn alone never closes a connection that has not sent a complete request (a fresh idle socket, or headers
trickling in a byte at a time), and accepts connections until the process runs out of file descriptors. The
protocols here add both bounds: a connection beyond ``max_connections`` is answered 503 and closed at once, and a
connection that has not sent a whole request head within ``header_timeout`` seconds of connecting (or of its
previous answer) is closed. The body has its own deadline (:class:`defectscope.station.serve.limits.RequestLimits`)
and an idle keep-alive connection closes after ``keep_alive`` seconds (uvicorn's ``timeout_keep_alive``).
A request head is bounded to :data:`MAX_HEAD_BYTES`: h11 bounds what it buffers of a head not yet whole (answering
400); httptools buffers a header of any length, so here the bytes of a head are counted as they arrive and a head
longer than the bound, whole or not, is answered 431.

Why httptools when it can: h11 parses in Python on the event loop's thread, the thread that also answers every
request, so its cost is paid in latency as well as in CPU on a 2-core station (bench/results/serve_protocol.json).
The event loop is uvloop when installed (``loop``), for the same reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from typing import Any

from defectscope.station.serve.config import HTTP_CHOICES, LOOP_CHOICES, ServeConfig

__all__ = ["HTTP_CHOICES", "LOOP_CHOICES", "MAX_HEAD_BYTES", "guarded_protocol", "http_implementation",
           "loop_implementation", "uvicorn_config"]

MAX_HEAD_BYTES = 16 << 10
_BUSY_BODY = b'{"detail": "busy: too many open connections, retry shortly"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)
_HEAD_BODY = b'{"detail": "request head too large: over %d bytes of request line and headers"}' % MAX_HEAD_BYTES
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                  b"connection: close\r\ncontent-length: " + str(len(_HEAD_BODY)).encode() + b"\r\n\r\n" + _HEAD_BODY)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def http_implementation(choice: str = "auto") -> str:
    """The HTTP parser the station runs: ``httptools`` or ``h11`` (``auto``: httptools when installed)."""
    if choice not in HTTP_CHOICES:
        raise ValueError(f"http must be one of {', '.join(HTTP_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "httptools" if _installed("httptools") else "h11"
    if choice == "httptools" and not _installed("httptools"):
        raise ValueError("http 'httptools' asked for but httptools is not installed: pip install httptools, or "
                         "use 'auto' (falls back to h11)")
    return choice


def loop_implementation(choice: str = "auto") -> str:
    """The event loop the station runs: ``uvloop`` or ``asyncio`` (``auto``: uvloop when installed)."""
    if choice not in LOOP_CHOICES:
        raise ValueError(f"loop must be one of {', '.join(LOOP_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "uvloop" if _installed("uvloop") else "asyncio"
    if choice == "uvloop" and not _installed("uvloop"):
        raise ValueError("loop 'uvloop' asked for but uvloop is not installed: pip install uvloop, or use 'auto'")
    return choice


def guarded_protocol(max_connections: int, header_timeout: float,
                     on_refused: Callable[[], None] = lambda: None, http: str = "auto") -> type[asyncio.Protocol]:
    """A uvicorn protocol class (httptools or h11, see :func:`http_implementation`) with the connection cap, the
    header deadline and the head bound."""
    if http_implementation(http) == "httptools":
        return _guarded_httptools(max_connections, header_timeout, on_refused)
    return _guarded_h11(max_connections, header_timeout, on_refused)


def _guard(max_connections: int, header_timeout: float, on_refused: Callable[[], None]) -> type:
    """What both parsers' protocols share: the connection cap (503 and close) and the header deadline's timer.
    A protocol says when a head is overdue (:meth:`_head_overdue`) and when to start the deadline."""

    class Guard:
        _refused = False
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
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

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if self._head_overdue() and not self.transport.is_closing():
                self.transport.close()

        def _head_overdue(self) -> bool:
            return True

    return Guard


def _guarded_h11(max_connections: int, header_timeout: float,
                 on_refused: Callable[[], None]) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(_guard(max_connections, header_timeout, on_refused), H11Protocol):
        _armed_for: Any = None

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
            self._armed_for = self.cycle
            super()._arm()

        def _head_overdue(self) -> bool:
            return self.cycle is self._armed_for

    return GuardedH11Protocol


def _guarded_httptools(max_connections: int, header_timeout: float,
                       on_refused: Callable[[], None]) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(_guard(max_connections, header_timeout, on_refused), HttpToolsProtocol):
        """The parser's own callbacks say where a head ends: ``on_headers_complete`` stops the deadline and
        the byte count, ``on_message_complete`` starts the count of the next head, an answer (with no parsed
        request waiting behind it) starts the next deadline."""

        _head = 0  # bytes of the request head being received; -1 while a request's body or answer is under way

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            while data:
                if self.transport.is_closing():  # refused (a bad request, a head too large): read no more
                    return
                if self._head < 0:  # body bytes: the body limits apply
                    super().data_received(data)
                    return
                # Fed no further than the bound: llhttp buffers a header of any length until its end.
                room = MAX_HEAD_BYTES - self._head
                part, data = data[:room], data[room:]
                self._head += len(part)
                super().data_received(part)
                if self._head >= MAX_HEAD_BYTES and not self.transport.is_closing():
                    self.transport.write(HEAD_TOO_LARGE)
                    self.transport.close()
                    return

        def on_headers_complete(self) -> None:
            self._head = -1
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._head = 0
            super().on_message_complete()

        def on_response_complete(self) -> None:
            if not self.pipeline:  # else the next request's head is in already
                self._arm()
            super().on_response_complete()

    return GuardedHttpToolsProtocol


def uvicorn_config(app: Any, config: ServeConfig, log_level: str = "info") -> Any:
    """The ``uvicorn.Config`` the station runs with (the tests run exactly this)."""
    import uvicorn

    metrics = getattr(app.state, "metrics", None)
    refused = (lambda: metrics.rejected.labels("connections").inc()) if metrics is not None else (lambda: None)
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, lifespan="on",
                          proxy_headers=True, ws="none", limit_max_requests=None,
                          loop=loop_implementation(config.loop),
                          http=guarded_protocol(config.max_connections, config.header_timeout, refused, config.http),
                          timeout_keep_alive=config.keep_alive, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
