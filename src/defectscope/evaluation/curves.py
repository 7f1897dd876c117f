"""The numbers behind the report's curves: one-vs-rest ROC and precision-recall per class, the reliability
diagram and expected calibration error, and escape/overkill of the plain argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from defectscope.decision.calibrate import default_good_class
from defectscope.decision.thresholds import cp_interval

ECE_BINS = 15


def curve_metrics(
    probs: np.ndarray, y_true: np.ndarray, classes: Sequence[str]
) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Any]]]]:
    """One-vs-rest ROC and precision-recall per class: (summary numbers, curve arrays for plotting).

    A class with no positives or no negatives among ``y_true`` has no defined curve: its numbers are
    None and ``skipped[class]`` says why. Macro averages cover the classes that have a curve.
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    y_true = np.asarray(y_true, dtype=int)
    roc_auc: dict[str, float | None] = {}
    ap: dict[str, float | None] = {}
    pr_auc: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    curves: dict[str, dict[str, dict[str, Any]]] = {"roc": {}, "pr": {}}
    for k, name in enumerate(classes):
        positive = y_true == k
        if not positive.any() or positive.all():
            roc_auc[name] = ap[name] = pr_auc[name] = None
            skipped[name] = "no test images of this class" if not positive.any() else "no images of other classes"
            continue
        score = probs[:, k]
        fpr, tpr, _ = roc_curve(positive, score)
        precision, recall, _ = precision_recall_curve(positive, score)
        roc_auc[name] = float(auc(fpr, tpr))
        ap[name] = float(average_precision_score(positive, score))
        pr_auc[name] = float(auc(recall, precision))
        curves["roc"][name] = {"fpr": fpr, "tpr": tpr, "auc": roc_auc[name]}
        curves["pr"][name] = {"precision": precision, "recall": recall, "ap": ap[name]}

    def mean(d: dict[str, float | None]) -> float | None:
        vals = [v for v in d.values() if v is not None]
        return float(np.mean(vals)) if vals else None

    summary = {
        "roc_auc": roc_auc, "average_precision": ap, "pr_auc": pr_auc,
        "macro_roc_auc": mean(roc_auc), "macro_average_precision": mean(ap), "macro_pr_auc": mean(pr_auc),
        "curves_skipped": skipped,
    }
    return summary, curves


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Equal-width bins over the top-class confidence, each ``(lower, upper]`` (the first also holds 0).

    Per bin: image count, accuracy and mean confidence (None for an empty bin).
    """
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true, dtype=int)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted on the inner edges with side="left" puts a confidence equal to an edge in the bin
    # below it, i.e. (lower, upper], without the float trouble of ceil(conf * n_bins).
    which = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(which, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct.astype(float), minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    return {
        "lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": count.astype(int).tolist(),
        "accuracy": [float(a / c) if c else None for a, c in zip(acc_sum, count, strict=True)],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of (bin share of images) x |accuracy - mean confidence|, top-class confidence."""
    return _ece(reliability_bins(probs, y_true, n_bins))


def _ece(bins: dict[str, list]) -> float:
    n = sum(bins["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"],
                                                           strict=True) if c)) if n else 0.0


def report_metrics(probs: np.ndarray, y_true: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The curve and calibration numbers of the report (the content of ``report_metrics.json``, minus
    the Grad-CAM note that :func:`write_report` adds)."""
    summary, _ = curve_metrics(probs, y_true, classes)
    bins = reliability_bins(probs, y_true)
    summary["ece"] = _ece(bins)
    summary["ece_bins"] = ECE_BINS
    summary["reliability"] = bins
    return summary


def raw_escape(probs: np.ndarray, y_true: np.ndarray, classes: Sequence[str]) -> dict[str, Any] | None:
    """Escape and overkill of the plain argmax decision, when a class is called GOOD (no policy needed)."""

    good = default_good_class(classes)
    if good is None:
        return None
    g = list(classes).index(good)
    pred = probs.argmax(axis=1)
    is_good = y_true == g
    out: dict[str, Any] = {"good_class": good}
    for key, mask, event in (("escape", ~is_good, pred == g), ("overkill", is_good, pred != g)):
        k, n = int((mask & event).sum()), int(mask.sum())
        out[key] = {"rate": k / n if n else None, "count": k, "of": n, "interval": list(cp_interval(k, n, 0.95)),
                    "confidence": 0.95}
    return out
