"""API keys. With keys configured every write (predicting, reviewing) needs one, as ``Authorization: Bearer
KEY`` or ``X-API-Key: KEY``; reads, the dashboard and the probes stay open. Without keys everything is open,
which :func:`defectscope.station.serve.serve` allows on loopback only."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException, Request

from defectscope.station.serve.services import Services

__all__ = ["require_key"]


def require_key(request: Request, services: Services) -> str | None:
    """The caller's key id when keys are configured (401 without a valid key); None otherwise.

    A write route calls it first thing in its body rather than declaring it a dependency: FastAPI runs
    dependencies before it reports invalid parameters, and a malformed request answers 422 whether or not it
    carries a key, as it always has.
    """
    keys = services.config.api_keys
    if not keys:
        return None
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    # Compare with every key in constant time: no early exit tells which prefix matched.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not given or not ok:
        services.metrics.rejected.labels("unauthorized").inc()
        raise HTTPException(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                            headers={"WWW-Authenticate": "Bearer"})
    return "key:" + hashlib.sha256(given.encode()).hexdigest()[:8]
