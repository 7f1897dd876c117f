"""``defectscope.decision.calibrate``: fit a run's decision policy on images neither training nor early
stopping saw, and write RUN/policy.json.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope import labels
from defectscope.decision.cost_files import load_cost_matrix
from defectscope.decision.drift import DriftError
from defectscope.decision.drift.fit import cost_aware_drift_threshold, fit_drift
from defectscope.decision.drift.fusion import Standardiser
from defectscope.decision.drift.rule import NOT_POOLED, PATCH, PHOTOMETRIC, DriftRule, parse_score, policy_forward
from defectscope.decision.drift.support import support_message, threshold_with_support
from defectscope.decision.escape_scores import choose_escape_score, class_ranks_from_order, goodness
from defectscope.decision.outcomes import apply_policy_metrics
from defectscope.decision.policy import REVIEW, Policy, decide, purity_scores, review_scores, softmax
from defectscope.decision.reject_purity import fit_reject_purity, resolve_targets
from defectscope.decision.three_way import ThreeWay, fit_three_way, verdict_lines
from defectscope.decision.thresholds import (
    CalibrationError,
    escape_threshold,
    fit_temperature,
    nll,
    review_curve,
    review_threshold,
)
from defectscope.rundir import (
    DRIFT_EVAL,
    DRIFT_PARAMS,
    DRIFT_WEIGHTS,
    PATCH_DRIFT_PARAMS,
    PATCH_DRIFT_WEIGHTS,
    POLICY,
    Run,
)

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
    """The class named like GOOD (:func:`defectscope.labels.good_class_of`), if there is exactly one."""
    return labels.good_class_of(classes)


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
    escape_score: str = "p_good",
    class_ranks: Sequence[float] | None = None,
    max_overkill: float | None = None,
    critical_classes: Sequence[str] | None = None,
    escape_share: float = 0.5,
    reject_purity: float | Mapping[str, float] | None = None,
    purity_score: str = "probability",
) -> tuple[Policy, dict[str, Any]]:
    """The policy for calibration ``logits`` (N, K) with labels ``y`` (class indices); pure numpy.

    The temperature is fitted on ``temperature_data`` (logits, labels) when given, else on the
    calibration data itself. ``escape_score``: ``p_good``, ``severity`` (needs ``class_ranks``, each class's
    severity in [0, 1]) or ``auto``: the one with the higher binary AUROC on ``temperature_data`` (the
    validation split; ``p_good`` without it). With ``max_overkill`` beside ``max_escape`` the policy is three-way
    (PASS / REJECT / REVIEW, both caps held together at ``confidence``, :mod:`defectscope.decision.three_way`);
    ``critical_classes`` are the defect classes the escape cap covers (default: all). ``reject_purity``: a target
    for every defect class (a number) or per class (a mapping; key ``*`` for the classes not named): a REJECT as
    a class stays automatic only above its certified purity threshold on ``purity_score`` (``probability`` or
    ``margin``), else it goes to REVIEW (:mod:`defectscope.decision.reject_purity`). Returns (policy, extras)
    where extras holds the review trade-off curve, the policy's metrics on the calibration images and, for a
    three-way policy, ``verdict`` (what the data supports, in plain lines).
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
        ranks = None if class_ranks is None else [float(r) for r in class_ranks]
        choice = None
        if escape_score == "auto":
            escape_score = "p_good"
            if temperature_data is not None:  # never chosen on the images that set or measure the threshold
                escape_score, aurocs = choose_escape_score(softmax(t_logits, temperature), t_y, g, ranks)
                choice = {"on": temperature_on, "binary_auroc": aurocs}
        policy.escape_score, policy.class_ranks = escape_score, ranks
        score = goodness(probs, escape_score, g, ranks)
        if max_overkill is not None:
            names = np.array(classes, dtype=object)[y]
            tw = fit_three_way(score, names, classes, good_class, max_escape=max_escape, max_overkill=max_overkill,
                               confidence=confidence, escape_share=escape_share, critical=critical_classes)
            policy.three_way = {**tw.to_dict(), "score": escape_score, **({"score_choice": choice} if choice else {})}
            if reject_purity is not None:
                policy.three_way["reject_purity"] = _fit_purity(logits, probs, names, policy, reject_purity,
                                                                purity_score, confidence)
        else:
            guarantee = escape_threshold(score, y != g, max_escape=max_escape, confidence=confidence)
            policy.escape_threshold = guarantee.threshold
            policy.escape_guarantee = {**guarantee.to_dict(), "score": escape_score,
                                       **({"score_choice": choice} if choice else {})}
        Policy.from_dict(policy.to_dict())  # checks escape_score against class_ranks
    elif max_overkill is not None:
        raise CalibrationError("an overkill cap (--max-overkill) is set together with an escape cap (--max-escape)")
    if reject_purity is not None and policy.three_way is None:
        raise CalibrationError("a REJECT purity (--reject-purity) applies to a three-way policy: give --max-escape "
                               "and --max-overkill too")

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
    if policy.three_way is not None:
        extras["verdict"] = verdict_lines(ThreeWay.from_dict(policy.three_way), extras["calibration_metrics"])
        policy.three_way["verdict"] = extras["verdict"]
    return policy, extras


def _fit_purity(logits: np.ndarray, probs: np.ndarray, names: np.ndarray, policy: Policy,
                spec: float | Mapping[str, float], score: str, confidence: float) -> dict[str, Any]:
    """``three_way["reject_purity"]``: the REJECTs of the policy as it stands (the same :func:`decide` the line
    runs, before any review band), each class's threshold certified on them."""
    targets = resolve_targets(spec, policy.classes, policy.good_class)
    decided = decide(logits, policy, inputs="logits").labels
    rejected = (decided != policy.good_class) & (decided != REVIEW) & np.isin(decided, policy.classes)
    q = purity_scores(probs, policy.classes, decided, score)
    return fit_reject_purity(q, decided, rejected, names, targets, confidence=confidence, score=score)


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
    escape_score: str = "auto",
    max_overkill: float | None = None,
    critical_classes: Sequence[str] | None = None,
    escape_share: float = 0.5,
    reject_purity: float | Mapping[str, float] | None = None,
    purity_score: str = "probability",
) -> dict[str, Any]:
    """Fit the run's decision policy and write ``RUN/policy.json``; returns a dict with ``policy`` (as
    written), ``path``, ``review_curve`` (arrays for the report) and ``calibration_metrics``.

    Calibration images: the table's ``calib`` split, else a stratified half of the test split (see
    :func:`calibration_split`; evaluation should then score only the other half). The temperature is
    fitted on the validation split when it has images: the escape guarantee needs P(GOOD) fixed before
    the calibration images are looked at. ``cost_matrix``: a YAML path, a preset name (``valeo_pwa``)
    or a dict. ``good_class`` defaults to the class named GOOD. ``escape_score``: what the escape cap
    thresholds, ``p_good``, ``severity`` (needs the config's ``data.class_order``) or ``auto`` (the better of
    the two by binary AUROC on the validation split; ``p_good`` when the labels have no order).

    Three-way decisions: with ``max_overkill`` beside ``max_escape``, images are PASSed, REJECTed or sent to
    REVIEW, and both caps hold together with probability ``confidence`` (``escape_share`` of the error budget
    to the escape cap); ``critical_classes``: the defect classes the escape cap covers (default: all of them;
    the others are nuisance classes whose escapes are reported, not capped). ``reject_purity`` (a number for every
    defect class, or {class: target}): REJECT as a class only where its purity is certified, else REVIEW (see
    :func:`calibrate_from_logits`).

    Drift: the statistics of the training features are fitted (RUN/drift.safetensors; with a ``patch``
    member also the per-position Gaussians of the feature maps, RUN/patch_drift.safetensors) and the
    threshold of ``drift_score`` (default: the score RUN/drift_eval.json chose, else ``mahalanobis``) is set
    so that about ``drift_rate`` of normal images are flagged. ``drift_score`` is one score (``mahalanobis``,
    ``knn``, ``vim``, ``msp``, ``energy``, ``patch``) or a max of standardised ones (``max(knn,patch)``),
    each standardised on the validation split's images. With fewer normal calibration images than the rate
    needs, the threshold guarantees the rate they support, and the log and policy.json say what a rate of
    ``drift_rate`` would need. With a cost matrix that has a Drift row and a folder
    of labelled ``drift_examples``, the threshold minimises expected cost instead. ``drift_rate=None``
    leaves Drift out of the policy.
    """
    run = run if isinstance(run, Run) else Run(run)
    classes = run.classes
    good_class = good_class or default_good_class(classes)
    if good_class is not None and good_class not in classes:
        raise CalibrationError(f"good class {good_class!r} is not one of the run's classes {classes}")
    if reject_purity is not None:  # a misspelt class is refused before the model runs
        resolve_targets(reject_purity, classes, good_class or "")
    table = run.table
    calib_mask, _ = calibration_split(table, run.seed)
    if not calib_mask.any():
        raise CalibrationError(f"{run.path}: no calibration images (no 'calib' split and the test split is empty)")
    _check_good_class(good_class, table, calib_mask, classes)
    # Every file this call writes is restored (or removed) if it fails: never a half-written run.
    with _all_or_nothing(run.path, (POLICY, DRIFT_WEIGHTS, DRIFT_PARAMS, PATCH_DRIFT_WEIGHTS, PATCH_DRIFT_PARAMS)):
        return _calibrate_run(run, good_class, calib_mask, dict(
            max_escape=max_escape, confidence=confidence, cost_matrix=cost_matrix, review_rate=review_rate,
            target_purity=target_purity, review_score=review_score, escape_score=escape_score,
            max_overkill=max_overkill, critical_classes=critical_classes, escape_share=escape_share,
            reject_purity=reject_purity, purity_score=purity_score),
            drift_rate, drift_score, drift_examples)


def _check_good_class(good_class: str | None, table: pd.DataFrame, calib_mask: np.ndarray,
                      classes: Sequence[str]) -> None:
    """Refuse a good class with no calibration images (a typo'd or tiny class): every figure about good parts
    would be undefined. Names the class the user most likely meant."""
    if good_class is None or (table["label"][calib_mask] == good_class).any():
        return
    n_all = int((table["label"] == good_class).sum())
    others = [c for c in classes if c != good_class]
    close = difflib.get_close_matches(good_class.lower(), [c.lower() for c in others], n=1, cutoff=0.5)
    meant = next((c for c in others if close and c.lower() == close[0]), None)
    hint = f"; did you mean --good-class {meant}?" if meant else f"; the classes are {', '.join(classes)}"
    raise CalibrationError(f"--good-class {good_class}: no calibration images of {good_class!r} ({n_all} in the "
                           f"run's whole table), so nothing about good parts can be measured{hint}")


@contextlib.contextmanager
def _all_or_nothing(folder: Path, names: Sequence[str]) -> Iterator[None]:
    """Keep a copy of ``names`` in ``folder``; on any exception put them back as they were (absent included)."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".calibrate-") as keep:
        for name in names:
            if (folder / name).is_file():
                shutil.copy2(folder / name, Path(keep) / name)
        try:
            yield
        except BaseException:
            for name in names:
                saved, target = Path(keep) / name, folder / name
                if saved.is_file():
                    os.replace(saved, target)
                else:
                    target.unlink(missing_ok=True)
            raise


def _calibrate_run(run: Run, good_class: str | None, calib_mask: np.ndarray, options: dict[str, Any],
                   drift_rate: float | None, drift_score: str | None,
                   drift_examples: str | Path | None) -> dict[str, Any]:
    import torch

    from defectscope.models.inference import features_and_logits, predict_logits

    model = run.model()
    classes = run.classes
    seed = run.seed
    table = run.table
    torch.set_num_threads(run.config.train.threads or torch.get_num_threads())

    def images_of(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        rows, images = run.images(rows)
        return images, run.labels(rows), run.metadata(rows)

    calib_images, y, calib_meta = images_of(table[calib_mask])
    _, logits = features_and_logits(model, calib_images, metadata=calib_meta)
    val = run.rows("val")
    temperature_data, temperature_on = None, "calibration"
    val_images = val_meta = None
    if len(val):
        val_images, val_y, val_meta = images_of(val)
        temperature_data, temperature_on = (predict_logits(model, val_images, metadata=val_meta).numpy(), val_y), "val"
    policy, extras = calibrate_from_logits(
        logits, y, classes, good_class=good_class, temperature_data=temperature_data, temperature_on=temperature_on,
        class_ranks=class_ranks_from_order(classes, run.config.data.class_order), **options,
    )
    policy.calibration = split_info(table, seed)
    if drift_rate is not None:
        scores_in = _calibrate_drift(policy, run, model, (calib_images, calib_meta), (val_images, val_meta), logits, y,
                                     drift_rate, drift_score, drift_examples)
        extras["calibration_metrics"] = apply_policy_metrics(
            y, logits, policy, classes, inputs="logits", drift_score=scores_in if policy.drift else None)
    path = run.file(POLICY)
    policy.to_json(path)
    _log_summary(policy, extras["calibration_metrics"])
    log.info(f"written: {path}")
    return {"policy": policy.to_dict(), "path": str(path), **extras}


def drift_scores_for(run: Run, policy: Policy, features: np.ndarray, logits: np.ndarray,
                     maps: list[np.ndarray] | None = None, images: np.ndarray | None = None) -> np.ndarray | None:
    """The policy's drift score for features/logits (and the stages' maps, for a ``patch`` member: see
    :func:`drift_stages`; the images, for a ``photometric`` member), with the run's fitted statistics (None: no
    Drift rule)."""
    if not policy.drift:
        return None
    return DriftRule.from_policy(run, policy.drift).score(features, logits, maps, images)


def drift_stages(policy: Policy) -> tuple[int, ...] | None:
    """The backbone stages whose maps the policy's Drift score needs (None: pooled features suffice)."""
    drift = policy.drift or {}
    if not drift or PATCH not in parse_score(drift["score"]):
        return None
    return tuple((drift.get("patch") or {}).get("stages") or ())


def _calibrate_drift(policy: Policy, run: Run, model, calib: tuple[np.ndarray, np.ndarray | None],
                     val: tuple[np.ndarray | None, np.ndarray | None], logits: np.ndarray, y: np.ndarray, rate: float,
                     score: str | None, examples: str | Path | None) -> np.ndarray | None:
    """Set the policy's Drift rule; returns the calibration images' Drift scores (None: no rule set).
    ``calib``, ``val``: (images, encoded metadata inputs or None)."""
    (calib_images, calib_meta), (val_images, val_meta) = calib, val
    if score is None:
        evaluated = run.read_json(DRIFT_EVAL) or {}
        score = evaluated.get("best_score") or "mahalanobis"
    try:
        members = parse_score(score)
    except DriftError as exc:
        raise CalibrationError(str(exc)) from None
    # The pooled statistics are fitted whatever the score (cheap; drift-eval and the cascade read them).
    scorer = fit_drift(run, model=model)
    missing = [m for m in members if m not in NOT_POOLED and m not in scorer.available]
    if missing:
        # ViM needs the classifier's linear head; the frozen recipe's kernel head has none.
        raise CalibrationError(f"the drift score {', '.join(missing)} cannot be computed for this model (ViM "
                               f"needs a linear head); available: {', '.join((*scorer.available, *NOT_POOLED))}")
    patch = None
    if PATCH in members:
        from defectscope.decision.drift.patch import fit_patch_drift

        try:
            patch = fit_patch_drift(run, model=model)
        except DriftError as exc:
            raise CalibrationError(str(exc)) from None
    photometric = None
    if PHOTOMETRIC in members:
        from defectscope.decision.drift.photometric import fit_photometric

        photometric = fit_photometric(run)
    drift = DriftRule(members, scorer, patch, photometric=photometric)
    s_in_raw = drift.raw(*policy_forward(model, calib_images, drift.stages, metadata=calib_meta), images=calib_images)
    std_info: dict[str, Any] = {}
    if drift.fused:
        if val_images is None or len(val_images) < 2:
            raise CalibrationError(f"the fused drift score {drift.name} standardises each member on the validation "
                                   f"split's images, and this run has fewer than 2")
        # Held-out images: the training images' scores are optimistically low (the statistics saw them), and
        # the calibration images must stay untouched for the threshold's guarantee.
        drift.standardiser = Standardiser.fit(drift.raw(*policy_forward(model, val_images, drift.stages,
                                                                          metadata=val_meta), images=val_images))
        std_info = {"standardised_on": "val", "n_standardise": int(len(val_images))}
    s_in = drift.combine(s_in_raw)
    try:
        # With too few normal images for `rate`, the threshold that guarantees 1/(n + 1) instead, and
        # policy.json says so (rate_support), rather than no Drift flag at all.
        threshold, support = threshold_with_support(s_in, rate)
    except (DriftError, CalibrationError, ValueError) as exc:
        log.warning(f"Drift flag not set: {exc}")
        return None
    (log.info if support["supported"] else log.warning)(support_message(support))
    evidence: dict[str, Any] = {"method": "false_flag_rate"}
    if examples is not None and policy.cost_matrix is not None and "Drift" in policy.cost_matrix["classes"]:
        drift_images = _folder_images(examples, run.spec)
        f_d, l_d, m_d = policy_forward(model, drift_images, drift.stages)
        s_d = drift.score(f_d, l_d, m_d, drift_images)
        decided_in = decide(logits, policy, inputs="logits").labels
        decided_d = decide(l_d, policy, inputs="logits").labels
        classes = np.array(policy.classes, dtype=object)
        evidence = cost_aware_drift_threshold(s_in, classes[y], decided_in, s_d, decided_d, policy.cost_matrix,
                                              target_false_flag_rate=rate)
        threshold = float(evidence["threshold"])
    policy.drift_threshold = float(threshold)
    files = ["drift.safetensors + drift.json"] + ["patch_drift.safetensors + patch_drift.json"] * (patch is not None)
    policy.drift = {
        **drift.policy_entries(), **std_info,
        "target_false_flag_rate": rate, "n_calibration": int(len(s_in)),
        "rate_support": support,
        "calibration_flag_rate": float(np.mean(s_in > threshold)),
        "threshold_fit": {k: v for k, v in evidence.items() if k != "threshold"},
        "statistics": " and ".join(files) + " in the run directory",
    }
    # The raw line of a Mahalanobis score can be 1e13: people read drift_score, the score relative to the line.
    log.info(f"Drift: set aside when drift_score > 1.00 (the {drift.name} score relative to the line fitted here); "
             f"flags {policy.drift['calibration_flag_rate']:.4f} of {len(s_in)} normal calibration images "
             f"(target {rate:g})")
    return s_in


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
        what = f"P({policy.good_class})" if policy.escape_score == "p_good" else "1 - expected severity"
        log.info(f"escape cap {g['max_escape']:g} at {g['confidence']:g} confidence: {what} >= "
                 f"{g['threshold']:.6f}; {g['escapes']}/{g['n_defective']} escapes (upper bound "
                 f"{g['escape_ucb']:.4f}); overkill {g['overkill']:.4f} [{lo:.4f}, {hi:.4f}] of {g['n_good']} good")
    tw = policy.three_way
    if tw:
        what = f"P({policy.good_class})" if policy.escape_score == "p_good" else "1 - expected severity"
        t_pass, t_reject = tw["pass_threshold"], tw["reject_threshold"]
        log.info(f"three-way policy: PASS if {what} >= {_threshold_text(t_pass)}, REJECT if < "
                 f"{_threshold_text(t_reject)}, REVIEW between; escape <= {tw['escape']['cap']:g} (classes "
                 f"{', '.join(tw['critical_classes'])}) and overkill <= {tw['overkill']['cap']:g}, together at "
                 f"{tw['confidence']:g} confidence")
        a = m["automation"]
        log.info(f"automation {a['rate']:.4f} [{a['interval'][0]:.4f}, {a['interval'][1]:.4f}] of {a['of']} "
                 f"calibration images; escape {m['escape']['count']}/{m['escape']['of']}, overkill "
                 f"{m['overkill']['count']}/{m['overkill']['of']}, review {m['review_rate']:.4f}")
        for line in tw.get("verdict", []):
            unmet = line.startswith(("the ", "verdict: the policy decides only")) or "every REJECT as" in line
            (log.warning if unmet else log.info)(line)
    if policy.review_threshold is not None:
        r = policy.review_target
        log.info(f"review band: {policy.review_score} < {policy.review_threshold:.6f}; review rate "
                 f"{r['achieved_review_rate']:.4f}, accuracy of the images not reviewed {r['auto_accuracy']:.4f}")
        shortfall = review_shortfall(r)
        if shortfall:
            log.warning(shortfall)
    if "pwa" in m:
        log.info(f"expected cost per image {m['expected_cost_per_image']:.3f}; PWA {m['pwa']:.6f} (auto decisions)")


def review_shortfall(target: dict[str, Any]) -> str | None:
    """A sentence when the review band sends clearly fewer images to review than asked (None otherwise).

    The band is the largest threshold whose review rate stays <= the asked rate; with few calibration images or
    tied scores the next step up would overshoot, so the achieved rate can fall well short."""
    asked, got, n = target.get("review_rate"), target.get("achieved_review_rate"), target.get("n") or 0
    if asked is None or got is None or n == 0:
        return None
    # Within half an image of the asked rate is as close as n images allow, except nothing at all: a band that
    # reviews no image is not the band that was asked for.
    if asked - got < max(0.5 / n, 0.1 * asked) and not (got == 0 < asked):
        return None
    return (f"review rate {got:.1%} ({round(got * n)} of {n} calibration images), not the {asked:.1%} asked: the "
            f"next score up would send more than {asked:.1%} to review (few images or tied scores); ask for a "
            "higher --review-rate or calibrate on more images")


def _threshold_text(t: float | None) -> str:
    return "never (this side is off)" if t is None else f"{t:.6f}"
