"""The stored decisions: filtered and paged, one with its reviews, and the image and heatmap it was made on."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from defectscope.station.serve.rows import DecisionId, image_response, public_row, utc_iso
from defectscope.station.serve.services import ServicesDep
from defectscope.station.store import Store

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/results", tags=["results"])
async def results(services: ServicesDep, since: datetime | None = None, until: datetime | None = None,
                  decision: str | None = Query(None, max_length=64), model: str | None = Query(None, max_length=64),
                  station: str | None = Query(None, max_length=128), source: str | None = Query(None, max_length=8),
                  limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=10**9)) -> dict[str, Any]:
    """Stored decisions, newest first, filtered by time (ISO 8601; naive means UTC), decision, model id,
    station and source (sort or api)."""
    for name, value in (("decision", decision), ("model", model), ("station", station), ("source", source)):
        if value is not None and "\x00" in value:
            raise HTTPException(422, f"{name}: NUL characters are not allowed")
    rows, total = await run_in_threadpool(lambda: services.store.query(
        since=utc_iso(since), until=utc_iso(until), decision=decision, model=model, station=station,
        source=source, limit=limit, offset=offset))
    return {"total": total, "limit": limit, "offset": offset, "items": [public_row(r) for r in rows]}


def _row(store: Store, decision_id: int) -> dict[str, Any]:
    row = store.get(decision_id)
    if row is None:
        raise HTTPException(404, f"no decision {decision_id}")
    return row


@router.get("/v1/decisions/{decision_id}", tags=["results"])
async def decision(decision_id: DecisionId, services: ServicesDep) -> dict[str, Any]:
    """One decision with every review of it."""
    row = await run_in_threadpool(_row, services.store, decision_id)
    return {**public_row(row), "reviews": await run_in_threadpool(services.store.reviews, decision_id)}


@router.get("/v1/decisions/{decision_id}/image", tags=["results"], response_class=FileResponse)
async def decision_image(decision_id: DecisionId, services: ServicesDep) -> FileResponse:
    """The image the decision was made on (the service's copy, or the sorter's filed file)."""
    row = await run_in_threadpool(_row, services.store, decision_id)
    return image_response(row.get("image_path") or row.get("destination"))


@router.get("/v1/decisions/{decision_id}/heatmap", tags=["results"], response_class=FileResponse)
async def decision_heatmap(decision_id: DecisionId, services: ServicesDep) -> FileResponse:
    row = await run_in_threadpool(_row, services.store, decision_id)
    return image_response(row.get("heatmap_path"))
