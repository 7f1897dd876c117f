"""The dashboard: the page at ``/`` and ``/v1/dashboard``, every statistic it draws."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from defectscope.station import spc
from defectscope.station.serve.rows import utc_iso
from defectscope.station.serve.services import Services, ServicesDep

__all__ = ["STATIC", "router"]

STATIC = Path(__file__).resolve().parents[2] / "static"

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard_page() -> HTMLResponse:
    return HTMLResponse((STATIC / "dashboard.html").read_text(encoding="utf-8"))


@router.get("/v1/dashboard", tags=["results"])
async def dashboard(services: ServicesDep, hours: float = Query(24, gt=0, le=24 * 31),
                    bucket_minutes: int = Query(60, ge=1, le=1440),
                    station: str | None = Query(None, max_length=128),
                    replica: str | None = Query(None, max_length=128)) -> dict[str, Any]:
    """Everything the dashboard draws: decisions per bucket, p-chart with Western Electric rules, the
    Drift-rate alarm, confidence and latency quantiles, the review queue depth and pilot statistics.

    Bounded so that dashboards cannot starve predictions: at most ``max_dashboard_points`` buckets (422
    beyond), one computation at a time and at most :data:`SHARE` of the time in them (a busy dashboard waits,
    the line does not), and an answer is shared by every tab asking the same within :data:`CACHE_SECONDS`.

    Every replica on the database answers for the whole station; ``replica`` (a name from ``replicas``) narrows
    the statistics to the decisions one replica made, and ``replicas`` always lists each one's counts and models."""
    points = hours * 60 / bucket_minutes
    limit = services.config.max_dashboard_points
    if points > limit:
        raise HTTPException(422, f"hours={hours:g} with bucket_minutes={bucket_minutes} is {points:.0f} buckets, "
                                 f"over {limit}: choose a bucket of at least {hours * 60 / limit:.0f} minutes")
    if replica is not None and "\x00" in replica:
        raise HTTPException(422, "replica: NUL characters are not allowed")
    key = (hours, bucket_minutes, station, replica)
    cache = services.dashboard_cache
    async with services.dashboard_gate:
        hit = cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
            return hit[1]
        # A duty cycle: dashboard work takes at most SHARE of the time, the rest is the line's.
        await asyncio.sleep(max(0.0, services.dashboard_next - time.monotonic()))
        started = time.monotonic()
        out = await run_in_threadpool(_dashboard, services, hours, bucket_minutes, station, replica)
        done = time.monotonic()
        services.dashboard_next = done + (done - started) * (1 / SHARE - 1)
        if len(cache) > 64:
            cache.clear()
        cache[key] = (done, out)
        return out


CACHE_SECONDS = 2.0
SHARE = 0.15


def _dashboard(services: Services, hours: float, bucket_minutes: int, station: str | None,
               replica: str | None) -> dict[str, Any]:
    config = services.config
    model = services.models.current
    until = datetime.now(timezone.utc)
    step = timedelta(minutes=bucket_minutes)
    # Buckets aligned to whole steps since midnight, so a refresh does not shift every bucket.
    midnight = until.replace(hour=0, minute=0, second=0, microsecond=0)
    end = midnight + step * (int((until - midnight) / step) + 1)
    since = end - step * max(1, round(timedelta(hours=hours) / step))
    store = services.store
    start = utc_iso(since)
    # Counted in the database; only a bounded sample comes back for the quantiles.
    out = spc.dashboard(store.minute_counts(start, station, replica), store.sample(start, station=station,
                                                                                  replica=replica),
                        store.recent_decisions(500, station, replica), classes=model.predictor.classes,
                        good_class=model.good_class, since=since, until=end, bucket_minutes=bucket_minutes,
                        drift_rate=model.drift_rate)
    reviewed = store.reviewed(utc_iso(since))
    # A three-way policy carries its own caps: the pilot measures exactly those against people.
    three_way = (model.predictor.policy or {}).get("three_way") or {}
    escape_cap = (three_way.get("escape") or {}).get("cap", config.escape_cap)
    overkill_cap = (three_way.get("overkill") or {}).get("cap")
    out["pilot"] = spc.pilot_stats(reviewed, model.good_class, escape_cap, overkill_cap=overkill_cap)
    out["pilot"]["enabled"] = config.pilot
    _, out["review_queue"] = store.review_queue(0)
    out["model"] = model.info()  # no server path in it
    out["replica"] = config.replica  # the one answering
    out["replica_filter"] = replica
    out["replicas"] = _per_replica(store.replica_counts(start, station))
    out["queue_depth"] = services.batcher.depth
    out["auth_required"] = bool(config.api_keys)
    return out


def _per_replica(counts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The store's (replica, model, decision) counts as one entry per replica: its total, decisions by kind, the
    models that decided them and its newest row. Replica ``None`` is the sorter (and rows from before 0.4)."""
    out: dict[str | None, dict[str, Any]] = {}
    for c in counts:
        e = out.setdefault(c["replica"], {"replica": c["replica"], "total": 0, "decisions": {}, "models": {},
                                          "last": None})
        e["total"] += c["n"]
        e["decisions"][c["decision"]] = e["decisions"].get(c["decision"], 0) + c["n"]
        e["models"][c["model_id"]] = e["models"].get(c["model_id"], 0) + c["n"]
        e["last"] = max(filter(None, (e["last"], c["last"])), default=None)
    return sorted(out.values(), key=lambda e: (e["replica"] is None, e["replica"] or ""))
