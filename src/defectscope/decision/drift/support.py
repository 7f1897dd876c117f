"""What a small set of normal calibration images can honestly promise about Drift false flags.

The split-conformal threshold (:func:`defectscope.decision.drift.fit.calibrate_drift_threshold`) flags a new
normal image with probability at most ``alpha`` only if ``k = ceil((n + 1)(1 - alpha)) <= n``, i.e. with
``n >= 1/alpha - 1`` normal images. With fewer, the best it can do is the largest calibration score as the
threshold, which guarantees ``1/(n + 1)`` (the new image is the largest of ``n + 1`` exchangeable scores
with probability at most ``1/(n + 1)``). This module says so in numbers, for the log and for policy.json,
instead of a bare refusal. Pure numpy/math (the deployed side reads the result from policy.json).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# (n + 1)(1 - alpha) can land a hair above an integer in floating point (190.00000000000003 for n = 199,
# alpha = 0.05); this keeps ceil from rounding it up to the next one.
_EPS = 1e-9


def images_needed(rate: float) -> int:
    """Normal calibration images needed to guarantee a false-flag rate of ``rate``: ceil(1/rate - 1)."""
    if not 0 < rate < 1:
        raise ValueError(f"the false-flag rate must be in (0, 1), got {rate}")
    return max(math.ceil(1 / rate - 1 - _EPS), 1)


def guaranteed_rate(n: int) -> float:
    """The lowest false-flag rate ``n`` normal calibration images can guarantee: 1/(n + 1)."""
    if n < 0:
        raise ValueError(f"the number of calibration images must be >= 0, got {n}")
    return 1.0 / (n + 1)


def rate_support(n: int, rate: float) -> dict[str, Any]:
    """What ``n`` normal images support for a requested false-flag ``rate`` (JSON-able, for policy.json).

    ``supported``: whether the requested rate can be guaranteed; ``guaranteed_rate``: the rate that is
    guaranteed (the requested one when supported, else 1/(n + 1)); ``images_needed``: how many normal
    images the requested rate needs; ``per_10000``: the guaranteed rate as normal parts set aside per
    10,000 (rounded), the line's wording.
    """
    need = images_needed(rate)
    supported = n >= need
    achieved = float(rate) if supported else guaranteed_rate(n)
    return {
        "requested_rate": float(rate), "n_calibration": int(n), "supported": bool(supported),
        "guaranteed_rate": achieved, "images_needed": need, "per_10000": round(achieved * 10_000),
    }


def support_message(support: dict[str, Any]) -> str:
    """One sentence for the log / error: what was asked, what the data guarantees, what it would take."""
    n, need = support["n_calibration"], support["images_needed"]
    ask, got = support["requested_rate"], support["guaranteed_rate"]
    if support["supported"]:
        return (f"{n} normal calibration images guarantee a false-flag rate of {ask:g} "
                f"({per_10000_words(ask)})")
    return (f"{n} normal calibration images cannot guarantee a false-flag rate of {ask:g}: they guarantee "
            f"{got:.3g} at best ({per_10000_words(got)}); "
            f"a rate of {ask:g} needs at least {need} normal images ({need - n} more)")


def threshold_with_support(scores_in_distribution: np.ndarray, rate: float) -> tuple[float, dict[str, Any]]:
    """(threshold, support): the split-conformal threshold for ``rate`` when ``n`` supports it, else the
    largest calibration score, which guarantees 1/(n + 1). Flag iff score > threshold, as everywhere."""
    s = np.asarray(scores_in_distribution, dtype=np.float64).reshape(-1)
    if len(s) == 0:
        raise ValueError("no in-distribution scores to set a Drift threshold on")
    if not np.isfinite(s).all():
        raise ValueError("in-distribution drift scores contain NaN or infinity")
    support = rate_support(len(s), rate)
    alpha = support["guaranteed_rate"]
    k = min(math.ceil((len(s) + 1) * (1 - alpha) - _EPS), len(s))
    return float(np.sort(s)[max(k, 1) - 1]), support


def per_10000_words(rate: float) -> str:
    """A false-flag rate in the line's words: 'about N of every 10,000 normal parts set aside'."""
    n = rate * 10_000
    shown = f"{n:.0f}" if n >= 10 else f"{n:.1f}".rstrip("0").rstrip(".")
    return f"about {shown} of every 10,000 normal parts set aside"


def per_day_words(rate: float, per_day: int = 10_000) -> str:
    """A false-flag rate as a quality engineer counts it: 'about N normal parts a day set aside per 10,000'
    (a line making ``per_day`` normal parts a day)."""
    n = rate * per_day
    shown = f"{n:.0f}" if n >= 10 else f"{n:.1f}".rstrip("0").rstrip(".")
    return f"about {shown} normal parts a day set aside per {per_day:,}"
