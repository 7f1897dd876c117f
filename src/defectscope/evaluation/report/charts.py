"""The report's chart sections: confusion matrix, ROC/PR curves, calibration, training curves, review trade-off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defectscope.decision.policy import calibrated_probs, review_scores
from defectscope.decision.thresholds import review_curve
from defectscope.evaluation import plots
from defectscope.evaluation.curves import ECE_BINS
from defectscope.evaluation.report.html import esc, img, num, pct, section
from defectscope.evaluation.report.summary import auc_table
from defectscope.rundir import HISTORY


def confusion(metrics: dict[str, Any], classes: list[str], plots_dir: Path) -> str:
    cm = np.asarray(metrics["confusion_matrix"])
    body = []
    for normalized, name in ((False, "confusion_counts"), (True, "confusion_normalized")):
        data = np.asarray(metrics["confusion_matrix_normalized"]) if normalized else cm
        png = plots.save(plots.confusion_matrix(data, classes, normalized=normalized), plots_dir / f"{name}.png")
        body.append(img(png, name))
    return section(
        "3. Confusion matrix", "each row is a true class, each column what the model said. The diagonal is right; "
        "everything else is a mix-up. In the row-normalised matrix a row sums to 1, so a row's off-diagonal "
        "cells are that class's error rates.", "\n".join(body))


def roc_pr(curves: dict[str, Any], numbers: dict[str, Any], plots_dir: Path) -> str:
    roc_png = plots.save(plots.roc_curves(curves["roc"]), plots_dir / "roc.png")
    pr_png = plots.save(plots.pr_curves(curves["pr"]), plots_dir / "pr.png")
    return section(
        "4. ROC and precision-recall curves (one class against the rest)", "each curve shows what a threshold on "
        "that class's probability trades off. ROC AUC 1.0 separates the class perfectly, 0.5 is guessing. "
        "Average precision is the more honest figure for rare classes: it drops when many false alarms come "
        "with each hit.", img(roc_png, "ROC curves") + img(pr_png, "precision-recall curves") + auc_table(numbers))


def calibration(numbers: dict[str, Any], plots_dir: Path) -> str:
    rel_png = plots.save(plots.reliability(numbers["reliability"], numbers["ece"]), plots_dir / "reliability.png")
    return section(
        "5. Calibration", f"images are grouped by the model's confidence in its answer ({ECE_BINS} bins); in a "
        "well-calibrated model, answers given with 90% confidence are right 90% of the time (bars on the "
        "diagonal). The expected calibration error (ECE) is the average gap, weighted by images per bin. "
        "Thresholds on confidence (review band, escape cap) rely on this.",
        f"<p>ECE: <b>{num(numbers['ece'])}</b></p>" + ece_caution(sum(numbers["reliability"]["count"]))
        + img(rel_png, "reliability diagram"))


ECE_MIN_IMAGES = 20 * ECE_BINS  # about 20 images a bin before the binned gaps mean much


def ece_caution(n: int) -> str:
    """A note when the ECE rests on too few images to read: with a handful per bin the gap is mostly noise."""
    if n >= ECE_MIN_IMAGES:
        return ""
    return (f'<p class="note">Caution: {n} images in {ECE_BINS} bins ({n / ECE_BINS:.1f} per bin on average); '
            f"the ECE is mostly noise below about {ECE_MIN_IMAGES} images, so read it as a rough hint, not "
            "a measurement.</p>")


def training(run: Path | None, plots_dir: Path) -> str:
    history_path = Path(run) / HISTORY if run is not None else None
    if history_path is not None and history_path.is_file():
        import pandas as pd

        history = pd.read_csv(history_path)
        png = plots.save(plots.training_curves(history), plots_dir / "training.png")
        body = img(png, "training curves")
    else:
        body = '<p class="note">No history.csv in the run directory, so no training curves.</p>'
    return section(
        "6. Training curves", "validation loss rising while training loss falls means the model starts to "
        "memorise the training images; the dashed line marks the epoch whose weights were kept.", body)


def review(probs: np.ndarray, y_true: np.ndarray, policy: Any, plots_dir: Path, extra: str = "") -> str:
    """The policy section: the review trade-off, then ``extra`` (the REJECT purity table, when there is one)."""
    temperature = float(getattr(policy, "temperature", 1.0) or 1.0)
    kind = getattr(policy, "review_score", "top") or "top"
    cal = calibrated_probs(probs, temperature, "probs")
    scores = review_scores(cal, kind)
    correct = cal.argmax(axis=1) == y_true
    body = ""
    if len(y_true):
        curve = review_curve(scores, correct)
        threshold = getattr(policy, "review_threshold", None)
        if threshold is not None:
            auto = scores >= threshold
            point = (float(1 - auto.mean()), float(correct[auto].mean()) if auto.any() else float("nan"))
            label = f"policy: review {kind} score < {threshold:.4f}"
        else:
            point, label = (0.0, float(correct.mean())), "no review band: everything decided automatically"
        png = plots.save(plots.review_tradeoff(curve, point, label), plots_dir / "review_tradeoff.png")
        note = (f"Probabilities calibrated with the policy's temperature {temperature:.3f}. " if policy is not None
                else "No decision policy: raw probabilities. ")
        body = (f"<p>{esc(note)}Operating point: review rate {pct(point[0])}, most-probable-class accuracy of the "
                f"images not reviewed {pct(point[1])} (the escape and three-way rules of a policy are not applied "
                f"here: the headline's figures are).</p>"
                + img(png, "review trade-off"))
    return section(
        "9. Review band trade-off", "sending the least confident images to a person raises the accuracy of what "
        "the machine decides alone; read off how much review buys how much accuracy.",
        (body or "<p>no images</p>") + extra)
