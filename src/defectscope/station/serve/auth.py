"""API keys, checked on the headers before anything reads the request's body.

With keys configured, every endpoint but ``/healthz`` and ``/readyz`` needs one, as ``Authorization: Bearer
KEY`` or ``X-API-Key: KEY``. A full key (``DEFECTSCOPE_API_KEYS``) may do anything; a read-only key
(``DEFECTSCOPE_READ_KEYS``) may read (GET/HEAD: results, images, heatmaps, the queue, the dashboard, metrics) and
is answered 403 on a write. ``open_reads`` lets reads through without a key (an explicit choice for a station
whose network is trusted); writes still need a full key. The dashboard's page and its script (``/`` and
``/static/``) hold no data and stay open, so that a browser can load the page and then send a key.

Without keys everything is open, which :func:`defectscope.station.serve.serve` allows on loopback only.

The comparison is strict: the header value must be exactly the key (``Bearer`` and one space before it), compared
byte for byte with every key in constant time. A key with a non-breaking space, a second space after ``Bearer``
or any other extra character is refused, not trimmed into a match (HTTP itself drops the spaces and tabs around a
whole header value before the application sees it).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request

from defectscope.station.serve.config import ServeConfig
from defectscope.station.serve.limits import send_json

if TYPE_CHECKING:
    from defectscope.station.serve.metrics import Metrics

__all__ = ["OPEN_PATHS", "KeyGuard", "caller_key"]

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_READS = frozenset({"GET", "HEAD"})


def _page(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


class KeyGuard:
    """Pure ASGI middleware: 401 without a valid key, 403 for a read-only key on a write; else the caller's key
    id (``key:`` and 8 hex of its SHA-256, or None) goes into ``request.state.key_id``."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.metrics, self.open_reads = app, metrics, config.open_reads
        self.keys = [(k.encode(), "full") for k in sorted(config.api_keys)] + \
                    [(k.encode(), "read") for k in sorted(config.read_keys)]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["key_id"] = None
        if not self.keys:
            return await self.app(scope, receive, send)
        given, kind = self._match(scope["headers"])
        path, read = scope["path"], scope["method"] in _READS
        if kind is not None:
            state["key_id"] = "key:" + hashlib.sha256(given).hexdigest()[:8]
        if path in OPEN_PATHS or (read and (_page(path) or self.open_reads)):
            return await self.app(scope, receive, send)
        if kind is None:
            self.metrics.rejected.labels("unauthorized").inc()
            return await send_json(send, 401, "a valid API key is required (Authorization: Bearer KEY or "
                                              "X-API-Key: KEY)", [(b"www-authenticate", b"Bearer")])
        if kind == "read" and not read:
            self.metrics.rejected.labels("forbidden").inc()
            return await send_json(send, 403, "this API key is read-only: predicting and reviewing need a full "
                                              "key (DEFECTSCOPE_API_KEYS)")
        return await self.app(scope, receive, send)

    def _match(self, headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, str | None]:
        """The key the request carries and its kind (None when it matches no key)."""
        auth = [v for k, v in headers if k == b"authorization"]
        xkey = [v for k, v in headers if k == b"x-api-key"]
        if len(auth) + len(xkey) != 1:
            return None, None  # none, or several: ambiguous, refused
        if auth:
            scheme, sep, given = auth[0].partition(b" ")
            if scheme.lower() != b"bearer" or not sep:
                return None, None
        else:
            given = xkey[0]
        kind = None
        # Compare with every key: no early exit tells which key (or which prefix) matched.
        for key, key_kind in self.keys:
            if hmac.compare_digest(given, key):
                kind = key_kind
        return given, kind


def caller_key(request: Request) -> str | None:
    """The key id :class:`KeyGuard` found on this request (None without keys)."""
    return getattr(request.state, "key_id", None)
