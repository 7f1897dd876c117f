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
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from defectscope import labels
from defectscope.station import spc
from defectscope.station.serve.batching import Batcher, GroupCommit, QueueFull
from defectscope.station.serve.config import ServeConfig, is_loopback, load_api_keys
from defectscope.station.serve.limits import BodyLimit, BodyTooLarge
from defectscope.station.serve.metrics import Metrics
from defectscope.station.serve.model_holder import LoadedModel, ModelHolder
from defectscope.station.serve.records import build_records
from defectscope.station.serve.rows import MAX_ID, DecisionId, image_response, public_row, utc_iso
from defectscope.station.serve.uploads import (
    META_FIELDS,
    META_RE,
    check_meta,
    decode_all,
    file_uploads,
    metadata_values,
    safe_name,
)
from defectscope.station.store import Store

__all__ = ["ServeConfig", "create_app", "load_api_keys", "serve"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parents[1] / "static"
REVIEW, DRIFT = labels.REVIEW, labels.DRIFT
_RAW_TYPES = ("image/", "application/octet-stream")


# ------------------------------------------------------------------------------------------------ app

class ReviewIn(BaseModel):
    decision_id: int = Field(ge=1, le=MAX_ID)
    label: str = Field(min_length=1, max_length=64)
    reviewer: str | None = Field(default=None, max_length=64)
    comment: str | None = Field(default=None, max_length=1000)


def create_app(config: ServeConfig) -> FastAPI:
    """The station's ASGI app (open the store, load the model and start the threads on startup)."""
    state: dict[str, Any] = {}
    keys = config.api_keys

    def review_depth() -> int:
        return state.get("review_depth", 0)

    def on_reload(result: str) -> None:
        metrics.reloads.labels(result).inc()

    def on_batch(n: int, seconds: float) -> None:
        metrics.batch.observe(n)
        metrics.infer.observe(seconds)

    metrics = Metrics(lambda: state["batcher"].depth if "batcher" in state else 0, review_depth)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(config.db)
        models = ModelHolder(config.model, config.threads, config.max_pixels, config.reload_poll_seconds, on_reload,
                             runtime={"runtime": config.runtime, "precision": config.precision,
                                      "device": config.device})
        batcher = Batcher(models, config.max_batch, config.batch_wait_ms, config.max_queue, on_batch)
        writer = GroupCommit(store)
        state.update(store=store, models=models, batcher=batcher, writer=writer,
                     review_depth=store.review_queue(limit=0)[1])
        (config.data / "images").mkdir(parents=True, exist_ok=True)
        batcher.start()
        writer.start()
        models.start()
        log.info("station ready: model %s, store %r, data %s", models.current.model_id, store, config.data)
        try:
            yield
        finally:
            models.stop()
            batcher.stop()
            writer.stop()
            store.close()

    app = FastAPI(title="defectscope inspection station", version=_version(), lifespan=lifespan,
                  description="Classify inspection images, record every decision, review the doubtful ones.")
    app.state.config = config
    app.state.metrics = metrics
    app.state.shared = state
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Outermost of our middlewares: an oversized body is refused before anything buffers it.
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        metrics.rejected.labels("too_large").inc()
        return JSONResponse({"detail": "request body too large"}, status_code=413)

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable) -> Response:
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except BodyTooLarge:
            response = JSONResponse({"detail": "request body too large"}, status_code=413)
        route = request.scope.get("route")
        name = getattr(route, "path", "other")
        metrics.requests.labels(name, request.method, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    def require_key(request: Request) -> str | None:
        """The caller's key id when keys are configured (401 without a valid key); None otherwise."""
        if not keys:
            return None
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        # Compare with every key in constant time: no early exit tells which prefix matched.
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(given.encode(), key.encode())
        if not given or not ok:
            metrics.rejected.labels("unauthorized").inc()
            raise HTTPException(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                                headers={"WWW-Authenticate": "Bearer"})
        return "key:" + hashlib.sha256(given.encode()).hexdigest()[:8]

    # ---- pages and probes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse((STATIC / "dashboard.html").read_text(encoding="utf-8"))

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> JSONResponse:
        """A model is loaded and the store answers."""
        models: ModelHolder = state["models"]
        try:
            await run_in_threadpool(state["store"].counts)
            db = "ok"
        except Exception as exc:
            db = f"error: {exc}"
        ready = db == "ok"
        return JSONResponse({"ready": ready, "database": db, "model": models.current.info(),
                             "last_reload_error": models.last_error}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- predict
    @app.post("/v1/predict", tags=["inspection"], status_code=200, openapi_extra={"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "station": {"type": "string"}, "lot": {"type": "string"}, "part_id": {"type": "string"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def predict(request: Request, station: str | None = Query(None, max_length=128),
                      lot: str | None = Query(None, max_length=128), part_id: str | None = Query(None, max_length=128),
                      name: str | None = Query(None, max_length=256, description="file name of a raw-body image"),
                      ) -> dict[str, Any]:
        """Classify one image or several; each decision is stored before the answer is sent."""
        key_id = require_key(request)
        started = time.perf_counter()
        meta = {"station": station, "lot": lot, "part_id": part_id}
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        uploads: list[tuple[str, bytes]] = []
        predictor = state["models"].current.predictor
        fields = predictor.metadata_fields
        given: dict[str, Any] = dict(request.query_params)
        if ctype == "multipart/form-data":
            form = await request.form(max_files=config.max_files, max_fields=16 + len(fields),
                                      max_part_size=64 << 10)
            for k in META_FIELDS:
                value = form.get(k)
                if isinstance(value, str) and value:
                    meta[k] = value
            given.update({k: v for k, v in form.multi_items() if isinstance(v, str)})
            for item in form.getlist("file"):
                if isinstance(item, str):
                    raise HTTPException(422, "field 'file' must be a file upload, not text")
                data = await item.read(config.max_upload_bytes + 1)
                uploads.append((safe_name(item.filename), data))
            await form.close()
            if not uploads:
                raise HTTPException(422, "no image: send one or more files in the multipart field 'file'")
        elif ctype.startswith(_RAW_TYPES):
            uploads.append((safe_name(name or request.headers.get("x-file-name")), await request.body()))
        else:
            metrics.rejected.labels("content_type").inc()
            raise HTTPException(415, f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data "
                                     "with field 'file', or a raw image body (image/* or application/octet-stream)")
        meta = {k: check_meta(k, v) for k, v in meta.items()}
        model_metadata = metadata_values(predictor, given) if fields else None
        for fname, data in uploads:
            if not data:
                raise HTTPException(422, f"{fname}: empty file (0 bytes)")
            if len(data) > config.max_upload_bytes:
                raise HTTPException(413, f"{fname}: over the {config.max_upload_bytes} byte limit per image")

        batcher: Batcher = state["batcher"]
        try:
            batcher.reserve(len(uploads))
        except QueueFull:
            metrics.rejected.labels("queue_full").inc()
            raise HTTPException(503, "busy: the request queue is full, retry shortly",
                                headers={"Retry-After": "1"}) from None
        futures: list[Future] = []
        try:
            predictor = state["models"].current.predictor
            decoded = await run_in_threadpool(decode_all, predictor, uploads)
            for (_, data), (x, ms) in zip(uploads, decoded, strict=True):
                futures.append(batcher.submit(data, x, ms, model_metadata))
            # Only decodable images are filed (junk never reaches the disk), and filing (an fsync) runs
            # while the batch is in inference.
            filing = asyncio.ensure_future(run_in_threadpool(file_uploads, config.data / "images", uploads))
            try:
                results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            finally:
                paths = await filing
            request_id = uuid.uuid4().hex
            args = (config, uploads, paths, results, request_id, meta, started)
            # Building rows is cheap unless a heatmap has to be written: only then a worker thread.
            heatmaps = any(getattr(pred, "heatmap", None) is not None for pred, _ in results)
            records = await run_in_threadpool(build_records, *args) if heatmaps else build_records(*args)
            ids = await asyncio.wrap_future(state["writer"].submit(records))
        finally:
            batcher.release(len(uploads), len(uploads) - len(futures))
        out = []
        for rid, rec, (pred, model) in zip(ids, records, results, strict=True):
            metrics.decisions.labels(pred.decision).inc()
            metrics.images.inc()
            metrics.recent.append(pred.decision == DRIFT)
            state["review_depth"] += bool(rec["needs_review"])
            out.append({"id": rid, "file_name": rec["file_name"], "sha256": rec["content_sha256"],
                        "class": pred.top_class, "confidence": pred.confidence, "probabilities": pred.probabilities,
                        "decision": pred.decision, "drift_score": pred.drift_score,
                        "model": {"id": model.model_id, "version": model.model_version},
                        "timing": {**pred.timing, "total_ms": rec["total_ms"]},
                        "needs_review": rec["needs_review"], **{k: rec[k] for k in META_FIELDS}})
        return {"request_id": request_id, "results": out, **({"key": key_id} if key_id else {})}

    # ---- results and review
    @app.get("/v1/results", tags=["results"])
    async def results(since: datetime | None = None, until: datetime | None = None,
                      decision: str | None = Query(None, max_length=64), model: str | None = Query(None, max_length=64),
                      station: str | None = Query(None, max_length=128), source: str | None = Query(None, max_length=8),
                      limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=10**9)) -> dict[str, Any]:
        """Stored decisions, newest first, filtered by time (ISO 8601; naive means UTC), decision, model id,
        station and source (sort or api)."""
        for name, value in (("decision", decision), ("model", model), ("station", station), ("source", source)):
            if value is not None and "\x00" in value:
                raise HTTPException(422, f"{name}: NUL characters are not allowed")
        rows, total = await run_in_threadpool(lambda: state["store"].query(
            since=utc_iso(since), until=utc_iso(until), decision=decision, model=model, station=station,
            source=source, limit=limit, offset=offset))
        return {"total": total, "limit": limit, "offset": offset, "items": [public_row(r) for r in rows]}

    def _row(decision_id: DecisionId) -> dict[str, Any]:
        row = state["store"].get(decision_id)
        if row is None:
            raise HTTPException(404, f"no decision {decision_id}")
        return row

    @app.get("/v1/decisions/{decision_id}", tags=["results"])
    async def decision(decision_id: DecisionId) -> dict[str, Any]:
        """One decision with every review of it."""
        row = await run_in_threadpool(_row, decision_id)
        return {**public_row(row), "reviews": await run_in_threadpool(state["store"].reviews, decision_id)}

    @app.get("/v1/decisions/{decision_id}/image", tags=["results"], response_class=FileResponse)
    async def decision_image(decision_id: DecisionId) -> FileResponse:
        """The image the decision was made on (the service's copy, or the sorter's filed file)."""
        row = await run_in_threadpool(_row, decision_id)
        return image_response(row.get("image_path") or row.get("destination"))

    @app.get("/v1/decisions/{decision_id}/heatmap", tags=["results"], response_class=FileResponse)
    async def decision_heatmap(decision_id: DecisionId) -> FileResponse:
        row = await run_in_threadpool(_row, decision_id)
        return image_response(row.get("heatmap_path"))

    @app.post("/v1/decisions/{decision_id}/review-request", tags=["review"])
    async def request_review(decision_id: DecisionId, request: Request) -> dict[str, Any]:
        """Put any decision in the review queue (a person picked it)."""
        require_key(request)
        if not await run_in_threadpool(state["store"].flag, decision_id):
            raise HTTPException(404, f"no decision {decision_id}")
        state["review_depth"] = (await run_in_threadpool(state["store"].review_queue, 0))[1]
        return {"id": decision_id, "needs_review": True}

    @app.get("/v1/review/queue", tags=["review"])
    async def review_queue(limit: int = Query(20, ge=0, le=500)) -> dict[str, Any]:
        """Decisions waiting for a person, oldest first, and the labels a person may give."""
        rows, total = await run_in_threadpool(state["store"].review_queue, limit)
        state["review_depth"] = total
        return {"total": total, "labels": _labels(), "items": [public_row(r) for r in rows]}

    def _labels() -> list[str]:
        return [*state["models"].current.predictor.classes, DRIFT]

    @app.post("/v1/reviews", tags=["review"], status_code=201)
    async def add_review(body: ReviewIn, request: Request) -> dict[str, Any]:
        """A person's label for a decision (confirm: the model's class; relabel: another class; Drift)."""
        key_id = require_key(request)
        if body.label not in _labels():
            raise HTTPException(422, f"label {body.label!r} is not one of {_labels()}")
        reviewer = (body.reviewer or "").strip() or key_id or "anonymous"
        if not META_RE.match(reviewer):
            raise HTTPException(422, "reviewer: printable characters only")
        if body.comment and "\x00" in body.comment:
            raise HTTPException(422, "comment: NUL characters are not allowed")
        try:
            rid = await run_in_threadpool(state["store"].add_review, body.decision_id, body.label, reviewer,
                                          body.comment)
        except KeyError:
            raise HTTPException(404, f"no decision {body.decision_id}") from None
        state["review_depth"] = max(0, state["review_depth"] - 1)
        return {"id": rid, "decision_id": body.decision_id, "label": body.label, "reviewer": reviewer}

    @app.get("/v1/dashboard", tags=["results"])
    async def dashboard(hours: float = Query(24, gt=0, le=24 * 31), bucket_minutes: int = Query(60, ge=1, le=1440),
                        station: str | None = Query(None, max_length=128)) -> dict[str, Any]:
        """Everything the dashboard draws: decisions per bucket, p-chart with Western Electric rules, the
        Drift-rate alarm, confidence and latency quantiles, the review queue depth and pilot statistics."""
        return await run_in_threadpool(_dashboard, hours, bucket_minutes, station)

    def _dashboard(hours: float, bucket_minutes: int, station: str | None) -> dict[str, Any]:
        model: LoadedModel = state["models"].current
        until = datetime.now(timezone.utc)
        step = timedelta(minutes=bucket_minutes)
        # Buckets aligned to whole steps since midnight, so a refresh does not shift every bucket.
        midnight = until.replace(hour=0, minute=0, second=0, microsecond=0)
        end = midnight + step * (int((until - midnight) / step) + 1)
        since = end - step * max(1, round(timedelta(hours=hours) / step))
        store: Store = state["store"]
        start = utc_iso(since)
        # Counted in the database; only a bounded sample comes back for the quantiles.
        out = spc.dashboard(store.minute_counts(start, station), store.sample(start, station=station),
                            store.recent_decisions(500, station), classes=model.predictor.classes,
                            good_class=model.good_class, since=since, until=end, bucket_minutes=bucket_minutes,
                            drift_rate=model.drift_rate)
        reviewed = state["store"].reviewed(utc_iso(since))
        out["pilot"] = spc.pilot_stats(reviewed, model.good_class, config.escape_cap)
        out["pilot"]["enabled"] = config.pilot
        _, out["review_queue"] = state["store"].review_queue(0)
        out["model"] = model.info()
        out["queue_depth"] = state["batcher"].depth
        out["auth_required"] = bool(keys)
        return out

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
