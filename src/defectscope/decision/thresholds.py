"""Calibration statistics: temperature scaling, the escape-cap threshold with its guarantee, the review band.

Pure numpy/scipy; the inputs are arrays of scores and labels from images the model never trained on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

from defectscope.errors import DefectscopeError


class CalibrationError(DefectscopeError, ValueError):
    """The calibration data cannot support the requested guarantee or target."""


# ---------------------------------------------------------------- temperature scaling


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels ``y`` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, *, bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """The single T > 0 minimising NLL of softmax(logits / T); searched on log T within ``bounds``.

    A model that separates its calibration images perfectly drives T to the lower bound (ever more
    confident is ever better); the bound keeps that finite.
    """
    y = np.asarray(y, dtype=int)
    if len(y) == 0:
        raise CalibrationError("no images to fit a temperature on")
    res = optimize.minimize_scalar(
        lambda log_t: nll(logits, y, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded", options={"xatol": 1e-6},
    )
    return float(math.exp(res.x))


# ---------------------------------------------------------------- binomial bounds


def cp_upper(k: np.ndarray | int, n: int, confidence: float) -> np.ndarray | float:
    """One-sided Clopper-Pearson upper bound on a rate with ``k`` events in ``n`` trials."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ub = np.where(k >= n, 1.0, stats.beta.ppf(confidence, k + 1, np.maximum(n - k, 1e-12)))
    return float(ub) if ub.ndim == 0 else ub


def binomial_p_value(errors: np.ndarray, n: np.ndarray | int, cap: float) -> np.ndarray:
    """Exact p-value of "true rate > cap" after ``errors`` in ``n``: P(Binomial(n, cap) <= errors)."""
    return stats.binom.cdf(np.asarray(errors), np.asarray(n), cap)


def cp_interval(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval at ``confidence``; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    a = (1 - confidence) / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def min_defective_for_cap(max_escape: float, confidence: float) -> int:
    """Smallest n with zero escapes whose upper bound meets the cap: (1-cap)^n <= 1-confidence.

    For a 1% cap at 95% confidence that is 299 defective images.
    """
    n = max(1, math.ceil(math.log(1 - confidence) / math.log(1 - max_escape)))
    # Guard against floating-point edge cases in the closed form.
    while cp_upper(0, n, confidence) > max_escape:
        n += 1
    while n > 1 and cp_upper(0, n - 1, confidence) <= max_escape:
        n -= 1
    return n


# ---------------------------------------------------------------- escape cap


@dataclass
class EscapeGuarantee:
    threshold: float
    max_escape: float
    confidence: float
    n_defective: int
    n_good: int
    escapes: int
    empirical_escape: float
    escape_ucb: float
    overkill: float
    overkill_interval: list[float]
    min_defective_needed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def escape_threshold(
    p_good: np.ndarray, defective: np.ndarray, *, max_escape: float, confidence: float = 0.95
) -> EscapeGuarantee:
    """The lowest threshold t for "pass as GOOD iff P(GOOD) >= t" whose escape rate is <= ``max_escape``
    with probability >= ``confidence`` over the draw of the calibration set.

    Why scanning many thresholds keeps the guarantee (fixed-sequence testing, as in Learn-Then-Test):
    the hypotheses H_t "true escape rate at t > cap" are tested in a fixed order, from the strictest t
    (no defective image passes) downward, each with the one-sided Clopper-Pearson bound at level
    1 - confidence, and the scan STOPS at the first t whose bound exceeds the cap. The true escape rate
    falls as t rises, so if the chosen t lies below the true critical threshold t*, the test at t* (whose
    escape count can only be smaller) must have passed although H_t* is true, which happens with
    probability <= 1 - confidence. No multiplicity correction is needed, but continuing past a failure
    (picking any later passing t) would void the guarantee.

    Between two consecutive defective scores the escape count is constant, so each candidate is the
    lowest t of such a band (just above the next defective score): least overkill for that count.
    The guarantee is marginal over calibration sets drawn from the same distribution as production,
    and assumes P(GOOD) was computed by a function fixed before seeing the calibration images.

    Raises :class:`CalibrationError` when even zero escapes cannot meet the cap (too few defective
    images), saying how many are needed.
    """
    p_good = np.asarray(p_good, dtype=np.float64)
    defective = np.asarray(defective, dtype=bool)
    if not 0 < max_escape < 1 or not 0 < confidence < 1:
        raise CalibrationError("max_escape and confidence must lie strictly between 0 and 1")
    need = min_defective_for_cap(max_escape, confidence)
    d = np.sort(p_good[defective])[::-1]  # descending
    n = len(d)
    if n < need:
        raise CalibrationError(
            f"an escape cap of {max_escape:g} at {confidence:g} confidence needs at least {need} defective "
            f"calibration images (even with zero escapes); the calibration set has {n}. Add labelled defective "
            f"images (a 'calib' split), or loosen the cap or the confidence."
        )
    levels = np.unique(d)[::-1]  # distinct defective scores, descending
    # Candidate j passes the defective images scoring above levels[j]; the last candidate passes all.
    thresholds = np.append(np.nextafter(levels, np.inf), 0.0)
    escapes = np.searchsorted(-d, -levels, side="left")  # count of d > levels[j]
    escapes = np.append(escapes, n)
    ucb = cp_upper(escapes, n, confidence)
    fails = np.nonzero(ucb > max_escape)[0]
    stop = int(fails[0]) if fails.size else len(thresholds)
    if stop == 0:  # cannot happen when n >= need, kept for safety
        raise CalibrationError(f"no threshold meets the escape cap {max_escape:g}")
    j = stop - 1
    t = float(thresholds[j])
    good = p_good[~defective]
    overkilled = int((good < t).sum())
    n_good = len(good)
    return EscapeGuarantee(
        threshold=t, max_escape=float(max_escape), confidence=float(confidence), n_defective=n,
        n_good=n_good, escapes=int(escapes[j]), empirical_escape=float(escapes[j] / n), escape_ucb=float(ucb[j]),
        overkill=float(overkilled / n_good) if n_good else float("nan"),
        overkill_interval=list(cp_interval(overkilled, n_good, confidence)), min_defective_needed=need,
    )


def naive_escape_threshold(p_good: np.ndarray, defective: np.ndarray, *, max_escape: float) -> float:
    """The lowest t whose *empirical* escape rate is <= the cap: no guarantee (for comparison only)."""
    d = np.sort(np.asarray(p_good, dtype=np.float64)[np.asarray(defective, dtype=bool)])[::-1]
    allowed = int(math.floor(max_escape * len(d)))
    if allowed >= len(d):
        return 0.0
    return float(np.nextafter(d[allowed], np.inf))  # passes exactly the `allowed` highest (barring ties)


# ---------------------------------------------------------------- review band


def review_curve(scores: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Trade-off of "review images with score < threshold": for every candidate threshold (the
    distinct scores, ascending), the review rate and the accuracy of the images left to the machine.
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    order = np.argsort(scores, kind="stable")
    s, c = scores[order], correct[order]
    n = len(s)
    thresholds = np.unique(s)
    reviewed = np.searchsorted(s, thresholds, side="left")  # count of scores < threshold
    suffix_correct = np.append(np.cumsum(c[::-1])[::-1], 0)
    auto = n - reviewed
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(auto > 0, suffix_correct[reviewed] / np.maximum(auto, 1), np.nan)
    return {"threshold": thresholds, "review_rate": reviewed / max(n, 1), "auto_accuracy": accuracy}


def review_threshold(
    scores: np.ndarray, correct: np.ndarray, *, review_rate: float | None = None, target_purity: float | None = None
) -> dict[str, Any]:
    """The review-band threshold meeting a target review rate OR a target purity on calibration data.

    ``review_rate``: the largest threshold sending at most that fraction to review (ties may make the
    achieved rate a little lower). ``target_purity``: the smallest threshold (least review) whose
    auto-decided images reach that accuracy; refused when no threshold does. Purity is empirical here
    (no finite-sample guarantee), unlike the escape cap.
    """
    if (review_rate is None) == (target_purity is None):
        raise CalibrationError("give exactly one of review_rate and target_purity")
    curve = review_curve(scores, correct)
    n = len(np.asarray(scores))
    if n == 0:
        raise CalibrationError("no calibration images for the review band")
    if review_rate is not None:
        if not 0 <= review_rate < 1:
            raise CalibrationError(f"review_rate must be in [0, 1), got {review_rate}")
        ok = np.nonzero(curve["review_rate"] <= review_rate + 1e-12)[0]
        j = int(ok[-1])  # the smallest score always qualifies (nothing below it)
        target = {"review_rate": float(review_rate)}
    else:
        if not 0 < target_purity <= 1:
            raise CalibrationError(f"target_purity must be in (0, 1], got {target_purity}")
        ok = np.nonzero(curve["auto_accuracy"] >= target_purity - 1e-12)[0]
        if ok.size == 0:
            best = float(np.nanmax(curve["auto_accuracy"]))
            raise CalibrationError(
                f"no review threshold reaches purity {target_purity:g} on the calibration images "
                f"(best: {best:.4f} when reviewing nearly everything)"
            )
        j = int(ok[0])
        target = {"target_purity": float(target_purity)}
    threshold = float(curve["threshold"][j])
    if j == 0:
        threshold = 0.0  # nothing reviewed: don't let a future image below the calibration minimum go to review
    return {
        "threshold": threshold, **target,
        "achieved_review_rate": float(curve["review_rate"][j]), "auto_accuracy": float(curve["auto_accuracy"][j]),
        "n": n,
    }
