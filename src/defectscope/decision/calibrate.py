"""``defectscope.decision.calibrate``: fit a run's decision policy on images neither training nor early
stopping saw, and write RUN/policy.json.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope.decision.costs import load_cost_matrix
from defectscope.decision.drift import SCORES, DriftError, DriftScorer
from defectscope.decision.drift_fit import cost_aware_drift_threshold, fit_drift
from defectscope.decision.drift_support import support_message, threshold_with_support
from defectscope.decision.outcomes import apply_policy_metrics
from defectscope.decision.policy import Policy, decide, review_scores, softmax
from defectscope.decision.thresholds import (
    CalibrationError,
    escape_threshold,
    fit_temperature,
    nll,
    review_curve,
    review_threshold,
)
from defectscope.rundir import DRIFT_EVAL, POLICY, Run

log = logging.getLogger(__name__)

CALIB_SPLIT = "calib"


def calibration_split(table: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calib_mask, eval_mask) over the table's rows.

    With rows in a ``calib`` split: those calibrate, the ``test`` split evaluates. Otherwise the test
    split is halved, stratified by label, with ``seed``: the first half (ceil per class) calibrates,
    the rest evaluates. Rows are shuffled in path order, so reordering the table changes nothing.
    """
    split = table["split"].astype(str).to_numpy()
    test = split == "test"
    if (split == CALIB_SPLIT).any():
        return split == CALIB_SPLIT, test
    rng = np.random.default_rng(seed)
    calib = np.zeros(len(table), dtype=bool)
    labels = table["label"].astype(str).to_numpy()
    paths = table["path"].astype(str).to_numpy()
    for label in sorted(set(labels[test])):
        idx = np.nonzero(test & (labels == label))[0]
        idx = idx[np.argsort(paths[idx], kind="stable")]
        idx = idx[rng.permutation(len(idx))]
        calib[idx[: math.ceil(len(idx) / 2)]] = True
    return calib, test & ~calib


def paths_digest(paths: Sequence[str]) -> str:
    """Order-independent fingerprint of a set of image paths (to check the evaluator uses the other half)."""
    return hashlib.sha256("\n".join(sorted(map(str, paths))).encode()).hexdigest()


def split_info(table: pd.DataFrame, seed: int) -> dict[str, Any]:
    calib, held = calibration_split(table, seed)
    return {
        "method": "calib split" if (table["split"] == CALIB_SPLIT).any() else "stratified half of the test split",
        "seed": int(seed), "n_calib": int(calib.sum()), "n_eval": int(held.sum()),
        "calib_sha256": paths_digest(table["path"][calib]), "eval_sha256": paths_digest(table["path"][held]),
        "calib_counts": {str(k): int(v) for k, v in table["label"][calib].value_counts().sort_index().items()},
    }


def default_good_class(classes: Sequence[str]) -> str | None:
    """The class named GOOD (any case), if there is one."""
    hits = [c for c in classes if c.lower() == "good"]
    return hits[0] if len(hits) == 1 else None


def calibrate_from_logits(
    logits: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    *,
    good_class: str | None = None,
    max_escape: float | None = None,
    confidence: float = 0.95,
    cost_matrix: str | Path | dict[str, Any] | None = None,
    review_rate: float | None = None,
    target_purity: float | None = None,
    review_score: str = "top",
    temperature_data: tuple[np.ndarray, np.ndarray] | None = None,
    temperature_on: str = "calibration",
) -> tuple[Policy, dict[str, Any]]:
    """The policy for calibration ``logits`` (N, K) with labels ``y`` (class indices); pure numpy.

    The temperature is fitted on ``temperature_data`` (logits, labels) when given, else on the
    calibration data itself. Returns (policy, extras) where extras holds the review trade-off curve
    and the policy's metrics on the calibration images.
    """
    classes = list(classes)
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    t_logits, t_y = temperature_data if temperature_data is not None else (logits, y)
    temperature = fit_temperature(t_logits, t_y)
    policy = Policy(
        classes=classes, good_class=good_class, temperature=temperature, review_score=review_score,
        temperature_fit={
            "on": temperature_on, "n": len(t_y),
            "nll_before": nll(t_logits, t_y), "nll_after": nll(t_logits, t_y, temperature),
        },
    )
    if cost_matrix is not None:
        policy.cost_matrix = load_cost_matrix(cost_matrix, classes, good_class)
    probs = softmax(logits, temperature)
    if max_escape is not None:
        if good_class is None:
            raise CalibrationError(f"an escape cap needs a good class; the classes are {classes}")
        g = classes.index(good_class)
        guarantee = escape_threshold(probs[:, g], y != g, max_escape=max_escape, confidence=confidence)
        policy.escape_threshold = guarantee.threshold
        policy.escape_guarantee = guarantee.to_dict()

    # The review band ranks the decisions the rest of the policy would make.
    correct = decide(logits, policy, inputs="logits").labels == np.array(classes, dtype=object)[y]
    scores = review_scores(probs, review_score)
    curve = review_curve(scores, correct)
    if review_rate is not None or target_purity is not None:
        band = review_threshold(scores, correct, review_rate=review_rate, target_purity=target_purity)
        policy.review_threshold = band["threshold"]
        policy.review_target = {k: v for k, v in band.items() if k != "threshold"}
    extras = {
        "review_curve": {k: v.tolist() for k, v in curve.items()},
        "calibration_metrics": apply_policy_metrics(y, logits, policy, classes, inputs="logits"),
    }
    return policy, extras


def calibrate(
    run: str | Path | Run,
    *,
    good_class: str | None = None,
    max_escape: float | None = None,
    confidence: float = 0.95,
    cost_matrix: str | Path | dict[str, Any] | None = None,
    review_rate: float | None = None,
    target_purity: float | None = None,
    review_score: str = "top",
    drift_rate: float | None = 0.01,
    drift_score: str | None = None,
    drift_examples: str | Path | None = None,
) -> dict[str, Any]:
    """Fit the run's decision policy and write ``RUN/policy.json``; returns a dict with ``policy`` (as
    written), ``path``, ``review_curve`` (arrays for the report) and ``calibration_metrics``.

    Calibration images: the table's ``calib`` split, else a stratified half of the test split (see
    :func:`calibration_split`; evaluation should then score only the other half). The temperature is
    fitted on the validation split when it has images: the escape guarantee needs P(GOOD) fixed before
    the calibration images are looked at. ``cost_matrix``: a YAML path, a preset name (``valeo_pwa``)
    or a dict. ``good_class`` defaults to the class named GOOD.

    Drift: the statistics of the training features are fitted (RUN/drift.safetensors) and the threshold of
    ``drift_score`` (default: the best score of RUN/drift_eval.json, else ``mahalanobis``) is set so that
    about ``drift_rate`` of normal images are flagged. With a cost matrix that has a Drift row and a folder
    of labelled ``drift_examples``, the threshold minimises expected cost instead. ``drift_rate=None``
    leaves Drift out of the policy.
    """
    import torch

    from defectscope.models.inference import features_and_logits, predict_logits

    run = run if isinstance(run, Run) else Run(run)
    model = run.model()
    classes = run.classes
    seed = run.seed
    good_class = good_class or default_good_class(classes)
    if good_class is not None and good_class not in classes:
        raise CalibrationError(f"good class {good_class!r} is not one of the run's classes {classes}")
    table = run.table
    calib_mask, _ = calibration_split(table, seed)
    if not calib_mask.any():
        raise CalibrationError(f"{run.path}: no calibration images (no 'calib' split and the test split is empty)")
    torch.set_num_threads(run.config.train.threads or torch.get_num_threads())

    def images_of(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        rows, images = run.images(rows)
        return images, run.labels(rows), run.metadata(rows)

    calib_images, y, calib_meta = images_of(table[calib_mask])
    features, logits = features_and_logits(model, calib_images, metadata=calib_meta)
    val = run.rows("val")
    temperature_data, temperature_on = None, "calibration"
    if len(val):
        val_images, val_y, val_meta = images_of(val)
        temperature_data, temperature_on = (predict_logits(model, val_images, metadata=val_meta).numpy(), val_y), "val"
    policy, extras = calibrate_from_logits(
        logits, y, classes, good_class=good_class, max_escape=max_escape, confidence=confidence,
        cost_matrix=cost_matrix, review_rate=review_rate, target_purity=target_purity, review_score=review_score,
        temperature_data=temperature_data, temperature_on=temperature_on,
    )
    policy.calibration = split_info(table, seed)
    if drift_rate is not None:
        _calibrate_drift(policy, run, model, features, logits, y, drift_rate, drift_score, drift_examples)
        extras["calibration_metrics"] = apply_policy_metrics(
            y, logits, policy, classes, inputs="logits",
            drift_score=drift_scores_for(run, policy, features, logits))
    path = run.file(POLICY)
    policy.to_json(path)
    _log_summary(policy, extras["calibration_metrics"])
    log.info(f"written: {path}")
    return {"policy": policy.to_dict(), "path": str(path), **extras}


def drift_scores_for(run: Run, policy: Policy, features: np.ndarray, logits: np.ndarray) -> np.ndarray | None:
    """The policy's drift score for features/logits, with the run's fitted statistics (None: no Drift rule)."""
    if not policy.drift:
        return None
    name = policy.drift["score"]
    return DriftScorer.load(run).score(features, logits, [name])[name]


def _calibrate_drift(policy: Policy, run: Run, model, features, logits, y, rate: float,
                     score: str | None, examples: str | Path | None) -> None:
    from defectscope.models.inference import features_and_logits

    if score is None:
        evaluated = run.read_json(DRIFT_EVAL) or {}
        score = evaluated.get("best_score") or "mahalanobis"
    if score not in SCORES:
        raise CalibrationError(f"unknown drift score {score!r}; valid: {', '.join(SCORES)}")
    scorer = fit_drift(run, model=model)
    s_in = scorer.score(features, logits, [score])[score]
    try:
        # With too few normal images for `rate`, the threshold that guarantees 1/(n + 1) instead, and
        # policy.json says so (rate_support), rather than no Drift flag at all.
        threshold, support = threshold_with_support(s_in, rate)
    except (DriftError, CalibrationError, ValueError) as exc:
        log.warning(f"Drift flag not set: {exc}")
        return
    (log.info if support["supported"] else log.warning)(support_message(support))
    evidence: dict[str, Any] = {"method": "false_flag_rate"}
    if examples is not None and policy.cost_matrix is not None and "Drift" in policy.cost_matrix["classes"]:
        drift_images = _folder_images(examples, run.spec)
        f_d, l_d = features_and_logits(model, drift_images)
        s_d = scorer.score(f_d, l_d, [score])[score]
        decided_in = decide(logits, policy, inputs="logits").labels
        decided_d = decide(l_d, policy, inputs="logits").labels
        classes = np.array(policy.classes, dtype=object)
        evidence = cost_aware_drift_threshold(s_in, classes[y], decided_in, s_d, decided_d, policy.cost_matrix,
                                              target_false_flag_rate=rate)
        threshold = float(evidence["threshold"])
    policy.drift_threshold = float(threshold)
    policy.drift = {
        "score": score, "target_false_flag_rate": rate, "n_calibration": int(len(s_in)),
        "rate_support": support,
        "calibration_flag_rate": float(np.mean(s_in > threshold)),
        "threshold_fit": {k: v for k, v in evidence.items() if k != "threshold"},
        "statistics": "drift.safetensors + drift.json in the run directory",
    }
    log.info(f"Drift: {score} score > {threshold:.6g} flags {policy.drift['calibration_flag_rate']:.4f} of "
             f"{len(s_in)} normal calibration images (target {rate:g})")


def _folder_images(folder: str | Path, spec: dict[str, Any]) -> np.ndarray:
    from defectscope.data.files import list_images
    from defectscope.data.images import load_gray

    files = list_images(folder, recursive=True)
    if not files:
        raise CalibrationError(f"{folder}: no Drift example images found")
    return np.stack([load_gray(p, spec["image_size"], spec.get("resize", "squash")) for p in files])


def _log_summary(policy: Policy, m: dict[str, Any]) -> None:
    c = policy.calibration or {}
    log.info(f"calibrated on {m['n']} images ({c.get('method', '')}); temperature {policy.temperature:.4f} "
             f"(fitted on {policy.temperature_fit['on']})")
    g = policy.escape_guarantee
    if g:
        lo, hi = g["overkill_interval"]
        log.info(f"escape cap {g['max_escape']:g} at {g['confidence']:g} confidence: P({policy.good_class}) >= "
                 f"{g['threshold']:.6f}; {g['escapes']}/{g['n_defective']} escapes (upper bound "
                 f"{g['escape_ucb']:.4f}); overkill {g['overkill']:.4f} [{lo:.4f}, {hi:.4f}] of {g['n_good']} good")
    if policy.review_threshold is not None:
        r = policy.review_target
        log.info(f"review band: {policy.review_score} < {policy.review_threshold:.6f}; review rate "
                 f"{r['achieved_review_rate']:.4f}, auto accuracy {r['auto_accuracy']:.4f}")
    if "pwa" in m:
        log.info(f"expected cost per image {m['expected_cost_per_image']:.3f}; PWA {m['pwa']:.6f} (auto decisions)")
