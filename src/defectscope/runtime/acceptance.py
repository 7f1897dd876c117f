"""The test a runtime candidate must pass before ``--runtime auto`` may run the line on it.

A candidate (runtime, precision, layout, views) is run on the model's check set (``model.check.npz``: the
run's test images with labels, and Drift images) and judged by what its *own* outputs do under the model's
policy, not by how many decisions differ from fp32:

* **caps**: the policy's escape cap (critical defective images PASSed) and overkill cap (good images
  REJECTed) still hold on the check set. Where the fp32 reference itself is above a cap on these images, the
  candidate may not be worse than the reference (and the record says so);
* **accuracy** (argmax against the labels) at most ``MAX_ACCURACY_DROP`` below fp32's;
* **Drift AUROC** (test images against Drift images) at most ``MAX_DRIFT_AUROC_DROP`` below fp32's;
* **automation** (images decided without a person) at most ``MAX_AUTOMATION_DROP`` below fp32's: fewer
  views may hold the caps by sending more images to REVIEW, which costs people;
* **no far flip**: every decision that differs from fp32 is listed with how far the fp32 image was from the
  threshold it crossed, in log-odds of the escape score (``log(s / (1 - s))``, where 0.983 and 0.99 are 0.53
  apart instead of 0.007), of a REJECT class's purity score (for its purity threshold) or in log of the Drift
  score. A flip farther than ``MAX_FLIP_LOG_ODDS`` from every threshold is a change of behaviour, not rounding,
  and refuses the candidate.

numpy only (the policy's :func:`~defectscope.decision.policy.decide`): this runs on a line PC.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from defectscope import labels
from defectscope.decision.escape_scores import goodness
from defectscope.decision.policy import Policy, calibrated_probs, decide, purity_scores

MAX_ACCURACY_DROP = 0.005
MAX_DRIFT_AUROC_DROP = 0.005
MAX_AUTOMATION_DROP = 0.02
MAX_FLIP_LOG_ODDS = 1.0  # e = 2.7x in odds: P(good) 0.85 -> 0.68 or 0.94
LISTED_FLIPS = 50  # differing decisions listed in the record (all are counted)
EPS = 1e-12


def rules() -> dict[str, float]:
    return {"max_accuracy_drop": MAX_ACCURACY_DROP, "max_drift_auroc_drop": MAX_DRIFT_AUROC_DROP,
            "max_automation_drop": MAX_AUTOMATION_DROP, "max_flip_log_odds_from_threshold": MAX_FLIP_LOG_ODDS,
            "caps": "escape and overkill caps of the policy hold on the check set (or no worse than fp32's)"}


def log_odds(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def auroc(normal: np.ndarray, drift: np.ndarray) -> float | None:
    """AUROC with Drift positive (ties count half), numpy only."""
    if len(normal) == 0 or len(drift) == 0:
        return None
    big = np.finfo(np.float64).max
    s = np.nan_to_num(np.concatenate([normal, drift]).astype(np.float64), nan=big, posinf=big, neginf=-big)
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    n1 = len(drift)
    return float((ranks[len(normal):].sum() - n1 * (n1 + 1) / 2) / (n1 * len(normal)))


def thresholds(policy: Policy) -> list[tuple[str, float]]:
    """(name, threshold on the escape score) of every escape-score threshold the policy has."""
    if policy.three_way is not None:
        return [(name, float(policy.three_way[key])) for name, key in (("pass", "pass_threshold"),
                                                                        ("reject", "reject_threshold"))
                if policy.three_way.get(key) is not None]
    if policy.escape_threshold is not None:
        return [("escape", float(policy.escape_threshold))]
    return []


def caps(policy: Policy) -> dict[str, float]:
    """The caps the policy was fitted under: {"escape": cap, "overkill": cap} (those it has)."""
    out: dict[str, float] = {}
    if policy.three_way is not None:
        for side in ("escape", "overkill"):
            check = policy.three_way.get(side) or {}
            if check.get("cap") is not None and check.get("threshold") is not None:
                out[side] = float(check["cap"])
    elif policy.escape_threshold is not None and policy.escape_guarantee:
        cap = policy.escape_guarantee.get("max_escape", policy.escape_guarantee.get("cap"))
        if cap is not None:
            out["escape"] = float(cap)
    return out


def rates(decisions: list[str], y: np.ndarray, policy: Policy) -> dict[str, Any]:
    """Escape, overkill and automation of ``decisions`` on labelled images (class indices ``y``)."""
    names = np.asarray(policy.classes, dtype=object)[y]
    verdict = np.array([labels.verdict_of(d, policy.good_class) for d in decisions], dtype=object)
    good = names == policy.good_class
    critical = (policy.three_way or {}).get("critical_classes") or [c for c in policy.classes
                                                                    if c != policy.good_class]
    crit = np.isin(names, list(critical))
    auto = np.isin(verdict, [labels.PASS, labels.REJECT])
    return {"escape": [int((crit & (verdict == labels.PASS)).sum()), int(crit.sum())],
            "overkill": [int((good & (verdict == labels.REJECT)).sum()), int(good.sum())],
            "automation": float(auto.mean()) if len(auto) else None}


def _rate(pair: list[int]) -> float:
    return pair[0] / pair[1] if pair[1] else 0.0


def purity_gap(probs: np.ndarray, a: str, b: str, policy: Policy) -> float | None:
    """Log-odds distance of one image's purity score to the purity threshold of the gated class one of its two
    decisions names (None: neither is a gated class with a threshold). A margin in [-1, 1] is read as
    (1 + margin) / 2 so it has log-odds too."""
    purity = (policy.three_way or {}).get("reject_purity")
    gated = [c for c in (a, b) if purity and (purity["classes"].get(c) or {}).get("threshold") is not None]
    if not gated:
        return None
    c = gated[0]
    q = float(purity_scores(probs[None, :], policy.classes, np.array([c], dtype=object), purity["score"])[0])
    t = float(purity["classes"][c]["threshold"])
    if purity["score"] == "margin":
        q, t = (1 + q) / 2, (1 + t) / 2
    return round(abs(float(log_odds(q)) - float(log_odds(t))), 4)


def flips(d32: list[str], d: list[str], probs32: np.ndarray, drift32: np.ndarray, policy: Policy,
          drift_on: bool) -> list[dict[str, Any]]:
    """Every image whose decision differs, with the fp32 image's log-odds distance to the nearest threshold
    (escape score) and its log distance to the Drift threshold; sorted farthest first."""
    calibrated = calibrated_probs(probs32, policy.temperature, "probs")
    score = (goodness(calibrated, policy.escape_score, policy.classes.index(policy.good_class), policy.class_ranks)
             if policy.good_class is not None and thresholds(policy) else None)
    out = []
    for i in np.nonzero([a != b for a, b in zip(d32, d, strict=True)])[0]:
        row: dict[str, Any] = {"image": int(i), "fp32": d32[i], "candidate": d[i]}
        distances = []
        if score is not None:
            lo = float(log_odds(score[i]))
            near = min(thresholds(policy), key=lambda t: abs(lo - float(log_odds(t[1]))))
            row.update({"escape_score": round(float(score[i]), 6), "nearest_threshold": near[0],
                        "log_odds_from_threshold": round(abs(lo - float(log_odds(near[1]))), 4)})
            distances.append(row["log_odds_from_threshold"])
        gap = purity_gap(calibrated[i], d32[i], d[i], policy)
        if gap is not None:  # a REJECT class crossing its purity threshold (REJECT as c <-> REVIEW)
            row["log_odds_from_purity_threshold"] = gap
            distances.append(gap)
        if drift_on and policy.drift_threshold:
            gap = abs(np.log(max(float(drift32[i]), EPS)) - np.log(max(float(policy.drift_threshold), EPS)))
            row["log_from_drift_threshold"] = round(float(gap), 4)
            if labels.DRIFT in (d32[i], d[i]):
                distances = [row["log_from_drift_threshold"]]
        row["distance"] = min(distances) if distances else None
        out.append(row)
    return sorted(out, key=lambda r: -(r["distance"] or 0.0))


def screen(probs: np.ndarray, drift: np.ndarray, ref: dict[str, np.ndarray], policy_dict: dict[str, Any] | None,
           classes: list[str]) -> dict[str, Any]:
    """The no-far-flip rule on the first ``len(probs)`` check images only (the images a candidate's speed was
    measured on, so its outputs there cost nothing more): ``{"images", "far", "refused"?}``.

    Exact, not a sample estimate: the rule is per image, so a far flip among these images is a far flip of the
    full check, which refuses the candidate whatever the other images do. A screen that finds none proves
    nothing; the full :func:`check` still decides.
    """
    n = len(probs)
    sub = {"labels": ref["labels"][:n], "fp32_probabilities": ref["fp32_probabilities"][:n],
           "fp32_drift": ref["fp32_drift"][:n]}
    listed = _differing(probs, drift, sub, policy_dict, classes)
    far = [f for f in listed if f["distance"] is None or f["distance"] > MAX_FLIP_LOG_ODDS]
    out: dict[str, Any] = {"images": n, "differing": len(listed), "far": len(far)}
    if far:
        out["refused"] = (f"pre-screen: {len(far)} of the first {n} check images change decision farther than "
                          f"{MAX_FLIP_LOG_ODDS} log-odds from every threshold (farthest {far[0]['distance']})")
    return out


def _differing(probs: np.ndarray, drift: np.ndarray, ref: dict[str, np.ndarray], policy_dict: dict[str, Any] | None,
               classes: list[str]) -> list[dict[str, Any]]:
    """The decisions of ``probs`` that differ from fp32's on the check images, farthest first (see :func:`flips`)."""
    p32 = ref["fp32_probabilities"]
    if policy_dict:
        policy = Policy.from_dict(policy_dict)
        drift_on = bool(policy.drift) and policy.drift_threshold is not None
        run = lambda p, d: [str(v) for v in decide(p, policy, inputs="probs",  # noqa: E731
                                                   drift_score=d if drift_on else None).labels]
        return flips(run(p32, ref["fp32_drift"]), run(probs, drift), p32, ref["fp32_drift"], policy, drift_on)
    d32, d = [classes[i] for i in p32.argmax(1)], [classes[i] for i in probs.argmax(1)]
    top2 = np.log(np.clip(np.sort(p32, axis=1)[:, -2:], EPS, None))  # argmax: the top two's log ratio
    return sorted(({"image": int(i), "fp32": d32[i], "candidate": d[i],
                    "distance": round(float(top2[i, 1] - top2[i, 0]), 4)}
                   for i in range(len(d)) if d[i] != d32[i]), key=lambda r: -r["distance"])


def check(probs: np.ndarray, drift: np.ndarray, drift_on_drift: np.ndarray, ref: dict[str, np.ndarray],
          policy_dict: dict[str, Any] | None, classes: list[str]) -> dict[str, Any]:
    """The acceptance test of one candidate's outputs on the check set (see the module doc)."""
    y, p32 = ref["labels"], ref["fp32_probabilities"]
    out: dict[str, Any] = {"images": int(len(y)), "drift_images": int(len(ref["drift_images"]))}
    if len(y) == 0:
        out.update({"accepted": False, "refused": "empty check set"})
        return out
    acc32, acc = float((p32.argmax(1) == y).mean()), float((probs.argmax(1) == y).mean())
    scored = np.ptp(np.concatenate([ref["fp32_drift"], ref["fp32_drift_on_drift"]])) > 0
    au32 = auroc(ref["fp32_drift"], ref["fp32_drift_on_drift"]) if scored else None
    au = auroc(drift, drift_on_drift) if scored else None
    out.update({"accuracy_fp32": acc32, "accuracy": acc, "accuracy_change": acc - acc32,
                "max_abs_diff_probabilities": float(np.abs(probs - p32).max()),
                "drift_auroc_fp32": au32, "drift_auroc": au,
                "drift_auroc_change": None if au is None or au32 is None else au - au32})
    reasons = []
    if acc32 - acc > MAX_ACCURACY_DROP:
        reasons.append(f"accuracy {acc:.4f} vs {acc32:.4f} fp32")
    if au is not None and au32 is not None and au32 - au > MAX_DRIFT_AUROC_DROP:
        reasons.append(f"Drift AUROC {au:.4f} vs {au32:.4f} fp32")
    if policy_dict:
        policy = Policy.from_dict(policy_dict)
        drift_on = bool(policy.drift) and policy.drift_threshold is not None
        run = lambda p, d: [str(v) for v in decide(p, policy, inputs="probs",  # noqa: E731
                                                   drift_score=d if drift_on else None).labels]
        d32, d = run(p32, ref["fp32_drift"]), run(probs, drift)
        r32, r = rates(d32, y, policy), rates(d, y, policy)
        out["caps"] = {}
        for side, cap in caps(policy).items():
            held = _rate(r[side]) <= cap or (_rate(r32[side]) > cap and r[side][0] <= r32[side][0])
            out["caps"][side] = {"cap": cap, "candidate": r[side], "fp32": r32[side], "held": bool(held),
                                 **({"note": "fp32 is above the cap on the check set too"}
                                    if _rate(r32[side]) > cap else {})}
            if not held:
                reasons.append(f"{side} {r[side][0]}/{r[side][1]} breaks the {cap:.1%} cap (fp32 {r32[side][0]})")
        out.update({"automation_fp32": r32["automation"], "automation": r["automation"]})
        if r["automation"] is not None and r32["automation"] - r["automation"] > MAX_AUTOMATION_DROP:
            reasons.append(f"automation {r['automation']:.3f} vs {r32['automation']:.3f} fp32")
        listed = flips(d32, d, p32, ref["fp32_drift"], policy, drift_on)
    else:
        d32, d = [classes[i] for i in p32.argmax(1)], [classes[i] for i in probs.argmax(1)]
        top2 = np.log(np.clip(np.sort(p32, axis=1)[:, -2:], EPS, None))  # argmax: the top two's log ratio
        listed = sorted(({"image": int(i), "fp32": d32[i], "candidate": d[i],
                          "distance": round(float(top2[i, 1] - top2[i, 0]), 4)}
                         for i in range(len(d)) if d[i] != d32[i]), key=lambda r: -r["distance"])
    out["decisions_changed"] = len(listed) / len(y)
    out["decision_agreement"] = 1.0 - out["decisions_changed"]
    far = [f for f in listed if f["distance"] is None or f["distance"] > MAX_FLIP_LOG_ODDS]
    if far:
        reasons.append(f"{len(far)} decisions differ on images farther than {MAX_FLIP_LOG_ODDS} log-odds from "
                       "every threshold")
    out["differing"] = {"count": len(listed), "farthest": listed[0]["distance"] if listed else None,
                        "far": len(far), "listed": listed[:LISTED_FLIPS]}
    out["accepted"] = not reasons
    if reasons:
        out["refused"] = "; ".join(reasons)
    return out
