"""Per-class purity of REJECT decisions (the fab ADC bin): a REJECT as defect class c stays automatic only where
the calibration images certify that such REJECTs are right (truly class c) at least ``target`` of the time.

The three-way rule (:mod:`defectscope.decision.three_way`) decides *whether* a part is rejected; this module
decides whether the machine may also say *which defect* it is. For each class c with a target, the threshold
``tau_c`` on the image's purity score for c (calibrated P(c), or its margin over the next most likely class) is
the lowest point of a fixed grid (:data:`GRID`, the same for every run, never read off the calibration images)
whose hypothesis "purity of the REJECTs as c with score >= tau < target" is rejected. A REJECT as c below
``tau_c`` (or every one, when no grid point is certified) goes to REVIEW: the part is still not passed, so the
escape cap is unchanged, and overkill can only fall.

**The guarantee.** With probability at least ``confidence`` over the draw of the calibration set, every class
given a threshold has a true REJECT purity at or above its target, all classes at once. Method: a Bonferroni
split of ``delta = 1 - confidence`` across the K classes with a target (``delta / K`` each), and within a class
the fallback procedure (Wiens 2003, "a fixed-sequence Bonferroni procedure"; the chain case of the graphical
tests of Bretz et al. 2009) along the grid from the strictest threshold down: each grid point owns
``delta / (K m)``, a certified point hands its level to the next, and a failure does not end the scan (the
next point starts again from its own share). Purity is not monotone in the threshold and the strictest points
often hold no image at all, so the plain fixed-sequence test of the two caps (which stops at its first failure)
would certify nothing here; the fallback procedure controls the family-wise error under any dependence, so any
certified point is valid and the lowest one (the most automation) is taken. Each test is exact: given the n
calibration REJECTs as c at or above the point, the wrong ones are Binomial(n, 1 - purity), and the p-value is
``P(Binomial(n, 1 - target) <= wrong)``.

Assumptions, beside those of the caps (exchangeable calibration and production images, scores fixed before
calibration): the REJECT threshold is set on the same calibration images (by the good images' scores) and is
taken as given here; the purity family is its own, at ``confidence``, beside the caps' (all of them together
hold with probability at least ``1 - 2 delta``). A review band (``--review-rate``) on top removes further
REJECTs, whose purity these tests do not cover. tests/test_reject_purity.py checks the guarantee on repeated
synthetic draws with every threshold refitted. Pure numpy/scipy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from defectscope.decision.policy import PURITY_SCORES
from defectscope.decision.thresholds import (
    CalibrationError,
    binomial_p_value,
    cp_interval,
    cp_upper,
    min_defective_for_cap,
)
from defectscope.labels import close_matches

# Purity-score thresholds tried, strictest first (fixed in advance: the guarantee needs a grid the calibration
# images did not choose). The last point keeps every REJECT as the class: 0 for a probability; -1 for a margin,
# which is negative when the good class is the most likely one but the part is still rejected.
GRID = (0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4,
        0.3, 0.2, 0.0)
MARGIN_GRID = (*GRID, -1.0)
METHOD = ("Bonferroni split of the confidence across the classes with a target; within a class the fallback "
          "(fixed-sequence Bonferroni) procedure along a fixed threshold grid, exact binomial tests")
ALL = "*"  # key of a target that applies to every defect class not named


@dataclass
class PurityCheck:
    """One class's REJECT purity on the calibration images. ``threshold`` None: no REJECT as it is automatic."""

    target: float
    confidence: float  # this class's share of the guarantee
    threshold: float | None
    n_rejected: int  # calibration images the three-way rule REJECTs as this class
    n: int  # of those, at or above the threshold (all of them when the threshold is None: what it would keep)
    correct: int  # of the n, truly this class
    purity: float | None  # correct / n
    interval: list[float]  # two-sided Clopper-Pearson at the policy's confidence
    lower_bound: float | None  # one-sided bound at the level the certifying test used
    needed: int  # REJECTs as this class needed to certify the target even with none wrong (at a single share)

    @property
    def supported(self) -> bool:
        return self.threshold is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "supported": self.supported}


def resolve_targets(spec: float | Mapping[str, float] | None, classes: Sequence[str], good_class: str
                    ) -> dict[str, float]:
    """{defect class: target} from a number (every defect class) or a mapping (``*``: every class not named).
    Names that are not defect classes are refused with the nearest one."""
    defects = [c for c in classes if c != good_class]
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        spec = {ALL: float(spec)}
    out = {c: float(spec[ALL]) for c in defects} if ALL in spec else {}
    for name, value in spec.items():
        if name == ALL:
            continue
        if name == good_class:
            raise CalibrationError(f"--reject-purity {name}: {name!r} is the good class; purity is set for the "
                                   f"defect classes a part is rejected as ({', '.join(defects)})")
        if name not in defects:
            raise CalibrationError(f"--reject-purity {name}: no defect class {name!r}{close_matches(name, defects)}; "
                                   f"the defect classes are {', '.join(defects)}")
        out[name] = float(value)
    for name, value in out.items():
        if not 0 < value < 1:
            raise CalibrationError(f"--reject-purity {name}={value:g}: a purity target lies strictly between 0 and 1")
    return {c: out[c] for c in defects if c in out}


def fallback_levels(p: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """(certified mask, level each hypothesis was tested at) of the fallback procedure: ``len(p)`` hypotheses in
    order, ``delta / len(p)`` each, a certified one passing its level on to the next."""
    p = np.asarray(p, dtype=np.float64)
    share = delta / len(p)
    levels, certified = np.zeros(len(p)), np.zeros(len(p), dtype=bool)
    carried = 0.0
    for i, value in enumerate(p):
        levels[i] = share + carried
        certified[i] = value <= levels[i]
        carried = levels[i] if certified[i] else 0.0
    return certified, levels


def class_purity(q: np.ndarray, right: np.ndarray, target: float, *, confidence: float, policy_confidence: float,
                 grid: Sequence[float] = GRID) -> PurityCheck:
    """The certified threshold for one class: ``q`` the purity scores of the calibration images REJECTed as it,
    ``right`` whether each truly is it; ``confidence`` this class's share of the guarantee."""
    q, right = np.asarray(q, dtype=np.float64), np.asarray(right, dtype=bool)
    g = np.asarray(grid, dtype=np.float64)
    kept = q[None, :] >= g[:, None]  # (grid, images)
    n, correct = kept.sum(axis=1), (kept & right[None, :]).sum(axis=1)
    certified, levels = fallback_levels(binomial_p_value(n - correct, n, 1 - target), 1 - confidence)
    hits = np.nonzero(certified)[0]
    j = int(hits[-1]) if hits.size else len(g) - 1  # the lowest certified point; else what "keep all" shows
    k, m = int(correct[j]), int(n[j])
    return PurityCheck(
        target=float(target), confidence=float(confidence), threshold=float(g[j]) if hits.size else None,
        n_rejected=len(q), n=m, correct=k, purity=k / m if m else None,
        interval=list(cp_interval(k, m, policy_confidence)),
        lower_bound=float(1 - cp_upper(m - k, m, 1 - levels[j])) if hits.size else None,
        needed=min_defective_for_cap(1 - target, 1 - (1 - confidence) / len(g)),
    )


def fit_reject_purity(q: np.ndarray, decided: np.ndarray, rejected: np.ndarray, names: np.ndarray,
                      targets: Mapping[str, float], *, confidence: float, score: str = "probability"
                      ) -> dict[str, Any]:
    """``three_way["reject_purity"]`` for calibration images: ``q`` each image's purity score for its
    ``decided`` class, ``rejected`` the three-way rule's REJECT mask (before this gate), ``names`` the true
    classes. The confidence is split evenly across the classes in ``targets``."""
    if score not in PURITY_SCORES:
        raise CalibrationError(f"purity score must be one of {PURITY_SCORES}, got {score!r}")
    decided, names = np.asarray(decided, dtype=object), np.asarray(names, dtype=object)
    rejected = np.asarray(rejected, dtype=bool)
    share = 1 - (1 - confidence) / max(len(targets), 1)
    grid = GRID if score == "probability" else MARGIN_GRID
    checks = {}
    for c, target in targets.items():
        mine = rejected & (decided == c)
        checks[c] = class_purity(q[mine], names[mine] == c, target, confidence=share,
                                 policy_confidence=confidence, grid=grid).to_dict()
    return {"score": score, "confidence": float(confidence), "class_confidence": float(share), "method": METHOD,
            "grid": list(grid), "classes": checks}


def purity_lines(purity: Mapping[str, Any] | None) -> list[str]:
    """One line per class with a target: the threshold and its evidence, or why REJECTs as it go to a person."""
    if not purity:
        return []
    what = "P({c})" if purity["score"] == "probability" else "the margin of {c} over the next class"
    lines = []
    for c, e in purity["classes"].items():
        head = f"REJECT purity of {c} (target {e['target']:.0%}, {e['n_rejected']} calibration REJECTs as {c})"
        if e["threshold"] is not None:
            lo, hi = e["interval"]
            rule = (f"every REJECT as {c} stays automatic" if e["n"] == e["n_rejected"] and e["threshold"] <= 0
                    else f"automatic when {what.format(c=c)} >= {e['threshold']:g}")
            lines.append(f"{head}: {rule}; {e['correct']}/{e['n']} "
                         f"right ({e['purity']:.1%}, interval {lo:.1%}-{hi:.1%}, certified lower bound "
                         f"{e['lower_bound']:.1%}); {e['n_rejected'] - e['n']} go to REVIEW.")
        elif e["n_rejected"] < e["needed"]:
            lines.append(f"{head}: the target needs at least {e['needed']} calibration REJECTs as {c} even with none "
                         f"wrong (at {e['confidence']:.4g} confidence, its share); every REJECT as {c} goes to "
                         f"REVIEW. Label more {c} images or lower its target.")
        else:
            shown = "no image" if e["purity"] is None else f"{e['purity']:.1%} ({e['correct']}/{e['n']})"
            lines.append(f"{head}: no threshold certifies it (purity of all of them {shown}); every REJECT as {c} "
                         f"goes to REVIEW (still not passed). A lower target, or a model that tells "
                         f"the defect classes apart better, automates them.")
    return lines
