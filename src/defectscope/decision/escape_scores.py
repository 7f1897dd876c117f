"""The score the escape cap thresholds: how good an image looks, in [0, 1], from calibrated class probabilities.

* ``p_good``: P(GOOD), the probability of the good class alone.
* ``severity``: 1 - the expected severity ``sum_k p_k s_k`` with ``s_k`` in [0, 1] the class's place along an
  ordered label set (``policy.class_ranks``; ELPV: defect probability 0, 1/3, 2/3, 1). It uses all the
  probability mass: an image split between "possibly" and "likely defective" looks worse than one split
  between "functional" and "possibly defective", though both have the same P(GOOD).

Both are functions of the probabilities alone, so the deployed predictor (numpy, no torch) computes them
from the model's probabilities and the policy. Calibration picks one by binary AUROC (GOOD vs the rest) on
the validation split, which neither sets the threshold nor measures it. Pure numpy/scipy: no torch here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ESCAPE_SCORES = ("p_good", "severity")


def goodness(probs: np.ndarray, kind: str, good_index: int, class_ranks: Sequence[float] | None = None) -> np.ndarray:
    """The escape score (N,) of calibrated probabilities (N, K); higher means more likely good."""
    probs = np.asarray(probs, dtype=np.float64)
    if kind == "p_good":
        return probs[:, good_index]
    if kind == "severity":
        if class_ranks is None or len(class_ranks) != probs.shape[1]:
            raise ValueError("the severity escape score needs one class rank per class (policy.class_ranks)")
        return np.clip(1.0 - probs @ np.asarray(class_ranks, dtype=np.float64), 0.0, 1.0)
    raise ValueError(f"escape score must be one of {ESCAPE_SCORES}, got {kind!r}")


def binary_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count half): Mann-Whitney U / (n+ n-)."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(np.asarray(score, dtype=np.float64))
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def class_ranks_from_order(classes: Sequence[str], order: Sequence[str]) -> list[float] | None:
    """Severity in [0, 1] of each class (in ``classes`` order), evenly spaced along ``order`` (least to most
    severe); None when there is no order or it does not list exactly the classes."""
    if len(order) < 2 or sorted(order) != sorted(classes):
        return None
    return [order.index(c) / (len(order) - 1) for c in classes]


def choose_escape_score(probs: np.ndarray, y: np.ndarray, good_index: int,
                        class_ranks: Sequence[float] | None) -> tuple[str, dict[str, float | None]]:
    """(best score name, binary AUROC of every candidate) on held-out probabilities with labels ``y``.
    Ties keep ``p_good``, the score that needs no class order."""
    candidates = ["p_good"] + (["severity"] if class_ranks is not None else [])
    good = np.asarray(y) == good_index
    aurocs = {name: binary_auroc(goodness(probs, name, good_index, class_ranks), good) for name in candidates}
    valid = {k: v for k, v in aurocs.items() if not np.isnan(v)}
    best = max(valid, key=lambda k: (valid[k], k == "p_good")) if valid else "p_good"
    return best, {k: (round(v, 6) if k in valid else None) for k, v in aurocs.items()}  # JSON has no NaN
