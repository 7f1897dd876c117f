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

from defectscope import labels
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
    the line does not), and an answer is shared by every tab asking the same within :data:`CACHE_SECONDS` (``as_of``
    and ``cache_seconds`` say so; the page takes the review queue's depth from ``/v1/review/queue``, uncached).

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
    # Counted in the database, per model: a class name means what the model that decided it says. Only a
    # bounded sample comes back for the quantiles.
    counts = store.minute_model_counts(start, station, replica)
    reviewed = store.reviewed(start)
    others = ({c[2] for c in counts if c[3] is None} | {r["model_id"] for r in reviewed if r["verdict"] is None}) \
        - {model.model_id}
    kinds = _Kinds(model, store.model_classes(others) if others else {})
    shown = [(minute, kinds.name(decision, model_id, verdict), n) for minute, decision, model_id, verdict, n in counts]
    out = spc.dashboard(shown, store.sample(start, station=station, replica=replica),
                        store.recent_decisions(500, station, replica), classes=kinds.chart_names(),
                        good_class=model.good_class, since=since, until=end, bucket_minutes=bucket_minutes,
                        drift_rate=model.drift_rate)
    kinds.redo_p_chart(out)
    # A three-way policy carries its own caps: the pilot measures exactly those against people.
    three_way = (model.predictor.policy or {}).get("three_way") or {}
    escape_cap = (three_way.get("escape") or {}).get("cap", config.escape_cap)
    overkill_cap = (three_way.get("overkill") or {}).get("cap")
    judged, unknown = kinds.pilot_rows(reviewed)
    out["pilot"] = spc.pilot_stats(judged, model.good_class, escape_cap, overkill_cap=overkill_cap)
    out["pilot"]["enabled"] = config.pilot
    out["pilot"]["verdict_unknown"] = unknown
    # The page's review tile and queue panel both show GET /v1/review/queue's total (one answer, no cache);
    # this figure is as fresh as the rest of this answer, which says when it was computed and for how long it is
    # shared.
    _, out["review_queue"] = store.review_queue(0)
    out["as_of"], out["cache_seconds"] = utc_iso(until), CACHE_SECONDS
    out["model"] = model.info()  # no server path in it
    out["replica"] = config.replica  # the one answering
    out["replica_filter"] = replica
    out["replicas"] = _per_replica(store.replica_counts(start, station))
    out["queue_depth"] = services.batcher.depth
    out["auth_required"] = bool(config.api_keys)
    return out


class _Kinds:
    """What each (model, decision) of a window is on the dashboard: the name it is shown under and its verdict.

    A row's verdict comes from its own decision and its own model, never from the current model's class list:
    the ``verdict`` its writer recorded; else REVIEW, Drift and unreadable as they are, and a class PASS when it is
    its model's good class, REJECT otherwise. The current model's good class is the station's; another model's is
    the one class named like GOOD among the classes its rows record (:meth:`Store.model_classes`,
    :func:`labels.good_class_of`). A row without a recorded verdict of a model whose good class is named otherwise
    has verdict ``None`` (unknown): an automatic decision, but out of the defect rate and the pilot, and the answer
    says how many.
    A class is shown under its own name, qualified by its model when that name already means another verdict."""

    def __init__(self, current: Any, classes_of: dict[str | None, list[str]]) -> None:
        self.current, self.classes_of = current, classes_of
        self.kinds: dict[str, dict[str, Any]] = {}
        self._names: dict[tuple[str | None, str, str | None], str] = {}
        for c in current.predictor.classes:  # the current model's panels first, in its order, even when empty
            self.name(c, current.model_id)
        for k in (labels.REVIEW, labels.DRIFT):
            self.name(k, current.model_id)

    def good_of(self, model_id: str | None) -> str | None:
        if model_id == self.current.model_id:
            return self.current.good_class
        classes = self.classes_of.get(model_id)
        return labels.good_class_of(classes) if classes else None

    def verdict(self, decision: str, model_id: str | None, recorded: str | None = None) -> str | None:
        if recorded is not None:
            return recorded
        if decision in labels.NOT_AUTOMATIC or decision in (labels.PASS, labels.REJECT):
            return decision
        return labels.verdict_of(decision, self.good_of(model_id))

    def name(self, decision: str, model_id: str | None, recorded: str | None = None) -> str:
        key = (model_id, decision, recorded)
        if key in self._names:
            return self._names[key]
        verdict = self.verdict(decision, model_id, recorded)
        name = decision
        short = (model_id or "unknown")[:8]
        if name in self.kinds and self.kinds[name]["verdict"] != verdict:
            name = f"{decision} (model {short})"
        if name in self.kinds and self.kinds[name]["verdict"] != verdict:  # one model, two recorded verdicts
            name = f"{decision} (model {short}, {verdict or 'verdict unknown'})"
        entry = self.kinds.setdefault(name, {"class": decision, "verdict": verdict, "models": []})
        if decision not in labels.NOT_AUTOMATIC and model_id not in entry["models"]:
            entry["models"].append(model_id)
        self._names[key] = name
        return name

    def chart_names(self) -> list[str]:
        return [k for k in self.kinds if k not in (labels.REVIEW, labels.DRIFT)]  # spc adds those two itself

    def redo_p_chart(self, out: dict[str, Any]) -> None:
        """The defect rate from verdicts: REJECT among PASS + REJECT per bucket, unknown verdicts left out."""
        by_kind, nb = out["decisions_by_kind"], len(out["buckets"])

        def per_bucket(verdicts: tuple[str, ...]) -> list[int]:
            names = [k for k, e in self.kinds.items() if e["verdict"] in verdicts and k in by_kind]
            return [sum(by_kind[k][b] for k in names) for b in range(nb)]

        out["p_chart"] = spc.p_chart(per_bucket((labels.REJECT,)), per_bucket((labels.PASS, labels.REJECT)))
        out["kinds"] = self.kinds
        unknown = {k: sum(by_kind[k]) for k, e in self.kinds.items() if e["verdict"] is None and sum(by_kind[k])}
        out["verdict_unknown"] = {"decisions": sum(unknown.values()), "kinds": unknown,
                                  "models": sorted({m or "" for k in unknown for m in self.kinds[k]["models"]})}

    def pilot_rows(self, reviewed: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Reviewed rows in the current model's terms for :func:`spc.pilot_stats` (which compares names with one
        good class): another model's PASS becomes the current good class, a label that was that model's good
        class too. Rows whose verdict is unknown are left out; their count is the second value."""
        good, out, unknown = self.current.good_class, [], 0
        for r in reviewed:
            verdict = self.verdict(r["decision"], r["model_id"], r.get("verdict"))
            if verdict is None:
                unknown += 1
                continue
            if r["model_id"] == self.current.model_id or r["decision"] in labels.NOT_AUTOMATIC:
                out.append(r)
                continue
            decision = good if verdict == labels.PASS else r["decision"]
            if verdict == labels.REJECT and decision == good:
                decision = f"{decision} (another model)"
            label = good if r["label"] == self.good_of(r["model_id"]) else r["label"]
            out.append({**r, "decision": decision, "label": label})
        return out, unknown


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
