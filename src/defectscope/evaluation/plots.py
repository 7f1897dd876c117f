"""Matplotlib figures for the evaluation report. Every function returns a Figure; :func:`save` writes it.

Figures only draw numbers computed elsewhere (``report.py``), so the numbers in the report's tables and
in ``report_metrics.json`` are exactly the ones plotted. The Agg backend is forced: reports are made
on headless machines and inside test runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Above this many classes cell numbers and per-curve legends stop being readable.
ANNOTATE_MAX_CLASSES = 12


def save(fig: Figure, path: Path) -> bytes:
    """Write ``fig`` as PNG to ``path``, close it, and return the PNG bytes (for embedding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.read_bytes()


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], *, normalized: bool) -> Figure:
    """Rows true class, columns predicted; counts or row-normalised fractions."""
    cm = np.asarray(cm, dtype=float)
    k = len(classes)
    many = k > ANNOTATE_MAX_CLASSES
    side = min(4 + 0.45 * k, 14)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalized else max(cm.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(k)
    fontsize = 6 if many else 9
    ax.set_xticks(ticks, labels=list(classes), rotation=90 if many else 45, ha="center" if many else "right",
                  fontsize=fontsize)
    ax.set_yticks(ticks, labels=list(classes), fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (row-normalised)" if normalized else "confusion matrix (counts)")
    if not many:
        top = cm.max() if cm.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{cm[i, j]:.2f}" if normalized else f"{int(cm[i, j])}"
                dark = cm[i, j] > (0.5 if normalized else top / 2)
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    return fig


def _curve_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def roc_curves(curves: dict[str, dict[str, Any]]) -> Figure:
    """One-vs-rest ROC curves; ``curves[class] = {"fpr", "tpr", "auc"}`` (classes without a curve left out)."""
    fig, ax = _curve_axes("one-vs-rest ROC", "false positive rate", "true positive rate")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    many = len(curves) > ANNOTATE_MAX_CLASSES
    for name, c in curves.items():
        ax.plot(c["fpr"], c["tpr"], lw=0.7 if many else 1.5, label=None if many else f"{name} (AUC {c['auc']:.3f})")
    if curves and not many:
        ax.legend(fontsize=8, loc="lower right")
    return fig


def pr_curves(curves: dict[str, dict[str, Any]]) -> Figure:
    """One-vs-rest precision-recall curves; ``curves[class] = {"precision", "recall", "ap"}``."""
    fig, ax = _curve_axes("one-vs-rest precision-recall", "recall", "precision")
    many = len(curves) > ANNOTATE_MAX_CLASSES
    for name, c in curves.items():
        ax.plot(c["recall"], c["precision"], lw=0.7 if many else 1.5,
                label=None if many else f"{name} (AP {c['ap']:.3f})")
    if curves and not many:
        ax.legend(fontsize=8, loc="lower left")
    return fig


def reliability(bins: dict[str, list], ece: float) -> Figure:
    """Reliability diagram: per-bin accuracy vs mean confidence of the top class, with the bin counts."""
    lower, upper = np.asarray(bins["lower"]), np.asarray(bins["upper"])
    count = np.asarray(bins["count"])
    acc = np.array([np.nan if a is None else a for a in bins["accuracy"]], dtype=float)
    conf = np.array([np.nan if c is None else c for c in bins["confidence"]], dtype=float)
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = upper - lower
    ax.bar(lower, np.nan_to_num(acc), width=width, align="edge", edgecolor="black", lw=0.5, label="accuracy")
    ax.bar(lower, np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=width, align="edge",
           color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"reliability diagram (ECE {ece:.4f})")
    ax.legend(fontsize=8, loc="upper left")
    axc.bar(lower, count, width=width, align="edge", color="grey", edgecolor="black", lw=0.5)
    axc.set_xlim(0, 1)
    axc.set_xlabel("confidence of the predicted class")
    axc.set_ylabel("images")
    return fig


def training_curves(history: Any) -> Figure:
    """Loss and validation macro-F1 per epoch from a ``history.csv`` DataFrame; the best epoch marked. A run
    with one row (the frozen-feature head, fitted once) has no curve: its validation scores are shown as bars,
    not as a dot on an epoch axis that means nothing."""
    if len(history) <= 1:
        return _fitted_once(history)
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 4))
    epoch = history["epoch"]
    for col, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        if col in history:
            ax_loss.plot(epoch, history[col], marker=".", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    if ax_loss.get_lines():  # a frozen-feature run has no loss curve to label
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss: frozen-feature head", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.grid(alpha=0.3)
    for col, label in (("val_macro_f1", "validation macro-F1"), ("val_accuracy", "validation accuracy")):
        if col in history:
            ax_f1.plot(epoch, history[col], marker=".", label=label)
    if "best_epoch" in history and len(history):
        best = history["best_epoch"].iloc[-1]
        for ax in (ax_loss, ax_f1):
            ax.axvline(best, color="grey", ls="--", lw=0.8)
        ax_f1.plot([], [], color="grey", ls="--", lw=0.8, label=f"best epoch ({best})")
    ax_f1.set_xlabel("epoch")
    ax_f1.set_ylim(0, 1.02)
    ax_f1.legend(fontsize=8)
    ax_f1.grid(alpha=0.3)
    return fig


def _fitted_once(history: Any) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 2.4))
    scores = [(label, float(history[col].iloc[0])) for col, label in
              (("val_macro_f1", "validation macro-F1"), ("val_accuracy", "validation accuracy"))
              if col in history and len(history) and history[col].notna().all()]
    if scores:
        names, values = zip(*scores, strict=True)
        ax.barh(names, values, color=["#2563eb", "#f59e0b"][:len(values)])
        for i, v in enumerate(values):
            ax.text(min(v + 0.01, 0.9), i, f"{v:.3f}", va="center", fontsize=9)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title("fitted once (frozen-feature head): no epochs, so no training curve", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return fig


def review_tradeoff(curve: dict[str, np.ndarray], point: tuple[float, float] | None, label: str) -> Figure:
    """Accuracy of the machine's own decisions vs the share of images sent to a person."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(curve["review_rate"], curve["auto_accuracy"], lw=1.5, drawstyle="steps-post")
    if point is not None:
        ax.plot(*point, "o", color="tab:red", ms=8, label=label)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_xlabel("review rate (share of images sent to a person)")
    ax.set_ylabel("most-probable-class accuracy, not reviewed")
    ax.set_title("review band trade-off")
    ax.grid(alpha=0.3)
    return fig


def drift_histogram(
    normal: np.ndarray, drift: np.ndarray, *, score: str, kind: str, threshold: float | None = None,
    threshold_label: str = "", bins: int = 40, relative: bool = False,
) -> Figure:
    """Histograms (share of images per bin) of one Drift score on normal images and on one Drift kind;
    ``threshold``: the policy's flag threshold as a vertical line. Higher scores mean "less like training".
    Non-finite scores are left out; positive scores spanning more than two decades get a log axis.
    ``relative``: the scores are ``drift_score`` values (1.0 = the Drift line), and the axis says so."""
    normal = np.asarray(normal, dtype=np.float64).reshape(-1)
    drift = np.asarray(drift, dtype=np.float64).reshape(-1)
    normal, drift = normal[np.isfinite(normal)], drift[np.isfinite(drift)]
    both = np.concatenate([normal, drift] + ([np.array([threshold])] if threshold is not None else []))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        log = lo > 0 and hi / lo > 100
        if log:
            edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
            ax.set_xscale("log")
        else:
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for values, label, color in ((normal, f"normal ({len(normal)})", "tab:blue"),
                                     (drift, f"{kind} ({len(drift)})", "tab:red")):
            if len(values):
                ax.hist(values, bins=edges, weights=np.full(len(values), 1.0 / len(values)), alpha=0.5,
                        color=color, edgecolor=color, lw=0.5, label=label)
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.2, label=threshold_label or f"threshold {threshold:.4g}")
    ax.set_xlabel(f"drift_score ({score}; 1.0 = the Drift line, higher = less like the training images)"
                  if relative else f"{score} score (higher = less like the training images)")
    ax.set_ylabel("share of images")
    ax.set_title(f"{score}: normal vs {kind}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def image_grid(
    images: Sequence[np.ndarray], captions: Sequence[str], *, overlays: Sequence[np.ndarray | None] | None = None,
    ncols: int = 6, title: str = "",
) -> Figure:
    """Thumbnails (uint8 grayscale) in a grid with captions; optional heatmaps in [0, 1] drawn over them."""
    n = max(len(images), 1)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    # Each row gets the height of its tile plus its longest caption (a mistake's caption has three lines), and
    # the constrained layout keeps a row's captions clear of the images above (tight_layout let them overlap).
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols, (1.9 + 0.13 * lines) * nrows + 0.3 * bool(title)),
                             squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if overlays is not None and overlays[i] is not None:
            ax.imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(captions[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
