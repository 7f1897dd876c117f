"""Cost matrices: what each (true class, decision) pair costs the plant, and decisions that minimise it.

A cost matrix is the plain dict ``{"classes": [...], "costs": [[...], ...]}`` (rows true class, columns
decided class), as read from YAML and stored in policy.json. It may carry a ``Drift`` row and column
(an image unlike the training data); the Drift column is a decision only when a drift score exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from defectscope import labels
from defectscope.errors import DefectscopeError

DRIFT = labels.DRIFT
PRESETS = ("valeo_pwa",)


class CostMatrixError(DefectscopeError, ValueError):
    """A cost matrix that does not fit the model's classes."""


def valeo_pwa(classes: Sequence[str], good_class: str, *, drift: bool = True) -> dict[str, Any]:
    """The Valeo penalty matrix for these classes (see DOMAIN.md), with a Drift row/column by default."""
    if good_class not in classes:
        raise CostMatrixError(f"good class {good_class!r} is not one of {list(classes)}")
    names = [*classes, DRIFT] if drift else list(classes)
    costs = []
    for true in names:
        row = []
        for decided in names:
            if true == decided:
                c = 0
            elif true == DRIFT:
                c = 10000 if decided == good_class else 1000
            elif true == good_class:
                c = 10000 if decided == DRIFT else 100
            else:  # a known defect
                c = 10000 if decided == good_class else 1000 if decided == DRIFT else 1
            row.append(float(c))
        costs.append(row)
    return {"classes": names, "costs": costs, "name": "valeo_pwa"}


def check_cost_matrix(cm: dict[str, Any], classes: Sequence[str]) -> None:
    """Refuse a matrix that is not square, has negative costs, or does not cover exactly the classes."""
    names = list(cm.get("classes", []))
    costs = np.asarray(cm.get("costs", []), dtype=np.float64)
    if costs.shape != (len(names), len(names)):
        raise CostMatrixError(f"cost matrix must be {len(names)}x{len(names)} for {names}, got shape {costs.shape}")
    if len(set(names)) != len(names):
        raise CostMatrixError(f"cost matrix repeats a class: {names}")
    if not np.isfinite(costs).all() or (costs < 0).any():
        raise CostMatrixError("costs must be finite and non-negative")
    missing = [c for c in classes if c not in names]
    extra = [c for c in names if c not in classes and c != DRIFT]
    if missing or extra:
        raise CostMatrixError(
            f"cost matrix classes {names} must be the model's classes {list(classes)} (plus optional {DRIFT!r})"
            + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "")
        )


def _index(cm: dict[str, Any]) -> tuple[dict[str, int], np.ndarray]:
    return {c: i for i, c in enumerate(cm["classes"])}, np.asarray(cm["costs"], dtype=np.float64)


def expected_costs(
    probs: np.ndarray, cm: dict[str, Any], classes: Sequence[str], *, allow_drift: bool = False
) -> tuple[list[str], np.ndarray]:
    """Expected cost of every decision option: E[n, j] = sum_i probs[n, i] * C[class_i, option_j].

    Returns (option names, E). Options are the model's classes, plus ``Drift`` when ``allow_drift``
    and the matrix has it. Rows come from the model's classes only (there is no P(Drift) yet).
    """
    where, costs = _index(cm)
    options = list(classes) + ([DRIFT] if allow_drift and DRIFT in where else [])
    sub = costs[np.ix_([where[c] for c in classes], [where[o] for o in options])]
    return options, np.asarray(probs, dtype=np.float64) @ sub


def cost_decisions(
    probs: np.ndarray, cm: dict[str, Any], classes: Sequence[str], *, allow_drift: bool = False
) -> np.ndarray:
    """The minimum-expected-cost decision (option name) for each row of ``probs``."""
    options, e = expected_costs(probs, cm, classes, allow_drift=allow_drift)
    return np.array(options, dtype=object)[e.argmin(axis=1)]


def penalties(y_true: Sequence[str], decided: Sequence[str], cm: dict[str, Any]) -> np.ndarray:
    """The realised cost of each (true label, decision) pair."""
    where, costs = _index(cm)
    try:
        return np.array([costs[where[t], where[d]] for t, d in zip(y_true, decided, strict=True)], dtype=np.float64)
    except KeyError as err:
        raise CostMatrixError(f"label or decision {err.args[0]!r} is not in the cost matrix {cm['classes']}") from None


def penalty_weighted_accuracy(
    y_true: Sequence[str], decided: Sequence[str], cm: dict[str, Any], *, scale: float | None = None
) -> float:
    """PWA = 1 - total_penalty / (n * scale); ``scale`` defaults to the largest cost (10000 for Valeo)."""
    p = penalties(y_true, decided, cm)
    if p.size == 0:
        return float("nan")
    scale = float(np.max(cm["costs"])) if scale is None else float(scale)
    return float(1.0 - p.sum() / (p.size * scale)) if scale > 0 else 1.0
