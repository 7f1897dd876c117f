"""Fit a run's Drift statistics and the Drift threshold.

- :func:`fit_drift`: statistics of the training split's features -> ``RUN/drift.safetensors`` + ``drift.json``.
- :func:`calibrate_drift_threshold`: a threshold with a finite-sample false-flag guarantee (numpy only).
- :func:`cost_aware_drift_threshold`: the threshold of least expected cost when labelled Drift exists.

How well the scores separate normal from Drift images is measured in :mod:`defectscope.evaluation.drift_eval`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from defectscope.decision.costs import DRIFT
from defectscope.decision.drift.member import DriftError
from defectscope.decision.drift.scorer import DriftScorer
from defectscope.rundir import Run

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- thresholds (numpy only)

def calibrate_drift_threshold(scores_in_distribution: np.ndarray, target_false_flag_rate: float = 0.01) -> float:
    """The Drift threshold (flag iff score > threshold) from scores of held-out in-distribution images.

    Split-conformal rule: with the n scores sorted, the threshold is the k-th smallest with
    k = ceil((n + 1)(1 - alpha)). For a new in-distribution image exchangeable with the calibration
    images, P(score > threshold) <= alpha, averaged over calibration sets (Vovk et al. 2005; Angelopoulos
    & Bates 2021, sec. 1); without ties it is also >= alpha - 1/(n + 1). The plain empirical quantile
    would flag slightly more than alpha. Needs n >= 1/alpha - 1 images (99 for 1%); fewer are refused
    because no calibration score is high enough to guarantee the rate.
    """
    s = np.asarray(scores_in_distribution, dtype=np.float64).reshape(-1)
    alpha = float(target_false_flag_rate)
    if not 0 < alpha < 1:
        raise DriftError(f"target_false_flag_rate must be in (0, 1), got {alpha}")
    if not np.isfinite(s).all():
        raise DriftError("in-distribution drift scores contain NaN or infinity")
    n = len(s)
    # The epsilon keeps (n + 1)(1 - alpha) = 190.00000000000003 from rounding up to 191.
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if k > n:
        from defectscope.decision.drift.support import rate_support, support_message

        raise DriftError(support_message(rate_support(n, alpha)) + " (or accept a higher rate)")
    return float(np.sort(s)[max(k, 1) - 1])


def _gain_above(scores: np.ndarray, delta: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: sum of ``delta`` over the items with score > t."""
    order = np.argsort(scores, kind="stable")
    s, d = scores[order], delta[order]
    suffix = np.concatenate([np.cumsum(d[::-1])[::-1], [0.0]])
    return suffix[np.searchsorted(s, thresholds, side="right")]


def cost_aware_drift_threshold(
    scores_in: np.ndarray,
    labels_in: Sequence[str],
    decided_in: Sequence[str],
    scores_drift: np.ndarray,
    decided_drift: Sequence[str],
    cost_matrix: dict[str, Any],
    *,
    drift_prior: float | None = None,
    target_false_flag_rate: float = 0.01,
) -> dict[str, Any]:
    """The threshold minimising the expected cost on calibration images, with its evidence.

    ``labels_in``/``decided_in``: true class and the decision the rest of the policy makes for each
    in-distribution image; ``decided_drift``: that decision for each labelled Drift image. Flagging
    image i costs C[true_i, Drift], not flagging costs C[true_i, decided_i] (true = Drift for Drift
    images). ``drift_prior`` is the Drift share expected in production: labelled Drift examples are
    usually collected, not sampled, so their share in calibration says little; None uses it anyway.
    Ties go to the highest threshold (fewest flags). Without Drift examples the threshold falls back
    to :func:`calibrate_drift_threshold` at ``target_false_flag_rate``.
    """
    s_in = np.asarray(scores_in, dtype=np.float64).reshape(-1)
    s_dr = np.asarray(scores_drift, dtype=np.float64).reshape(-1)
    if len(s_dr) == 0:
        return {"threshold": calibrate_drift_threshold(s_in, target_false_flag_rate), "method": "false_flag_rate",
                "target_false_flag_rate": target_false_flag_rate, "n_in": len(s_in), "n_drift": 0}
    names = list(cost_matrix["classes"])
    if DRIFT not in names:
        raise DriftError(f"a cost-aware Drift threshold needs a {DRIFT!r} row and column in the cost matrix")
    where, c = {n: i for i, n in enumerate(names)}, np.asarray(cost_matrix["costs"], dtype=np.float64)
    if not (len(s_in) == len(labels_in) == len(decided_in)) or len(s_dr) != len(decided_drift):
        raise DriftError("scores, labels and decisions must have one entry per image")
    try:
        keep_in = np.array([c[where[t], where[d]] for t, d in zip(labels_in, decided_in, strict=True)])
        flag_in = np.array([c[where[t], where[DRIFT]] for t in labels_in])
        keep_dr = np.array([c[where[DRIFT], where[d]] for d in decided_drift])
    except KeyError as err:
        raise DriftError(f"label or decision {err.args[0]!r} is not in the cost matrix {names}") from None
    flag_dr = np.full(len(s_dr), c[where[DRIFT], where[DRIFT]])
    if drift_prior is None:
        w_in = w_dr = 1.0 / (len(s_in) + len(s_dr))
    else:
        if not 0 <= drift_prior <= 1:
            raise DriftError(f"drift_prior must be in [0, 1], got {drift_prior}")
        w_in = (1 - drift_prior) / max(len(s_in), 1)
        w_dr = drift_prior / len(s_dr)
    all_s = np.concatenate([s_in, s_dr])
    # Descending, so argmin's first hit is the highest threshold among equal costs.
    cand = np.unique(np.concatenate([all_s, [np.nextafter(all_s.min(), -np.inf)]]))[::-1]
    cost = (w_in * (keep_in.sum() + _gain_above(s_in, flag_in - keep_in, cand))
            + w_dr * (keep_dr.sum() + _gain_above(s_dr, flag_dr - keep_dr, cand)))
    best = int(np.argmin(cost))
    t = float(cand[best])
    return {
        "threshold": t, "method": "cost", "expected_cost_per_image": float(cost[best]),
        "expected_cost_without_drift_flag": float(cost[0]),
        "false_flag_rate": float((s_in > t).mean()) if len(s_in) else None,
        "drift_recall": float((s_dr > t).mean()), "n_in": len(s_in), "n_drift": len(s_dr),
        "drift_prior": drift_prior,
    }


# ---------------------------------------------------------------- fitting on a run


def fit_scorer(run: Run, model=None, *, k: int = 10) -> DriftScorer:
    """A DriftScorer fitted on the features of the run's training split (``model``: the run's, loaded if None)."""
    import torch

    from defectscope.models.inference import features_and_logits

    model = model if model is not None else run.model()
    rows, images = run.images(run.rows("train"))
    feats, logits = features_and_logits(model, images, metadata=run.metadata(rows))
    # The linear head's weight and bias, for ViM's origin and virtual logit; a kernel head (the frozen
    # recipe's RBF head) has no such origin, so ViM is left out for it.
    weight, bias = getattr(model.head, "weight", None), getattr(model.head, "bias", None)
    head = None
    # A head that also reads metadata inputs has no origin in feature space either.
    if isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and not getattr(model, "metadata_dim", 0):
        head = (weight.detach().cpu().numpy(), bias.detach().cpu().numpy())
    return DriftScorer(k=k, seed=run.seed).fit(feats, logits, run.labels(rows), head=head)


def fit_drift(run: str | Run, *, k: int = 10, model=None) -> DriftScorer:
    """Fit the Drift statistics on the features of the run's training split and save them in the run
    (``RUN/drift.safetensors``: class means, tied precision, kNN bank; ``RUN/drift.json``: parameters)."""
    run = run if isinstance(run, Run) else Run(run)
    scorer = fit_scorer(run, model, k=k)
    weights = scorer.save(run)
    log.info(f"drift statistics of {scorer.n_train} training images ({scorer.bank.shape[1]} features, "
             f"Ledoit-Wolf shrinkage {scorer.shrinkage_fitted:.3f}, kNN bank {len(scorer.bank)}) written: {weights}")
    return scorer


__all__ = ["calibrate_drift_threshold", "cost_aware_drift_threshold", "fit_drift", "fit_scorer"]
