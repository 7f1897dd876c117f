"""The review loop: put a decision in the queue, read the queue, and store a person's label."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from defectscope.labels import DRIFT
from defectscope.station.serve.auth import require_key
from defectscope.station.serve.rows import MAX_ID, DecisionId, public_row
from defectscope.station.serve.services import Services, ServicesDep
from defectscope.station.serve.uploads import META_RE

__all__ = ["ReviewIn", "router"]

router = APIRouter()


class ReviewIn(BaseModel):
    decision_id: int = Field(ge=1, le=MAX_ID)
    label: str = Field(min_length=1, max_length=64)
    reviewer: str | None = Field(default=None, max_length=64)
    comment: str | None = Field(default=None, max_length=1000)


@router.post("/v1/decisions/{decision_id}/review-request", tags=["review"])
async def request_review(decision_id: DecisionId, request: Request, services: ServicesDep) -> dict[str, Any]:
    """Put any decision in the review queue (a person picked it)."""
    require_key(request, services)
    if not await run_in_threadpool(services.store.flag, decision_id):
        raise HTTPException(404, f"no decision {decision_id}")
    services.review_depth = (await run_in_threadpool(services.store.review_queue, 0))[1]
    return {"id": decision_id, "needs_review": True}


@router.get("/v1/review/queue", tags=["review"])
async def review_queue(services: ServicesDep, limit: int = Query(20, ge=0, le=500)) -> dict[str, Any]:
    """Decisions waiting for a person, oldest first, and the labels a person may give."""
    rows, total = await run_in_threadpool(services.store.review_queue, limit)
    services.review_depth = total
    return {"total": total, "labels": _labels(services), "items": [public_row(r) for r in rows]}


def _labels(services: Services) -> list[str]:
    return [*services.models.current.predictor.classes, DRIFT]


@router.post("/v1/reviews", tags=["review"], status_code=201)
async def add_review(body: ReviewIn, request: Request, services: ServicesDep) -> dict[str, Any]:
    """A person's label for a decision (confirm: the model's class; relabel: another class; Drift)."""
    key_id = require_key(request, services)
    if body.label not in _labels(services):
        raise HTTPException(422, f"label {body.label!r} is not one of {_labels(services)}")
    reviewer = (body.reviewer or "").strip() or key_id or "anonymous"
    if not META_RE.match(reviewer):
        raise HTTPException(422, "reviewer: printable characters only")
    if body.comment and "\x00" in body.comment:
        raise HTTPException(422, "comment: NUL characters are not allowed")
    try:
        rid = await run_in_threadpool(services.store.add_review, body.decision_id, body.label, reviewer,
                                      body.comment)
    except KeyError:
        raise HTTPException(404, f"no decision {body.decision_id}") from None
    services.review_depth = max(0, services.review_depth - 1)
    return {"id": rid, "decision_id": body.decision_id, "label": body.label, "reviewer": reviewer}
