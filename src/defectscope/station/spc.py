"""Statistics for the station's dashboard: p-chart with Western Electric rules, the Drift-rate alarm,
pilot agreement with Clopper-Pearson intervals. numpy/scipy only; the page draws what these return.

Conventions: a *defective* decision is an automatic decision for any class but the good one (REVIEW and
Drift are not automatic decisions and stay out of the defect rate); a p-chart subgroup is one time bucket.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

# scipy.special, not scipy.stats: stats pulls in the array-API layer, which probes for torch.
from scipy.special import bdtrc, betaincinv

from defectscope import labels

__all__ = ["aggregate", "binomial_alarm", "clopper_pearson", "dashboard", "p_chart", "pilot_stats", "western_electric"]

REVIEW, DRIFT = labels.REVIEW, labels.DRIFT
NOT_AUTO = labels.NOT_AUTOMATIC
WE_RULES = {
    1: "one point beyond 3 sigma",
    2: "2 of 3 consecutive points beyond 2 sigma, same side",
    3: "4 of 5 consecutive points beyond 1 sigma, same side",
    4: "8 consecutive points on one side of the centre line",
}


def western_electric(z: np.ndarray) -> list[list[int]]:
    """Rules (1-4, :data:`WE_RULES`) each point of a standardised series breaks; NaN points (empty
    subgroups) break none and do not count in a run. A point is marked by every rule whose window ends there."""
    z = np.asarray(z, dtype=float)
    out: list[list[int]] = [[] for _ in z]
    valid = np.flatnonzero(~np.isnan(z))
    zs = z[valid]
    for k, i in enumerate(valid):
        hits = []
        if abs(zs[k]) > 3:
            hits.append(1)
        for rule, window, need, limit in ((2, 3, 2, 2.0), (3, 5, 4, 1.0)):
            w = zs[max(0, k - window + 1):k + 1]
            if len(w) == window and any(np.sum(side * w > limit) >= need and side * zs[k] > limit
                                        for side in (1, -1)):
                hits.append(rule)
        w = zs[max(0, k - 7):k + 1]
        if len(w) == 8 and (np.all(w > 0) or np.all(w < 0)):
            hits.append(4)
        out[i] = hits
    return out


def p_chart(defects: np.ndarray, n: np.ndarray) -> dict[str, Any]:
    """p-chart of ``defects[i]`` out of ``n[i]`` per subgroup: centre p-bar = sum(d)/sum(n), limits
    p-bar +- 3 sqrt(p-bar (1 - p-bar) / n_i), the lower one clipped at 0 (the upper at 1). Empty
    subgroups get NaN (``None`` in JSON). ``violations[i]``: the Western Electric rules point i breaks."""
    d, n = np.asarray(defects, dtype=float), np.asarray(n, dtype=float)
    if d.shape != n.shape or np.any(d < 0) or np.any(d > n):
        raise ValueError("defects and n must have the same shape with 0 <= defects <= n")
    total = n.sum()
    pbar = float(d.sum() / total) if total > 0 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n > 0, d / n, np.nan)
        sigma = np.where(n > 0, np.sqrt(pbar * (1 - pbar) / n), np.nan)
        z = np.where(sigma > 0, (p - pbar) / sigma, np.where(n > 0, 0.0, np.nan))
    ucl = np.minimum(pbar + 3 * sigma, 1.0)
    lcl = np.maximum(pbar - 3 * sigma, 0.0)
    return {"pbar": _num(pbar), "p": _list(p), "n": [int(x) for x in n], "defects": [int(x) for x in d],
            "ucl": _list(ucl), "lcl": _list(lcl), "z": _list(z), "violations": western_electric(z),
            "rules": {str(k): v for k, v in WE_RULES.items()}}


def binomial_alarm(k: int, n: int, p0: float, alpha: float = 0.01) -> dict[str, Any]:
    """One-sided exact binomial test that the rate behind ``k`` of ``n`` exceeds ``p0``; alarm when p < alpha."""
    if n <= 0:
        return {"k": 0, "n": 0, "rate": None, "p0": p0, "p_value": None, "alarm": False, "alpha": alpha}
    p_value = 1.0 if k <= 0 else float(bdtrc(int(k) - 1, int(n), p0))  # P(X >= k) under rate p0
    return {"k": int(k), "n": int(n), "rate": k / n, "p0": p0, "p_value": p_value, "alarm": p_value < alpha,
            "alpha": alpha}


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion (0/1 ends when k is 0 or n; (0, 1) for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    a = 1 - confidence
    lo = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, a / 2))
    hi = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - a / 2))
    return lo, hi


def _rate(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    lo, hi = clopper_pearson(k, n, confidence)
    return {"k": k, "n": n, "rate": k / n if n else None, "low": lo, "high": hi}


def pilot_stats(reviewed: list[dict[str, Any]], good_class: str, escape_cap: float,
                confidence: float = 0.95, overkill_cap: float | None = None) -> dict[str, Any]:
    """The model against people, over reviewed automatic decisions (REVIEW/Drift ones excluded).

    agreement: decision == human label. escape: human says defective among decisions GOOD (a defect the
    model would pass). overkill: human says GOOD among decisions defective. GOOD decisions may stop going
    to review once the one-sided upper bound on escape (the upper end of the 1 - 2a two-sided interval at
    ``confidence``) is below ``escape_cap``.

    The policy's caps against people (meaningful in a pilot, where people review every decision, REVIEW ones
    included): ``escape_of_defective`` = PASSed among parts people call defective, ``overkill_of_good`` =
    rejected automatically among parts people call good, each with ``within_cap`` when the cap is known.
    """
    auto = [r for r in reviewed if r["decision"] not in NOT_AUTO]
    agree = sum(r["decision"] == r["label"] for r in auto)
    good = [r for r in auto if r["decision"] == good_class]
    escapes = sum(r["label"] != good_class for r in good)
    bad = [r for r in auto if r["decision"] != good_class]
    overkill = sum(r["label"] == good_class for r in bad)
    one_sided = 1 - 2 * (1 - confidence)  # its upper end is a one-sided `confidence` bound
    upper = clopper_pearson(escapes, len(good), one_sided)[1]
    # Smallest number of further escape-free GOOD reviews that would bring the bound under the cap.
    more = None
    if upper >= escape_cap and escape_cap > 0:
        n = len(good)
        while clopper_pearson(escapes, n, one_sided)[1] >= escape_cap and n < len(good) + 1_000_000:
            n = max(n + 1, int(n * 1.05))
        more = n - len(good)
    human_bad = [r for r in reviewed if r["label"] != good_class]
    human_good = [r for r in reviewed if r["label"] == good_class]
    passed_bad = sum(r["decision"] == good_class for r in human_bad)
    rejected_good = sum(r["decision"] not in NOT_AUTO and r["decision"] != good_class for r in human_good)
    caps = {"escape_of_defective": (_rate(passed_bad, len(human_bad), confidence), escape_cap),
            "overkill_of_good": (_rate(rejected_good, len(human_good), confidence), overkill_cap)}
    against_people = {k: {**r, "cap": cap, "within_cap": None if cap is None or r["rate"] is None
                          else bool(clopper_pearson(r["k"], r["n"], one_sided)[1] <= cap)}
                      for k, (r, cap) in caps.items()}
    return {
        "caps_against_people": against_people,
        "reviewed": len(reviewed), "reviewed_auto": len(auto), "confidence": confidence,
        "agreement": _rate(agree, len(auto), confidence), "escape": _rate(escapes, len(good), confidence),
        "overkill": _rate(overkill, len(bad), confidence), "escape_cap": escape_cap,
        "escape_upper_one_sided": upper, "can_stop_reviewing_good": bool(good) and upper < escape_cap,
        "more_good_reviews_needed": more,
    }


def _parse(t: str) -> datetime:
    return datetime.fromisoformat(t)


def _buckets(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    out, t = [], start
    while t < end:
        out.append(t)
        t += step
    return out


def aggregate(rows: list[dict[str, Any]], recent: int = 500) -> tuple[list, list, list]:
    """:func:`dashboard`'s inputs from plain rows (``time``, ``decision``, ``confidence``, ``total_ms``), in
    id order - what :meth:`Store.minute_counts`, :meth:`Store.sample` and :meth:`Store.recent_decisions`
    compute in the database."""
    counts = Counter((r["time"][:16], r["decision"]) for r in rows)
    return ([(m, d, n) for (m, d), n in counts.items()],
            [(r["time"], r.get("confidence"), r.get("total_ms")) for r in rows],
            [r["decision"] for r in rows[-recent:]])


def dashboard(counts: list[tuple[str, str, int]], samples: list[tuple[str, float | None, float | None]],
              recent: list[str], *, classes: list[str], good_class: str, since: datetime, until: datetime,
              bucket_minutes: int = 60, drift_rate: float | None = None, alpha: float = 0.01) -> dict[str, Any]:
    """Everything the dashboard draws for ``[since, until)``.

    ``counts``: decisions per minute (``"YYYY-MM-DDTHH:MM"``) and kind, exact; ``samples``: (time,
    confidence, total_ms) of all or an even sample of the decisions, for the quantiles; ``recent``: the
    decisions of the last few hundred images, for the Drift test. Per bucket: decisions by kind, the p-chart
    of the defect rate, Drift counts, confidence quantiles (10/50/90 %), throughput and latency (p50/p99 of
    ``total_ms``). ``drift.alarm``: the binomial test of ``recent``'s Drift rate against ``drift_rate``, the
    rate the policy was calibrated to flag on normal images.
    """
    step = timedelta(minutes=bucket_minutes)
    starts = _buckets(since, until, step)
    nb = len(starts)

    def bucket(t: str) -> int:
        return min(nb - 1, max(0, int((_parse(t) - since) / step)))

    kinds = [*classes, REVIEW, DRIFT]
    by_kind = {k: [0] * nb for k in kinds}
    other: Counter[str] = Counter()
    auto_n, defects, drift_n, total_n = (np.zeros(nb, int) for _ in range(4))
    for minute, d, n in counts:
        b = bucket(minute + ":00+00:00")
        if d in by_kind:
            by_kind[d][b] += n
        else:
            other[d] += n
        total_n[b] += n
        if d not in NOT_AUTO:
            auto_n[b] += n
            defects[b] += n * (d != good_class)
        drift_n[b] += n * (d == DRIFT)
    conf: list[list[float]] = [[] for _ in range(nb)]
    lat: list[list[float]] = [[] for _ in range(nb)]
    for t, c, ms in samples:
        b = bucket(t)
        if c is not None:
            conf[b].append(c)
        if ms is not None:
            lat[b].append(ms)

    def quantiles(groups: list[list[float]], qs: tuple[float, ...]) -> list[list[float | None]]:
        return [[_num(np.quantile(g, q)) if g else None for g in groups] for q in qs]

    k_drift = sum(d == DRIFT for d in recent)
    return {
        "since": since.isoformat(), "until": until.isoformat(), "bucket_minutes": bucket_minutes,
        "buckets": [t.isoformat() for t in starts], "classes": classes, "good_class": good_class,
        "total": int(total_n.sum()), "decisions_by_kind": by_kind, "other_decisions": dict(other),
        "p_chart": p_chart(defects, auto_n),
        # Share of images decided without a person per bucket, and the review load people carry.
        "automation": {"rate": [_num(a / t) if t else None for a, t in zip(auto_n, total_n, strict=True)],
                       "review": by_kind[REVIEW], "total_rate": _num(auto_n.sum() / total_n.sum())
                       if total_n.sum() else None},
        "drift": {"per_bucket": drift_n.tolist(), "n": total_n.tolist(), "calibrated_rate": drift_rate,
                  "alarm": binomial_alarm(k_drift, len(recent), drift_rate, alpha) if drift_rate else None,
                  "window": len(recent)},
        "confidence": dict(zip(("q10", "q50", "q90"), quantiles(conf, (0.1, 0.5, 0.9)), strict=True)),
        "quantile_sample": len(samples),
        "throughput_per_minute": [round(int(x) / bucket_minutes, 4) for x in total_n],
        "latency_ms": dict(zip(("p50", "p99"), quantiles(lat, (0.5, 0.99)), strict=True)),
    }


def _num(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else round(x, 6)


def _list(a: np.ndarray) -> list[float | None]:
    return [_num(x) for x in a]


def utc(t: datetime | None = None) -> datetime:
    return (t or datetime.now(timezone.utc)).astimezone(timezone.utc)


def dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False)
