"""Classification metrics that hold up on imbalanced data, all derived from one confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/weighted F1, worst-class F1, per-class P/R/F1/support.

    A class with no support and no predictions is left out of the averages (its F1 is undefined),
    as scikit-learn does with ``labels=present``; a class predicted but never present scores 0.
    """
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (support > 0) | (predicted > 0)
    in_data = support > 0
    n = int(support.sum())
    worst = int(np.argmin(np.where(present, f1, np.inf))) if present.any() else 0
    row_norm = np.divide(cm, support[:, None], out=np.zeros_like(cm, dtype=float), where=support[:, None] > 0)
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": float(recall[in_data].mean()) if in_data.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / n) if n else 0.0,
        "worst_class": classes[worst],
        "worst_class_f1": float(f1[worst]),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": np.round(row_norm, 6).tolist(),
        "classes": list(classes),
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""
    classes = metrics["classes"]
    width = max(12, *(len(c) for c in classes)) + 2
    lines = [
        f"images {metrics['n']}   accuracy {metrics['accuracy']:.4f}   balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f}",
        f"macro-F1 {metrics['macro_f1']:.4f}   weighted-F1 {metrics['weighted_f1']:.4f}   worst class "
        f"{metrics['worst_class']} (F1 {metrics['worst_class_f1']:.4f})",
        "",
        f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name in classes:
        m = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10d}"
        )
    lines += ["", "confusion matrix (rows true, columns predicted):"]
    # Columns as wide as the longest class name: a cut header (likely_def, Crack_heav) names no class.
    col = max(10, *(len(c) for c in classes)) + 1
    lines.append(" " * width + "".join(f"{c:>{col}}" for c in classes))
    for name, row in zip(classes, metrics["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{col}d}" for v in row))
    return "\n".join(lines)
