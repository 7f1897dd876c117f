"""Three-way decisions: PASS, REJECT or REVIEW, with escapes and overkill both capped under one guarantee.

An image whose escape score ``s`` (how good it looks, :mod:`defectscope.decision.escape_scores`) is at least
``pass_threshold`` is PASSed as the good class; one below ``reject_threshold`` is REJECTed as its most likely
defect class; the rest go to a person (REVIEW). Two rates are capped on held-out calibration images:

* escape  = critical defective images PASSed / all critical defective images (nuisance classes are reported,
  not capped), a function of ``pass_threshold`` alone, falling as it rises;
* overkill = good images REJECTed automatically / all good images, a function of ``reject_threshold`` alone,
  rising with it. A good image sent to REVIEW is not overkill: a person passes it.

**The guarantee.** With probability at least ``confidence`` over the draw of the calibration set, both true
rates are at or below their caps at once. Method: Learn-Then-Test (Angelopoulos et al. 2021) with a Bonferroni
split of the error budget ``delta = 1 - confidence`` between the two caps (``escape_share * delta`` and the rest)
and, within each cap, fixed-sequence testing along its monotone threshold: the hypotheses "true rate at t >
cap" are tested from the strictest threshold towards the most lenient with the exact binomial p-value
``P(Binomial(n, cap) <= errors)`` (the one-sided Clopper-Pearson test), and the scan stops at the first
threshold it cannot certify. Because each risk is monotone in its threshold, a false certification anywhere
in the sequence implies the test at the true critical threshold erred, so each family errs with probability
at most its share and both together with at most ``delta``. Continuing a scan past a failure would void it.

Assumptions: calibration images are exchangeable with production images, and the score was fixed before
the calibration images were looked at (temperature and score choice on the validation split). A cap whose
side cannot be certified at all (too few images even with zero errors) switches that side off: nothing is
PASSed (or REJECTed) automatically, which holds the cap trivially, and :func:`verdict_lines` says so.
Optionally each REJECT class also carries a purity threshold (:mod:`defectscope.decision.reject_purity`): a
REJECT whose defect class is not certain enough goes to REVIEW instead. Pure numpy/scipy: the deployed
predictor needs only the thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from defectscope.decision.policy import verdicts  # the rule itself, torch- and scipy-free for the line
from defectscope.decision.reject_purity import purity_lines
from defectscope.decision.thresholds import (
    CalibrationError,
    binomial_p_value,
    cp_interval,
    cp_upper,
    min_defective_for_cap,
)

METHOD = ("Learn-Then-Test: Bonferroni split of the confidence between the two caps, fixed-sequence "
          "binomial (Clopper-Pearson) tests along each cap's threshold")
__all__ = ["CapCheck", "ThreeWay", "binomial_p_value", "fit_three_way", "outcomes", "pass_threshold",
           "reject_threshold", "verdict_lines", "verdicts"]
PValue = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


@dataclass
class CapCheck:
    """One cap's evidence on the calibration images. ``threshold`` None: this side decides nothing."""

    side: str  # "escape" or "overkill"
    cap: float
    confidence: float  # this cap's share of the guarantee
    n: int  # images the rate is over (critical defective, or good)
    threshold: float | None
    errors: int  # escapes (or overkills) at the threshold on the calibration images
    empirical: float | None
    upper_bound: float | None  # one-sided Clopper-Pearson bound at this cap's confidence
    needed: int  # images this cap needs even with zero errors
    certifiable_cap: float | None  # the tightest cap these n images can certify (zero errors)

    @property
    def supported(self) -> bool:
        return self.n >= self.needed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "supported": self.supported}


def fixed_sequence(errors: np.ndarray, n: int, cap: float, delta: float, p_value: PValue = binomial_p_value) -> int:
    """Index of the last candidate certified when ``errors`` (one count per candidate, ordered strictest
    first) are tested in order at level ``delta``; -1 when the first already fails."""
    p = np.asarray(p_value(np.asarray(errors), np.full(len(errors), n), cap), dtype=np.float64).reshape(-1)
    fails = np.nonzero(p > delta)[0]
    return (int(fails[0]) if fails.size else len(p)) - 1


def _check(side: str, cap: float, confidence: float, n: int, threshold: float | None, errors: int) -> CapCheck:
    if not 0 < cap < 1:
        raise CalibrationError(f"the {side} cap must lie strictly between 0 and 1, got {cap}")
    return CapCheck(
        side=side, cap=float(cap), confidence=float(confidence), n=int(n), threshold=threshold, errors=int(errors),
        empirical=float(errors / n) if n else None,
        upper_bound=float(cp_upper(errors, n, confidence)) if n and threshold is not None else None,
        needed=min_defective_for_cap(cap, confidence),
        certifiable_cap=float(cp_upper(0, n, confidence)) if n else None,
    )


def pass_candidates(score: np.ndarray, at_risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, escapes) for "PASS iff score >= t", strictest first: just above each distinct at-risk
    score from the highest down (the lowest t of each band of equal escape count: the most automation for
    it), then 0 (pass everything)."""
    d = np.sort(np.asarray(score, dtype=np.float64)[np.asarray(at_risk, dtype=bool)])[::-1]
    levels = np.unique(d)[::-1]
    return (np.append(np.nextafter(levels, np.inf), 0.0),
            np.append(np.searchsorted(-d, -levels, side="left"), len(d)))  # at-risk scores above each level


def reject_candidates(score: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, overkills) for "REJECT iff score < t", strictest first: each distinct good score from the
    lowest up (rejecting the good images strictly below it), then just above the highest (reject all)."""
    g = np.sort(np.asarray(score, dtype=np.float64)[np.asarray(good, dtype=bool)])
    levels = np.unique(g)
    if not len(levels):
        return np.zeros(0), np.zeros(0, dtype=int)
    return (np.append(levels, np.nextafter(levels[-1], np.inf)),
            np.append(np.searchsorted(g, levels, side="left"), len(g)))  # good scores below each level


def pass_threshold(score: np.ndarray, at_risk: np.ndarray, *, cap: float, confidence: float,
                   p_value: PValue = binomial_p_value) -> CapCheck:
    """The lowest t for "PASS iff score >= t" certified to keep the escape rate of the ``at_risk`` images
    (critical defective) <= ``cap`` at ``confidence``; threshold None when none can be (or no at-risk images)."""
    return _certify("escape", *pass_candidates(score, at_risk), int(np.sum(at_risk)), cap, confidence, p_value)


def reject_threshold(score: np.ndarray, good: np.ndarray, *, cap: float, confidence: float,
                     p_value: PValue = binomial_p_value) -> CapCheck:
    """The highest t for "REJECT iff score < t" certified to keep the overkill rate (good images rejected)
    <= ``cap`` at ``confidence``; threshold None when none can be (or no good images)."""
    return _certify("overkill", *reject_candidates(score, good), int(np.sum(good)), cap, confidence, p_value)


def _certify(side: str, candidates: np.ndarray, errors: np.ndarray, n: int, cap: float, confidence: float,
             p_value: PValue) -> CapCheck:
    j = fixed_sequence(errors, n, cap, 1 - confidence, p_value) if n else -1
    if j < 0:  # nothing certified (or no evidence at all): this side decides nothing
        return _check(side, cap, confidence, n, None, 0)
    return _check(side, cap, confidence, n, float(candidates[j]), int(errors[j]))


@dataclass
class ThreeWay:
    """The two thresholds and their evidence (stored in policy.json as ``three_way``)."""

    pass_threshold: float | None
    reject_threshold: float | None
    escape: CapCheck
    overkill: CapCheck
    confidence: float
    escape_share: float
    critical_classes: list[str]
    nuisance_classes: list[str]
    method: str = METHOD
    notes: list[str] = field(default_factory=list)
    reject_purity: dict[str, Any] | None = None  # decision.reject_purity.fit_reject_purity(); None: purity off

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["escape"], out["overkill"] = self.escape.to_dict(), self.overkill.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThreeWay:
        """From policy.json's ``three_way`` (extra keys such as ``score`` or ``verdict`` are ignored)."""
        def check(d: dict[str, Any]) -> CapCheck:
            return CapCheck(**{k: v for k, v in d.items() if k != "supported"})

        keep = {f for f in cls.__dataclass_fields__} - {"escape", "overkill"}
        return cls(escape=check(data["escape"]), overkill=check(data["overkill"]),
                   **{k: v for k, v in data.items() if k in keep})


def critical_split(classes: Sequence[str], good_class: str, critical: Sequence[str] | None
                   ) -> tuple[list[str], list[str]]:
    """(critical, nuisance) defect classes; every defect class is critical unless the engineer names some."""
    defects = [c for c in classes if c != good_class]
    if critical is None:
        return defects, []
    unknown = [c for c in critical if c not in defects]
    if unknown:
        raise CalibrationError(f"critical classes {unknown} are not defect classes of this model; "
                               f"choose from {defects}")
    if not critical:
        raise CalibrationError("name at least one critical class (or leave it out: every defect class is critical)")
    return [c for c in defects if c in critical], [c for c in defects if c not in critical]


def fit_three_way(score: np.ndarray, names: np.ndarray, classes: Sequence[str], good_class: str, *,
                  max_escape: float, max_overkill: float, confidence: float = 0.95, escape_share: float = 0.5,
                  critical: Sequence[str] | None = None, p_value: PValue = binomial_p_value) -> ThreeWay:
    """The PASS and REJECT thresholds for calibration ``score`` (N,) with true class ``names`` (N,).

    ``escape_share`` of the error budget ``1 - confidence`` goes to the escape cap, the rest to overkill.
    When the two certified thresholds cross (the reject side could reject above the pass threshold), the
    policy needs no review band: both are set to the pass threshold, which holds both caps.
    """
    if not 0 < confidence < 1 or not 0 < escape_share < 1:
        raise CalibrationError("confidence and escape_share must lie strictly between 0 and 1")
    names = np.asarray(names, dtype=object)
    crit, nuisance = critical_split(classes, good_class, critical)
    delta = 1 - confidence
    esc = pass_threshold(score, np.isin(names, crit), cap=max_escape, confidence=1 - escape_share * delta,
                         p_value=p_value)
    ovk = reject_threshold(score, names == good_class, cap=max_overkill,
                           confidence=1 - (1 - escape_share) * delta, p_value=p_value)
    t_pass, t_reject = esc.threshold, ovk.threshold
    notes = []
    if t_pass is not None and t_reject is not None and t_reject > t_pass:
        notes.append("the certified thresholds cross: no review band is needed, both set to the PASS threshold")
        t_reject = t_pass
    return ThreeWay(pass_threshold=t_pass, reject_threshold=t_reject, escape=esc, overkill=ovk,
                    confidence=float(confidence), escape_share=float(escape_share), critical_classes=crit,
                    nuisance_classes=nuisance, notes=notes)


def _rate(k: int, n: int, confidence: float) -> dict[str, Any]:
    return {"rate": float(k / n) if n else None, "count": int(k), "of": int(n),
            "interval": list(cp_interval(k, n, confidence)), "confidence": confidence}


def outcomes(verdict: np.ndarray, names: np.ndarray, good_class: str, critical: Sequence[str],
             *, confidence: float = 0.95, automatic: np.ndarray | None = None) -> dict[str, Any]:
    """What three-way verdicts do to labelled images: automation, review, escape (critical and nuisance),
    overkill, each with a two-sided Clopper-Pearson interval. ``automatic`` (default: verdict != REVIEW) lets a
    Drift flag count as not automatic."""
    verdict, names = np.asarray(verdict, dtype=object), np.asarray(names, dtype=object)
    auto = verdict != "REVIEW" if automatic is None else np.asarray(automatic, dtype=bool)
    n = len(verdict)
    good = names == good_class
    crit = np.isin(names, list(critical))
    nuisance = ~good & ~crit
    passed, rejected = verdict == "PASS", verdict == "REJECT"
    return {
        "n": n,
        "automation": _rate(int(auto.sum()), n, confidence),
        "review": _rate(int((~auto).sum()), n, confidence),
        "escape": _rate(int((passed & crit).sum()), int(crit.sum()), confidence),
        "nuisance_escape": _rate(int((passed & nuisance).sum()), int(nuisance.sum()), confidence),
        "overkill": _rate(int((rejected & good).sum()), int(good.sum()), confidence),
        "good_automated": _rate(int((passed & good).sum()), int(good.sum()), confidence),
        "defective_automated": _rate(int((rejected & ~good).sum()), int((~good).sum()), confidence),
    }


def verdict_lines(tw: ThreeWay, result: dict[str, Any] | None = None, *, low_automation: float = 0.5) -> list[str]:
    """What the data supports, in words a quality engineer reads: one line per cap, then a verdict."""
    lines = []
    for check, who in ((tw.escape, "critical defective"), (tw.overkill, "good")):
        name = "escape" if check.side == "escape" else "overkill"
        if not check.supported:
            lines.append(
                f"the {name} cap {check.cap:.1%} needs at least {check.needed} {who} calibration images (at "
                f"{check.confidence:.4g} confidence, its share); there are {check.n}, which can certify "
                f"{_cap_text(check.certifiable_cap)} at best: nothing is "
                f"{'passed' if name == 'escape' else 'rejected'} automatically. Label more {who} images "
                f"(a 'calib' split) or loosen the cap.")
        elif check.threshold is None:
            lines.append(f"the {name} cap {check.cap:.1%} cannot be certified by any threshold on these images: "
                         f"nothing is {'passed' if name == 'escape' else 'rejected'} automatically.")
        else:
            lines.append(f"{name} cap {check.cap:.1%}: {check.errors}/{check.n} {who} images on the wrong side "
                         f"(upper bound {check.upper_bound:.2%} at {check.confidence:.4g}); {check.n} images "
                         f"could certify caps down to {_cap_text(check.certifiable_cap)}.")
    lines += purity_lines(tw.reject_purity)
    if result is not None:
        auto = result["automation"]["rate"] or 0.0
        if auto < low_automation:
            lines.append(f"verdict: the policy decides only {auto:.0%} of images without a person; expect a review "
                         f"load of {1 - auto:.0%}. A better-separating model or more calibration images raise it.")
        else:
            lines.append(f"verdict: {auto:.0%} of images decided automatically with both caps held; "
                         f"{1 - auto:.0%} go to a person.")
    return lines


def _cap_text(cap: float | None) -> str:
    return "no cap" if cap is None else f"{cap:.1%}"
