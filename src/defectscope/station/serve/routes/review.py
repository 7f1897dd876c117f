"""The review loop: put a decision in the queue, read the queue, take the next item to review, store a person's
label, and show where people disagree (:mod:`defectscope.station.corrections` says what a conflict is).

Several replicas share one queue: ``POST /v1/review/next`` hands each reviewer an item nobody else holds, for a
lease (:meth:`defectscope.station.store.Store.claim_review`, row locks on PostgreSQL); a lease that runs out frees
the item for the next person. A review may still come from anyone: two labels of one item are both kept and shown
as a conflict."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from defectscope.labels import DRIFT
from defectscope.station.corrections import conflicts_of
from defectscope.station.serve.auth import caller_key
from defectscope.station.serve.rows import MAX_ID, DecisionId, public_row
from defectscope.station.serve.services import Services, ServicesDep
from defectscope.station.serve.uploads import META_RE

__all__ = ["ClaimIn", "ReviewIn", "router"]

router = APIRouter()


class ReviewIn(BaseModel):
    decision_id: int = Field(ge=1, le=MAX_ID)
    label: str = Field(min_length=1, max_length=64)
    reviewer: str | None = Field(default=None, max_length=64)
    comment: str | None = Field(default=None, max_length=1000)

    @field_validator("label", "reviewer", "comment")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        """Text every database stores: no NUL (PostgreSQL refuses it), no lone surrogate (not UTF-8)."""
        if value is not None:
            if "\x00" in value:
                raise ValueError("NUL characters are not allowed")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("not valid Unicode text (a lone surrogate)") from None
        return value


class ClaimIn(BaseModel):
    reviewer: str | None = Field(default=None, max_length=64)
    lease_seconds: float = Field(default=300.0, ge=1.0, le=3600.0)


@router.post("/v1/decisions/{decision_id}/review-request", tags=["review"])
async def request_review(decision_id: DecisionId, services: ServicesDep) -> dict[str, Any]:
    """Put any decision in the review queue (a person picked it). A decision that already has a review is not
    queued again (409): post another review to change or dispute its label."""
    store = services.store
    done = await run_in_threadpool(store.reviews, decision_id)
    if done:
        last = done[-1]
        raise HTTPException(409, f"decision {decision_id} is already reviewed ({last['label']!r} by "
                                 f"{last['reviewer']!r}); post a review to change or dispute its label")
    if not await run_in_threadpool(store.flag, decision_id):
        raise HTTPException(404, f"no decision {decision_id}")
    await _recount(services)
    return {"id": decision_id, "needs_review": True}


@router.get("/v1/review/queue", tags=["review"])
async def review_queue(services: ServicesDep, limit: int = Query(20, ge=0, le=500)) -> dict[str, Any]:
    """Decisions waiting for a person, oldest first, and the labels a person may give."""
    rows, total = await run_in_threadpool(services.store.review_queue, limit)
    claims = await run_in_threadpool(services.store.claims) if rows else {}
    services.review_depth = total
    items = [{**public_row(r), "claimed_by": claims.get(r["id"], {}).get("reviewer"),
              "claimed_until": claims.get(r["id"], {}).get("until")} for r in rows]
    return {"total": total, "labels": _labels(services), "items": items}


@router.post("/v1/review/next", tags=["review"])
async def review_next(request: Request, services: ServicesDep, body: ClaimIn | None = None) -> dict[str, Any]:
    """The next item for this reviewer (``reviewer``, else the caller's key id), held for ``lease_seconds``: no
    other reviewer, on this replica or another on the same database, is handed it until the lease ends or it is
    reviewed. Asking again gives back the item already held, its lease renewed. ``item`` is null when nothing
    waits that nobody holds."""
    body = body or ClaimIn()
    reviewer = _reviewer(body.reviewer, request)
    row = await run_in_threadpool(lambda: services.store.claim_review(reviewer, body.lease_seconds, keep=True))
    await _recount(services)
    until = None
    if row is not None:
        until = (await run_in_threadpool(services.store.claims)).get(row["id"], {}).get("until")
    return {"reviewer": reviewer, "total": services.review_depth, "labels": _labels(services),
            "item": public_row(row) if row is not None else None, "claimed_until": until}


def _reviewer(given: str | None, request: Request) -> str:
    reviewer = (given or "").strip() or caller_key(request) or "anonymous"
    if not META_RE.match(reviewer):
        raise HTTPException(422, "reviewer: printable characters only")
    return reviewer


@router.get("/v1/review/conflicts", tags=["review"])
async def review_conflicts(services: ServicesDep, limit: int = Query(100, ge=0, le=1000)) -> dict[str, Any]:
    """Decisions whose reviewers disagree (each reviewer's latest label counts), newest first, with every
    label given; ``review export`` leaves them out until people agree."""
    found = conflicts_of(await run_in_threadpool(services.store.reviews))
    ids = sorted(found, reverse=True)
    return {"total": len(ids), "items": [{"decision_id": i, "labels": found[i]} for i in ids[:limit]]}


def _labels(services: Services) -> list[str]:
    return [*services.models.current.predictor.classes, DRIFT]


async def _recount(services: Services) -> None:
    # The gauge follows the store, not arithmetic on it: a second review or a sorter's rows cannot drift it.
    services.review_depth = (await run_in_threadpool(services.store.review_queue, 0))[1]


@router.post("/v1/reviews", tags=["review"], status_code=201)
async def add_review(body: ReviewIn, request: Request, services: ServicesDep) -> dict[str, Any]:
    """A person's label for a decision (confirm: the model's class; relabel: another class; Drift). Every
    review is kept; when reviewers disagree the answer says so (``conflict``, with each reviewer's label)."""
    if body.label not in _labels(services):
        raise HTTPException(422, f"label {body.label!r} is not one of {_labels(services)}")
    reviewer = _reviewer(body.reviewer, request)
    store = services.store
    try:
        rid = await run_in_threadpool(store.add_review, body.decision_id, body.label, reviewer, body.comment)
    except KeyError:
        raise HTTPException(404, f"no decision {body.decision_id}") from None
    await _recount(services)
    found = conflicts_of(await run_in_threadpool(store.reviews, body.decision_id))
    out: dict[str, Any] = {"id": rid, "decision_id": body.decision_id, "label": body.label, "reviewer": reviewer,
                           "conflict": body.decision_id in found}
    if out["conflict"]:
        out["labels"] = found[body.decision_id]
    return out
