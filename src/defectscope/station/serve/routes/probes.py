"""``/healthz``, ``/readyz`` and ``/metrics``: what an orchestrator and a Prometheus server ask."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from defectscope.station.serve.services import ServicesDep

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", tags=["probes"])
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["probes"])
async def readyz(services: ServicesDep) -> JSONResponse:
    """A model is loaded, the store answers and this replica runs the station's model (``behind`` says why not)."""
    models = services.models
    try:
        await run_in_threadpool(services.store.counts)
        db = "ok"
    except Exception as exc:
        db = f"error: {exc}"
    # A replica that does not run the station's model is not ready: a load balancer sends it nothing.
    ready = db == "ok" and models.behind is None
    return JSONResponse({"ready": ready, "database": db, "model": models.current.info(),
                         "last_reload_error": models.last_error, "replica": services.config.replica,
                         "model_generation": models.generation, "behind": models.behind},
                        status_code=200 if ready else 503)


@router.get("/metrics", tags=["probes"], response_class=Response)
async def prometheus(services: ServicesDep) -> Response:
    """Prometheus text format: this process, or every replica sharing its ``PROMETHEUS_MULTIPROC_DIR``."""
    return Response(await run_in_threadpool(services.metrics.exposition), media_type=CONTENT_TYPE_LATEST)
