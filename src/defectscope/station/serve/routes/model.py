"""``POST /v1/model/reload``: load the model file now and make it the model of every replica on the store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from starlette.concurrency import run_in_threadpool

from defectscope.station.serve.services import ServicesDep

__all__ = ["router"]

router = APIRouter()


@router.post("/v1/model/reload", tags=["model"])
async def reload_model(services: ServicesDep) -> dict[str, Any]:
    """Load this replica's model file (changed or not), check it on a blank image and run it; it becomes the
    station's model generation, which every replica on the same database follows within its poll interval
    (``/readyz`` of a replica whose own file holds another model says so and answers 503). A file that fails
    keeps the running model: 422 with the reason."""
    try:
        return await run_in_threadpool(services.models.reload)
    except (ValueError, OSError) as exc:
        raise HTTPException(422, str(exc)[:500]) from None
