"""``defectscope serve``: the inspection station - an HTTP API, the results store and a dashboard, one process.

Torch-free (onnxruntime through :class:`defectscope.runtime.predictor.Predictor`). The pieces:

* ``POST /v1/predict``: one or several images (multipart field ``file``, repeatable, or a raw image body),
  optional ``station``/``lot``/``part_id``. Each image is decoded in a worker thread, then waits in a bounded
  queue for the inference thread, which gathers up to ``max_batch`` images (or what arrived within
  ``batch_wait_ms``) into one ONNX Runtime call. The upload is filed content-addressed under
  ``DATA/images`` and its row committed to the store *before* the answer leaves: an acknowledged request
  is never lost, even to ``kill -9``. A full queue answers 503 with ``Retry-After``.
* ``GET /v1/results``, ``/v1/decisions/{id}``, the review queue and ``POST /v1/reviews``: the review loop.
* ``GET /v1/dashboard``: every statistic the page at ``/`` draws (:mod:`defectscope.station.spc`).
* ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), ``/openapi.json`` and ``/docs``.
* Hot reload: a new file at the model path is loaded and checked on a zero image before it replaces the
  running model; a file that fails keeps the old model. Every row names the model that decided it.
* A model trained with metadata inputs (``lib``, ``type``...) needs their values with every request: as form
  fields (or query parameters for a raw body) named after the inputs, or one ``metadata`` field holding a JSON
  object; they apply to every image of the request. A missing or unknown value is a 422 naming the field.

Security: API keys (``DEFECTSCOPE_API_KEYS``, comma-separated, or a key file) guard every write; binding
beyond loopback without keys is refused; uploads are capped in bytes and pixels; a client's file name is
only ever a label, never a path.

Layout: this module builds the app; :mod:`.services` holds what the routes share (reached through FastAPI
``Depends``), one router per group of routes lives in :mod:`.routes`, and the parts they use are named by
their job: ``config``, ``auth``, ``model_holder``, ``batching``, ``limits``, ``metrics``, ``uploads``,
``records``, ``rows``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from defectscope.station.serve.config import ServeConfig, is_loopback, load_api_keys
from defectscope.station.serve.limits import BodyLimit, BodyTooLarge, body_too_large
from defectscope.station.serve.metrics import observe_requests
from defectscope.station.serve.routes import ROUTERS
from defectscope.station.serve.routes.dashboard import STATIC
from defectscope.station.serve.services import Services

__all__ = ["ServeConfig", "create_app", "load_api_keys", "serve"]


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
                  description="Classify inspection images, record every decision, review the doubtful ones.")
    app.state.services = services
    app.state.config = config
    app.state.metrics = services.metrics
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # A middleware added later wraps those added before: the metrics middleware sees every answer, the body
    # limit inside it (which never reads the body) refuses an oversized one before anything buffers it.
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    app.add_exception_handler(BodyTooLarge, body_too_large(services.metrics))
    app.middleware("http")(observe_requests(services.metrics))
    for router in ROUTERS:
        app.include_router(router)
    return app


def _version() -> str:
    from defectscope._version import __version__

    return __version__


def serve(config: ServeConfig, *, log_level: str = "info") -> None:
    """Run the station until SIGINT/SIGTERM. Refuses to listen beyond loopback without API keys."""
    import uvicorn

    if not is_loopback(config.host) and not config.api_keys:
        raise ValueError(f"refusing to listen on {config.host} without API keys: set DEFECTSCOPE_API_KEYS or "
                         "--key-file, or bind 127.0.0.1 behind a reverse proxy")
    if not config.model.is_file():
        raise FileNotFoundError(f"{config.model}: no such model file")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level, proxy_headers=True,
                timeout_keep_alive=5, limit_max_requests=None)
