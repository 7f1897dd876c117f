"""``POST /v1/predict``: classify the images of a request, file them and commit their rows, then answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from defectscope.runtime.predictor import Prediction, Predictor
from defectscope.station.serve.auth import caller_key
from defectscope.station.serve.batching import PendingRequest
from defectscope.station.serve.limits import reserve
from defectscope.station.serve.model_holder import LoadedModel
from defectscope.station.serve.records import build_records
from defectscope.station.serve.services import Services, ServicesDep
from defectscope.station.serve.uploads import (
    META_FIELDS,
    check_meta,
    decode_all,
    file_uploads,
    metadata_values,
    safe_name,
)

__all__ = ["router"]

router = APIRouter()

_RAW_TYPES = ("image/", "application/octet-stream")
_REQUEST_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "station": {"type": "string"}, "lot": {"type": "string"}, "part_id": {"type": "string"}}}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/v1/predict", tags=["inspection"], status_code=200, openapi_extra=_REQUEST_BODY)
async def predict(request: Request, services: ServicesDep, station: str | None = Query(None, max_length=128),
                  lot: str | None = Query(None, max_length=128), part_id: str | None = Query(None, max_length=128),
                  name: str | None = Query(None, max_length=256, description="file name of a raw-body image"),
                  ) -> dict[str, Any]:
    """Classify one image or several; each decision is stored before the answer is sent."""
    key_id = caller_key(request)  # the key was checked on the headers, before the body was read
    started = time.perf_counter()
    meta = {"station": station, "lot": lot, "part_id": part_id}
    predictor = services.models.current.predictor
    given: dict[str, Any] = dict(request.query_params)
    uploads = await _read_uploads(request, services, predictor, name, meta, given)
    meta = {k: check_meta(k, v) for k, v in meta.items()}
    model_metadata = metadata_values(predictor, given) if predictor.metadata_fields else None
    seen: set[tuple[str, bytes]] = set()
    for fname, data in uploads:
        if not data:
            raise HTTPException(422, f"{fname}: empty file (0 bytes)")
        if len(data) > services.config.max_upload_bytes:
            raise HTTPException(413, f"{fname}: over the {services.config.max_upload_bytes} byte limit per image")
        if (fname, data) in seen:
            raise HTTPException(422, f"{fname}: the same image twice in one request (same name once stripped of "
                                     "its folders, same bytes); send each image once")
        seen.add((fname, data))
    request_id = uuid.uuid4().hex
    records, results, ids = await _classify_and_store(services, uploads, model_metadata, request_id, meta, started)
    out = []
    for rid, rec, (pred, model) in zip(ids, records, results, strict=True):
        services.metrics.count_decision(pred.decision)
        services.review_depth += bool(rec["needs_review"])
        out.append({"id": rid, "file_name": rec["file_name"], "sha256": rec["content_sha256"],
                    "class": pred.top_class, "confidence": pred.confidence, "probabilities": pred.probabilities,
                    "decision": pred.decision, "drift_score": pred.drift_score,
                    "model": {"id": model.model_id, "version": model.model_version},
                    "timing": {**pred.timing, "total_ms": rec["total_ms"]},
                    "needs_review": rec["needs_review"], **{k: rec[k] for k in META_FIELDS}})
    return {"request_id": request_id, "results": out, **({"key": key_id} if key_id else {})}


async def _read_uploads(request: Request, services: Services, predictor: Predictor, name: str | None,
                        meta: dict[str, str | None], given: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The request's images as (label, bytes), from a multipart form or a raw body, else 415. A form's text
    fields go into ``given`` (the model's metadata inputs), its station/lot/part_id into ``meta``."""
    config = services.config
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: list[tuple[str, bytes]] = []
    if ctype == "multipart/form-data":
        form = await request.form(max_files=config.max_files, max_fields=16 + len(predictor.metadata_fields),
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
        services.metrics.rejected.labels("content_type").inc()
        raise HTTPException(415, f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data "
                                 "with field 'file', or a raw image body (image/* or application/octet-stream)")
    return uploads


async def _classify_and_store(services: Services, uploads: list[tuple[str, bytes]],
                              model_metadata: dict[str, str] | None, request_id: str, meta: dict[str, str | None],
                              started: float,
                              ) -> tuple[list[dict[str, Any]], list[tuple[Prediction, LoadedModel]], list[int]]:
    """Decode, infer in the shared batches, file the uploads and commit their rows: (rows, predictions, ids).
    The images hold their places in the queue until the rows are committed (:class:`PendingRequest`)."""
    config = services.config
    reserve(services.batcher, len(uploads), services.metrics)

    def build(paths: list[tuple[str, Path]], results: list[tuple[Prediction, LoadedModel]]) -> list[dict[str, Any]]:
        return build_records(config, uploads, paths, results, request_id, meta, started)

    pending = PendingRequest(len(uploads), services.batcher, services.writer, build)
    # One worker thread decodes, hands the images to the batcher, then files them (an fsync) while the batch
    # is in inference; from there the rows are built and committed off the event loop.
    await run_in_threadpool(_decode_submit_file, services, uploads, model_metadata, pending)
    return await asyncio.wrap_future(pending.done)


def _decode_submit_file(services: Services, uploads: list[tuple[str, bytes]], model_metadata: dict[str, str] | None,
                        pending: PendingRequest) -> None:
    try:
        decoded = decode_all(services.models.current.predictor, uploads)
        for (_, data), (x, ms) in zip(uploads, decoded, strict=True):
            pending.submit(data, x, ms, model_metadata)
        # Only decodable images are filed: junk never reaches the disk.
        paths = file_uploads(services.config.data / "images", uploads)
    except BaseException as exc:
        pending.failed(exc)
        raise
    pending.filed(paths)
