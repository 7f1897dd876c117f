"""What a policy does to a labelled set: escapes, overkill, review load, accuracy and cost of auto decisions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from defectscope.decision.costs import DRIFT, expected_costs, penalties, penalty_weighted_accuracy
from defectscope.decision.policy import REVIEW, Policy, PolicyError, decide
from defectscope.decision.thresholds import cp_interval
from defectscope.metrics import classification_metrics


def _rate(k: int, n: int, confidence: float) -> dict[str, Any]:
    return {
        "rate": float(k / n) if n else None, "count": int(k), "of": int(n),
        "interval": list(cp_interval(k, n, confidence)), "confidence": confidence,
    }


def apply_policy_metrics(
    y_true: Sequence[int] | Sequence[str] | np.ndarray,
    probs: np.ndarray,
    policy: Policy,
    classes: Sequence[str],
    *,
    drift_score: np.ndarray | None = None,
    confidence: float | None = None,
    inputs: Literal["auto", "logits", "probs"] = "auto",
) -> dict[str, Any]:
    """Metrics after the policy, for evaluate's before/after report.

    ``y_true``: class indices or class names; ``probs``: the model's logits or uncalibrated softmax
    probabilities (the policy's temperature is applied by :func:`decide`; ``inputs`` says which, as
    there). Rates carry two-sided Clopper-Pearson intervals at ``confidence`` (default: the escape
    guarantee's, else 0.95).

    Automation = images decided without a person (neither REVIEW nor Drift) / all images. Escape = defective
    decided GOOD / all defective (with a three-way policy: its critical classes; ``nuisance_escape`` the
    others); overkill = GOOD decided as a defect automatically / all GOOD. REVIEW and Drift images are
    neither: they count in ``review_rate`` / ``drift_rate``, and accuracy,
    macro-F1, cost and PWA cover the auto-decided images only (``n_auto``). With a REJECT purity in the policy,
    ``reject_purity`` holds each gated class's purity (images truly it / images decided as it).
    """
    classes = list(classes)
    if classes != policy.classes:
        raise PolicyError(f"classes {classes} differ from the policy's {policy.classes}")
    if confidence is None:
        confidence = float((policy.escape_guarantee or policy.three_way or {}).get("confidence", 0.95))
    y = np.asarray(y_true)
    names = np.array(classes, dtype=object)[y.astype(int)] if y.dtype.kind in "iu" else y.astype(object)
    dec = decide(probs, policy, drift_score=drift_score, inputs=inputs)
    labels = dec.labels
    auto = dec.auto
    n = len(labels)
    out: dict[str, Any] = {
        "n": n, "n_auto": int(auto.sum()),
        "review_rate": float(np.mean(labels == REVIEW)) if n else 0.0,
        "drift_rate": float(np.mean(labels == DRIFT)) if n else 0.0,
        "decisions": {str(k): int(v) for k, v in zip(*np.unique(labels.astype(str), return_counts=True), strict=True)},
        "temperature": policy.temperature,
    }
    out["automation"] = _rate(int(auto.sum()), n, confidence)
    if policy.good_class is not None:
        good = names == policy.good_class
        passed = labels == policy.good_class
        critical = (policy.three_way or {}).get("critical_classes")
        at_risk = np.isin(names, critical) if critical else ~good
        out["escape"] = _rate(int((at_risk & passed).sum()), int(at_risk.sum()), confidence)
        if critical and (~good & ~at_risk).any():
            nuisance = ~good & ~at_risk
            out["nuisance_escape"] = _rate(int((nuisance & passed).sum()), int(nuisance.sum()), confidence)
        out["overkill"] = _rate(int((good & auto & ~passed).sum()), int(good.sum()), confidence)
    purity = (policy.three_way or {}).get("reject_purity")
    if purity:
        out["reject_purity"] = reject_purity_rates(names, labels, purity, confidence)
    if auto.any():
        index = {c: i for i, c in enumerate(classes)}
        m = classification_metrics(
            np.array([index[v] for v in names[auto]]), np.array([index[v] for v in labels[auto]]), classes
        )
        out["auto"] = {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "worst_class",
                                         "worst_class_f1", "confusion_matrix")}
    else:
        out["auto"] = None
    if policy.cost_matrix is not None and auto.any():
        options, e = expected_costs(dec.probs[auto], policy.cost_matrix, classes, allow_drift=False)
        col = np.array([options.index(d) for d in labels[auto]])
        out["expected_cost_per_image"] = float(e[np.arange(len(col)), col].mean())
        out["realised_cost_per_image"] = float(penalties(names[auto], labels[auto], policy.cost_matrix).mean())
        out["pwa"] = penalty_weighted_accuracy(names[auto], labels[auto], policy.cost_matrix)
    return out


def reject_purity_rates(names: np.ndarray, labels: np.ndarray, purity: dict[str, Any], confidence: float
                        ) -> dict[str, Any]:
    """Per class with a purity target: the share of the images decided as it (automatic REJECTs) that truly are
    it, with its interval, beside the target and the certified threshold."""
    out = {}
    for c, entry in purity["classes"].items():
        decided = labels == c
        out[c] = {"target": entry["target"], "threshold": entry["threshold"],
                  **_rate(int((decided & (names == c)).sum()), int(decided.sum()), confidence)}
    return out
