"""``defectscope serve``: the inspection station - an HTTP API, the results store and a dashboard, one process.

Torch-free (onnxruntime through :class:`defectscope.runtime.predictor.Predictor`). The pieces:

* ``POST /v1/predict``: one or several images (multipart field ``file``, repeatable, or a raw image body),
  optional ``station``/``lot``/``part_id``. Each image is decoded in a worker thread, then waits in a bounded
  queue for an inference thread, which gathers up to ``max_batch`` images (or what arrived within
  ``batch_wait_ms``) into one runtime call; there are ``inference_streams`` of them, each with its own Predictor
  (two one-thread streams on a CPU with two or more threads: a request never waits for the other's batch). The
  upload is filed content-addressed under ``DATA/images`` and its row committed to the store *before* the answer
  leaves: an acknowledged request is never lost, even to ``kill -9``. The rows of the requests one batch answered
  are built and committed together on the store-writer thread (one transaction, one fsync), without a hop through
  the event loop in between. A full queue answers 503 with ``Retry-After``.
* ``GET /v1/results``, ``/v1/decisions/{id}``, the review queue and ``POST /v1/reviews``: the review loop.
* ``GET /v1/dashboard``: every statistic the page at ``/`` draws (:mod:`defectscope.station.spc`).
* ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and ``/openapi.json``. No ``/docs``: Swagger UI would be
  loaded from a CDN (broken offline, and script from elsewhere); any OpenAPI client reads ``/openapi.json``.
* Hot reload: a new file at the model path is loaded and checked on a zero image before it replaces the
  running model; a file that fails keeps the old model. Every row names the model that decided it.
* A model trained with metadata inputs (``lib``, ``type``...) needs their values with every request: as form
  fields (or query parameters for a raw body) named after the inputs, or one ``metadata`` field holding a JSON
  object; they apply to every image of the request. A missing or unknown value is a 422 naming the field.

Security (the README's section says what a reverse proxy must add): with API keys set, every endpoint but the
probes needs one, checked on the headers before any body is read (:mod:`.auth`; full and read-only keys, and an
explicit ``open_reads``); binding beyond loopback without keys is refused; every route has a body limit and a
body deadline (:mod:`.limits`), the server a connection cap, a header deadline and a head bound on httptools or
h11 (:mod:`.connections`); uploads
are capped in bytes and pixels; a client's file name is only ever a label, never a path; no error answer echoes
the input; every answer carries the security headers of :mod:`.headers`; every 5xx is counted in ``/metrics``.

Layout: this module builds the app; :mod:`.services` holds what the routes share (reached through FastAPI
``Depends``), one router per group of routes lives in :mod:`.routes`, and the parts they use are named by
their job: ``config``, ``auth``, ``model_holder``, ``batching``, ``limits``, ``metrics``, ``headers``,
``connections``, ``uploads``, ``records``, ``rows``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from defectscope.station.serve.auth import KeyGuard
from defectscope.station.serve.config import ServeConfig, is_loopback, load_api_keys
from defectscope.station.serve.connections import uvicorn_config
from defectscope.station.serve.headers import SecurityHeaders
from defectscope.station.serve.limits import BodyTimeout, BodyTooLarge, RequestLimits, body_refused
from defectscope.station.serve.metrics import ObserveRequests
from defectscope.station.serve.routes import ROUTERS
from defectscope.station.serve.routes.dashboard import STATIC
from defectscope.station.serve.services import Services

__all__ = ["ServeConfig", "create_app", "load_api_keys", "serve"]

log = logging.getLogger(__name__)


def create_app(config: ServeConfig) -> FastAPI:
    """The station's ASGI app (open the store, load the model and start the threads on startup)."""
    services = Services(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.open()
        try:
            yield
        finally:
            services.close()

    app = FastAPI(title="defectscope inspection station", version=_version(), lifespan=lifespan,
                  description="Classify inspection images, record every decision, review the doubtful ones.",
                  docs_url=None, redoc_url=None)
    app.state.services = services
    app.state.config = config
    app.state.metrics = services.metrics
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # A middleware added later wraps those added before. From the outside in: the security headers on every
    # answer, the metrics that see every answer (and turn an uncaught error into a counted 500), the key check
    # on the headers, then the body limits, which read or stream the body before any route parser does.
    app.add_middleware(RequestLimits, config=config, metrics=services.metrics)
    app.add_middleware(KeyGuard, config=config, metrics=services.metrics)
    app.add_middleware(ObserveRequests, metrics=services.metrics)
    app.add_middleware(SecurityHeaders)
    refused = body_refused(services.metrics)
    app.add_exception_handler(BodyTooLarge, refused)
    app.add_exception_handler(BodyTimeout, refused)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    for router in ROUTERS:
        app.include_router(router)
    return app


class _AsciiJSON(JSONResponse):
    """JSON that always encodes: a lone surrogate or NaN in an error can neither break the answer nor the
    connection."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, default=str).encode()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return _AsciiJSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """A 422 that says where and what, never echoing the input (which may be unencodable, or 100 MB)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [x if isinstance(x, int) else str(x)[:64] for x in e.get("loc", ())],
               "msg": str(e.get("msg", ""))[:300], "type": str(e.get("type", ""))} for e in exc.errors()[:20]]
    return _AsciiJSON({"detail": errors}, status_code=422)


def _version() -> str:
    from defectscope._version import __version__

    return __version__


def serve(config: ServeConfig, *, log_level: str = "info") -> None:
    """Run the station until SIGINT/SIGTERM. Refuses to listen beyond loopback without API keys."""
    import uvicorn

    if not is_loopback(config.host) and not config.api_keys:
        raise ValueError(f"refusing to listen on {config.host} without API keys: set DEFECTSCOPE_API_KEYS or "
                         "--key-file, or bind 127.0.0.1 behind a reverse proxy")
    if not is_loopback(config.host) and config.open_reads:
        log.warning("--open-reads on %s: results, images and the dashboard are readable without a key by anyone "
                    "who reaches this address", config.host)
    if not config.model.is_file():
        raise FileNotFoundError(f"{config.model}: no such model file")
    uvicorn.Server(uvicorn_config(create_app(config), config, log_level)).run()
