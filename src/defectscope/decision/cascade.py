"""A two-stage cascade's decision rule: a small screen passes the parts it is sure are good, the full
classifier decides the rest, and one escape cap holds for the cascade as a whole.

A defective part escapes the cascade iff the screen passes it (screen P(good) >= t_s) or the screen sends
it on and the classifier passes it. The classifier passes only parts with calibrated P(good) >= t_c (its
review band and Drift flag can only hold more back), so the escapes are contained in S | C with
S = {screen >= t_s} and C = {classifier >= t_c}: the end-to-end escape rate is at most P(S | C), and
P(S | C) <= P(S) + P(C). Two ways to bound it, both by :func:`cascade_thresholds`:

``method="split"`` (default): the cap and the risk are both split. t_s bounds the screen's miss rate
P(S) <= ``screen_share * cap`` and t_c bounds P(C) <= the rest of the cap, each with
:func:`~defectscope.decision.thresholds.escape_threshold` at confidence ``1 - (1 - confidence) / 2`` on
the same defective calibration images; by the union bound both hold at once with probability
>= ``confidence``, and then the escape is <= cap. Valid whatever the two scores are and however they
correlate, at the price of needing about twice the defective images of a single model's cap.

``method="fixed"``: t_c is fixed beforehand (given, e.g. the classifier's own policy calibrated on other
images) and t_s is scanned for the composite event S | C with the same fixed-sequence Clopper-Pearson test
as the single-model cap, at the full cap and confidence. The composite escape count only falls as t_s
rises, which is what the fixed-sequence argument needs. Tighter, but only valid when t_c did not look
at these calibration images.

The numpy part here needs no torch; :func:`cascade` runs both models of two runs on the classifier run's
calibration images and writes the cascade policy JSON that ``defectscope export-cascade`` deploys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.decision.calibrate import (
    calibration_split,
    default_good_class,
    drift_scores_for,
    drift_stages,
    paths_digest,
    split_info,
)
from defectscope.decision.policy import Policy, decide, softmax
from defectscope.decision.thresholds import (
    CalibrationError,
    cp_interval,
    cp_upper,
    escape_threshold,
    min_defective_for_cap,
)
from defectscope.rundir import CASCADE_POLICY, Run

log = logging.getLogger(__name__)

CASCADE_KIND = "defectscope.cascade"
CASCADE_VERSION = 1
METHODS = ("split", "fixed")
DEPLOY_MARGIN = 1e-5


@dataclass
class CascadeCalibration:
    """The two thresholds and the evidence for the end-to-end escape cap."""

    method: str
    screen_threshold: float
    classifier_threshold: float
    max_escape: float
    confidence: float
    n_defective: int
    n_good: int
    escapes: int  # defective calibration images in S | C
    screen_misses: int  # defective images the screen passes
    classifier_misses: int  # defective images the classifier alone would pass
    empirical_escape: float
    escape_ucb: float  # the bound the guarantee rests on (see ``bound``)
    bound: str
    overkill: float  # good images neither stage passes
    overkill_interval: list[float]
    screen_pass_rate: float  # share of all calibration images the screen decides alone
    screen_pass_rate_good: float
    screen_guarantee: dict[str, Any] | None = None
    classifier_guarantee: dict[str, Any] | None = None
    screen_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cascade_thresholds(
    screen_p_good: np.ndarray,
    classifier_p_good: np.ndarray,
    defective: np.ndarray,
    *,
    max_escape: float,
    confidence: float = 0.95,
    method: str = "split",
    screen_share: float = 0.5,
    classifier_threshold: float | None = None,
) -> CascadeCalibration:
    """Thresholds (t_s, t_c) whose end-to-end escape rate is <= ``max_escape`` with probability >=
    ``confidence`` over the draw of the calibration images (see the module docstring for both methods).

    Inputs are per calibration image: the screen's P(good), the classifier's calibrated P(good), and
    whether the image is defective. ``method="fixed"`` needs ``classifier_threshold``; ``"split"`` fits it.
    Raises :class:`CalibrationError` when the defective images are too few for the requested guarantee.
    """
    s = np.asarray(screen_p_good, dtype=np.float64)
    c = np.asarray(classifier_p_good, dtype=np.float64)
    defective = np.asarray(defective, dtype=bool)
    if not s.shape == c.shape == defective.shape or s.ndim != 1:
        raise ValueError(f"screen, classifier and defective must be equal-length 1-D arrays, got "
                         f"{s.shape}, {c.shape}, {defective.shape}")
    if not 0 < max_escape < 1 or not 0 < confidence < 1:
        raise CalibrationError("max_escape and confidence must lie strictly between 0 and 1")
    screen_g = classifier_g = None
    share = None
    if method == "split":
        if not 0 < screen_share < 1:
            raise CalibrationError(f"screen_share must lie strictly between 0 and 1, got {screen_share}")
        share = float(screen_share)
        each = 1 - (1 - confidence) / 2
        cap_s, cap_c = share * max_escape, (1 - share) * max_escape
        try:
            screen_g = escape_threshold(s, defective, max_escape=cap_s, confidence=each)
            classifier_g = escape_threshold(c, defective, max_escape=cap_c, confidence=each)
        except CalibrationError as exc:
            need = max(min_defective_for_cap(cap_s, each), min_defective_for_cap(cap_c, each))
            raise CalibrationError(
                f"a cascade escape cap of {max_escape:g} at {confidence:g} confidence, split {share:g}/{1 - share:g} "
                f"between screen and classifier, needs at least {need} defective calibration images; the "
                f"calibration set has {int(defective.sum())} ({exc}). Add defective images, loosen the cap, or use "
                f"method='fixed' with a classifier threshold fixed on other images."
            ) from exc
        t_s, t_c = screen_g.threshold, classifier_g.threshold
        bound = (f"P(screen miss) <= {cap_s:g} and P(classifier miss) <= {cap_c:g}, each at {each:g} confidence "
                 f"(Bonferroni); escape <= sum = {max_escape:g} at {confidence:g}")
        ucb = float(screen_g.escape_ucb + classifier_g.escape_ucb)
    elif method == "fixed":
        if classifier_threshold is None:
            raise CalibrationError("method='fixed' needs the classifier threshold fixed beforehand")
        t_c = float(classifier_threshold)
        t_s, ucb = _scan_screen(s[defective], c[defective] >= t_c, max_escape, confidence)
        bound = (f"fixed-sequence Clopper-Pearson on the composite escape (screen passes or classifier passes), "
                 f"classifier threshold fixed beforehand; escape <= {max_escape:g} at {confidence:g}")
    else:
        raise CalibrationError(f"unknown cascade method {method!r}; use one of {', '.join(METHODS)}")

    passed_s = s >= t_s
    passed = passed_s | (c >= t_c)
    n_def, n_good = int(defective.sum()), int((~defective).sum())
    escapes = int((passed & defective).sum())
    overkilled = int((~passed & ~defective).sum())
    return CascadeCalibration(
        method=method, screen_threshold=float(t_s), classifier_threshold=float(t_c), max_escape=float(max_escape),
        confidence=float(confidence), n_defective=n_def, n_good=n_good, escapes=escapes,
        screen_misses=int((passed_s & defective).sum()), classifier_misses=int(((c >= t_c) & defective).sum()),
        empirical_escape=escapes / n_def if n_def else float("nan"), escape_ucb=float(ucb), bound=bound,
        overkill=overkilled / n_good if n_good else float("nan"),
        overkill_interval=list(cp_interval(overkilled, n_good, confidence)),
        screen_pass_rate=float(passed_s.mean()) if len(s) else float("nan"),
        screen_pass_rate_good=float(passed_s[~defective].mean()) if n_good else float("nan"),
        screen_guarantee=screen_g.to_dict() if screen_g else None,
        classifier_guarantee=classifier_g.to_dict() if classifier_g else None, screen_share=share,
    )


def _scan_screen(s_def: np.ndarray, always: np.ndarray, cap: float, confidence: float) -> tuple[float, float]:
    """The lowest t_s passing the fixed-sequence test on the composite escape count, and its bound.

    ``always`` marks defective images the (fixed) classifier passes: they escape whatever t_s is. The
    candidates run from the strictest t_s (> 1: the screen passes nothing) downward, just above each distinct
    score of the other defective images, and the scan stops at the first failure, as in
    :func:`~defectscope.decision.thresholds.escape_threshold`.
    """
    n = len(s_def)
    base = int(always.sum())
    need = min_defective_for_cap(cap, confidence)
    if n < need:
        raise CalibrationError(
            f"an escape cap of {cap:g} at {confidence:g} confidence needs at least {need} defective calibration "
            f"images; the calibration set has {n}")
    first = cp_upper(base, n, confidence)
    if first > cap:
        raise CalibrationError(
            f"the classifier alone passes {base} of {n} defective calibration images (upper bound {first:.4f} > "
            f"cap {cap:g}): no screen threshold can help; lower the classifier threshold's escape first")
    rest = np.sort(s_def[~always])[::-1]
    levels = np.unique(rest)[::-1]
    thresholds = np.concatenate([[np.inf], np.nextafter(levels, np.inf), [0.0]])
    counts = np.concatenate([[0], np.searchsorted(-rest, -levels, side="left"), [len(rest)]]) + base
    ucb = np.atleast_1d(cp_upper(counts, n, confidence))
    fails = np.nonzero(ucb > cap)[0]
    j = (int(fails[0]) if fails.size else len(thresholds)) - 1
    return float(thresholds[j]), float(ucb[j])


# ---------------------------------------------------------------- the cascade policy file


def cascade_decide(screen_p_good: np.ndarray, classifier_scores: np.ndarray, cascade_policy: dict[str, Any],
                   *, drift_score: np.ndarray | None = None, inputs: str = "auto") -> np.ndarray:
    """Decisions of the cascade: the good class where the screen passes, else the classifier's policy."""
    policy = Policy.from_dict(cascade_policy["classifier"]["policy"])
    labels = decide(classifier_scores, policy, inputs=inputs, drift_score=drift_score).labels
    passed = np.asarray(screen_p_good, dtype=np.float64) >= cascade_policy["screen"]["threshold"]
    labels[passed] = policy.good_class
    return labels


def load_cascade_policy(path: str | Path) -> dict[str, Any]:
    """A cascade policy JSON, checked for its kind and version."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") != CASCADE_KIND:
        raise CalibrationError(f"{path}: not a defectscope cascade policy (kind {data.get('kind')!r})")
    if int(data.get("version", 0)) > CASCADE_VERSION:
        raise CalibrationError(f"{path}: cascade policy version {data['version']} is newer than this defectscope")
    Policy.from_dict(data["classifier"]["policy"])
    return data


def cascade(
    screen_run: str | Path | Run,
    classifier_run: str | Path | Run,
    *,
    out: str | Path | None = None,
    max_escape: float,
    confidence: float = 0.95,
    method: str = "split",
    screen_share: float = 0.5,
    classifier_threshold: float | None = None,
    good_class: str | None = None,
    screen_good_class: str | None = None,
) -> dict[str, Any]:
    """Calibrate a two-stage cascade and write its policy (default ``CLASSIFIER_RUN/cascade_policy.json``).

    The screen run is any run with a good class (typically a small model trained on good vs defective);
    the classifier run keeps its own policy (temperature, costs, review band, Drift) with its escape threshold
    replaced by the cascade's. Calibration images are the classifier run's (:func:`calibration_split`); the
    screen must not have trained on them. ``method="fixed"`` keeps ``classifier_threshold`` (default: the
    escape threshold of the classifier's policy.json) and is only valid when that threshold was fixed on
    other images; the written policy records whether it was. Returns the policy as written, with ``path``.
    """
    import torch

    from defectscope.decision.drift.rule import policy_forward
    from defectscope.models.screen import ScreenScore, screen_scores

    screen = screen_run if isinstance(screen_run, Run) else Run(screen_run)
    clf = classifier_run if isinstance(classifier_run, Run) else Run(classifier_run)
    classes = clf.classes
    base, good_class, screen_good_class = _good_classes(screen, clf, good_class, screen_good_class)
    rows = _calibration_rows(screen, clf)
    torch.set_num_threads(clf.config.train.threads or torch.get_num_threads())
    rows, images = clf.images(rows)
    y = clf.labels(rows)
    g = classes.index(good_class)
    defective = y != g
    features, logits, maps = policy_forward(clf.model(), images, drift_stages(base))
    p_clf = softmax(logits, base.temperature)[:, g]
    module = ScreenScore(screen.model(), screen.image_size, screen.classes.index(screen_good_class))
    p_screen = screen_scores(module, images)

    same_images = None
    if method == "fixed" and classifier_threshold is None:
        classifier_threshold, same_images = _policy_threshold(clf, base, rows)
    result = cascade_thresholds(p_screen, p_clf, defective, max_escape=max_escape, confidence=confidence,
                                method=method, screen_share=screen_share, classifier_threshold=classifier_threshold)
    _add_deploy_margin(result, good_class)
    policy_c = Policy.from_dict(base.to_dict())
    policy_c.escape_threshold = result.classifier_threshold
    policy_c.escape_guarantee = result.classifier_guarantee or {
        "cascade": "fixed beforehand", "threshold": result.classifier_threshold,
        "calibrated_on_same_images": same_images}
    drift = (drift_scores_for(clf, policy_c, features, logits, maps, images)
             if policy_c.drift_threshold is not None else None)
    policy = {
        "kind": CASCADE_KIND, "version": CASCADE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "good_class": good_class,
        "screen": {"run": str(screen.path.resolve()), "classes": screen.classes, "good_class": screen_good_class,
                   "image_size": screen.image_size, "architecture": screen.spec.get("architecture"),
                   "threshold": result.screen_threshold},
        "classifier": {"run": str(clf.path.resolve()), "image_size": clf.image_size, "policy": policy_c.to_dict()},
        "guarantee": {**result.to_dict(), "classifier_threshold_on_same_images": same_images},
        "calibration": split_info(clf.table, clf.seed),
    }
    labels = cascade_decide(p_screen, logits, policy, drift_score=drift, inputs="logits")
    policy["calibration_metrics"] = _metrics(labels, np.array(classes, dtype=object)[y], good_class)
    path = Path(out) if out is not None else clf.file(CASCADE_POLICY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy, indent=2, allow_nan=False) + "\n")
    log.info(f"cascade ({method}): screen passes P({screen_good_class}) >= {result.screen_threshold:.6f} "
             f"({result.screen_pass_rate:.1%} of calibration images decided by the screen alone), classifier "
             f"P({good_class}) >= {result.classifier_threshold:.6f}; {result.escapes}/{result.n_defective} escapes, "
             f"bound {result.escape_ucb:.4f} <= cap {max_escape:g} at {confidence:g}; overkill {result.overkill:.4f}")
    log.info(f"written: {path}")
    return {**policy, "path": str(path)}


def _good_classes(screen: Run, clf: Run, good_class: str | None,
                  screen_good_class: str | None) -> tuple[Policy, str, str]:
    """(the classifier's policy, its good class set; the classifier's good class; the screen's good class)."""
    classes = clf.classes
    base = Policy.from_dict(clf.policy) if clf.policy else None
    good_class = good_class or (base.good_class if base else None) or default_good_class(classes)
    if good_class not in classes:
        raise CalibrationError(f"{clf.path}: good class {good_class!r} is not one of the classifier's classes "
                               f"{classes}; pass good_class")
    screen_good_class = screen_good_class or (good_class if good_class in screen.classes else
                                              default_good_class(screen.classes))
    if screen_good_class not in screen.classes:
        raise CalibrationError(f"{screen.path}: no good class among the screen's classes {screen.classes}; "
                               f"pass screen_good_class")
    if base is None:
        log.info(f"{clf.path}: no policy.json; the classifier's decisions use temperature 1 and argmax")
        base = Policy(classes=classes, good_class=good_class)
    base.good_class = good_class
    return base, good_class, screen_good_class


def _calibration_rows(screen: Run, clf: Run):
    """The classifier run's calibration rows, refused when the screen trained or early-stopped on any."""
    table = clf.table
    calib_mask, _ = calibration_split(table, clf.seed)
    rows = table[calib_mask]
    if rows.empty:
        raise CalibrationError(f"{clf.path}: no calibration images (no 'calib' split and the test split is empty)")
    seen = screen.table[screen.table["split"].isin(["train", "val"])]["path"]
    overlap = sorted(set(rows["path"]) & set(seen))
    if overlap:
        raise CalibrationError(
            f"the screen {screen.path} trained or early-stopped on {len(overlap)} of the classifier's calibration "
            f"images (e.g. {overlap[0]}); its scores there are biased and void the guarantee. Train the screen "
            f"with the classifier's split (same data, seed and fractions) or give the classifier a 'calib' split.")
    return rows


def _policy_threshold(clf: Run, base: Policy, rows) -> tuple[float, bool]:
    """The escape threshold of the classifier's policy.json for ``method="fixed"``, and whether it was
    calibrated on these same rows."""
    if base.escape_threshold is None:
        raise CalibrationError(f"{clf.path}: method='fixed' needs classifier_threshold or a policy.json "
                               "with an escape threshold")
    same_images = (base.calibration or {}).get("calib_sha256") == paths_digest(rows["path"])
    if same_images:
        log.warning("the classifier's escape threshold was calibrated on these same images: the 'fixed' "
                    "method's guarantee assumes it was not (use method='split' for a strict guarantee)")
    return base.escape_threshold, same_images


def _add_deploy_margin(result: CascadeCalibration, good_class: str) -> None:
    # Raise both thresholds a hair above the calibration scores they sit on: ONNX Runtime's scores differ from
    # PyTorch's by ~1e-7, which would otherwise pass a calibration image lying exactly at the boundary. A higher
    # threshold only passes fewer parts, so the guarantee holds.
    result.screen_threshold = float(result.screen_threshold + DEPLOY_MARGIN)
    result.classifier_threshold = float(min(result.classifier_threshold + DEPLOY_MARGIN,
                                            max(result.classifier_threshold, 1.0)))
    if result.classifier_threshold > 1.0:
        # Deployed, a screen-passed part is handed to the policy as P(good) = 1; a threshold above 1 would
        # turn it away, so the exported cascade would not decide what this policy says.
        raise CalibrationError(
            f"the classifier gives calibrated P({good_class}) = 1 to defective calibration images, so its threshold "
            f"exceeds 1 and it can pass nothing; retrain or recalibrate the classifier (a higher temperature)")


def _metrics(labels: np.ndarray, truth: np.ndarray, good: str) -> dict[str, Any]:
    """End-to-end escape, overkill and accuracy of decided labels (REVIEW and Drift count as not passed)."""
    defective = truth != good
    passed = labels == good
    n_d, n_g = int(defective.sum()), int((~defective).sum())
    return {"n": int(len(truth)), "accuracy": float((labels == truth).mean()) if len(truth) else float("nan"),
            "escape": float((passed & defective).sum() / n_d) if n_d else None,
            "overkill": float((~passed & ~defective).sum() / n_g) if n_g else None,
            "decisions": {str(k): int(v) for k, v in zip(*np.unique(labels.astype(str), return_counts=True),
                                                           strict=True)}}
