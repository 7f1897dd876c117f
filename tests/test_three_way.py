"""The three-way policy: PASS / REJECT / REVIEW with the escape and overkill caps held together.

Checked three ways: statistically (repeated calibration draws from known score distributions, so the true
rates at the chosen thresholds are exact), against MAPIE's Learn-Then-Test controller on the same arrays, and
through the Policy (decide, policy.json round trip, old policy files).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from defectscope.decision.calibrate import calibrate_from_logits
from defectscope.decision.outcomes import apply_policy_metrics
from defectscope.decision.policy import REVIEW, Policy, PolicyError, decide
from defectscope.decision.three_way import (
    ThreeWay,
    binomial_p_value,
    fit_three_way,
    outcomes,
    pass_candidates,
    pass_threshold,
    reject_candidates,
    reject_threshold,
    verdict_lines,
    verdicts,
)
from defectscope.decision.thresholds import CalibrationError, escape_threshold

CLASSES = ["good", "crack", "stain"]
GOOD_BETA, BAD_BETA = (5.0, 2.0), (2.0, 4.0)  # score of good and of defective images


def draw(rng: np.random.Generator, n: int, bad_share: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    bad = rng.random(n) < bad_share
    score = np.where(bad, rng.beta(*BAD_BETA, n), rng.beta(*GOOD_BETA, n))
    names = np.where(bad, np.where(rng.random(n) < 0.5, "crack", "stain"), "good").astype(object)
    return score, names


def test_both_caps_fail_together_no_more_often_than_the_confidence_allows():
    """Over many calibration draws, P(true escape > cap or true overkill > cap) <= 1 - confidence."""
    rng = np.random.default_rng(7)
    cap, confidence, draws = 0.1, 0.8, 400
    failures = automated = 0
    for _ in range(draws):
        score, names = draw(rng, 300)
        tw = fit_three_way(score, names, CLASSES, "good", max_escape=cap, max_overkill=cap, confidence=confidence)
        true_escape = stats.beta.sf(tw.pass_threshold, *BAD_BETA) if tw.pass_threshold is not None else 0.0
        true_overkill = stats.beta.cdf(tw.reject_threshold, *GOOD_BETA) if tw.reject_threshold is not None else 0.0
        failures += (true_escape > cap) or (true_overkill > cap)
        automated += tw.pass_threshold is not None and tw.reject_threshold is not None
    delta = 1 - confidence
    # Binomial slack of three standard errors on the observed failure rate.
    assert failures / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws), failures
    assert automated == draws  # the draws are large enough for both sides to be certified every time


def test_a_scan_that_ignored_the_guarantee_would_fail_often():
    """Guard against a vacuous statistical test: the empirical 10% points break the cap about half the time."""
    rng = np.random.default_rng(8)
    cap, draws, failures = 0.1, 200, 0
    for _ in range(draws):
        score, names = draw(rng, 300)
        bad = score[names != "good"]
        t = np.quantile(bad, 1 - cap)
        failures += stats.beta.sf(t, *BAD_BETA) > cap
    assert failures / draws > 0.3


def test_each_side_matches_the_single_cap_scan():
    rng = np.random.default_rng(1)
    score, names = draw(rng, 500)
    bad = names != "good"
    mine = pass_threshold(score, bad, cap=0.05, confidence=0.95)
    old = escape_threshold(score, bad, max_escape=0.05, confidence=0.95)
    assert mine.threshold == old.threshold and mine.errors == old.escapes
    # Overkill is the mirror image: reject iff score < t is pass iff -score > -t.
    ovk = reject_threshold(score, ~bad, cap=0.05, confidence=0.95)
    assert ovk.upper_bound <= 0.05 and ovk.errors == int((score[~bad] < ovk.threshold).sum())
    one_more = np.sort(score[~bad])[ovk.errors + 1]
    assert binomial_p_value(int((score[~bad] < one_more).sum()), int((~bad).sum()), 0.05) > 0.05


def _mapie_threshold(score: np.ndarray, positive: np.ndarray, grid: np.ndarray, cap: float, confidence: float):
    """MAPIE's lowest valid threshold of "predict positive iff p >= t" at FPR <= cap (fixed-sequence LTT)."""
    mapie_rc = pytest.importorskip("mapie.risk_control")
    controller = mapie_rc.BinaryClassificationController(
        predict_function=lambda x: np.c_[1 - x, x], risk=mapie_rc.false_positive_rate, target_level=cap,
        confidence_level=confidence, list_predict_params=np.sort(grid), fwer_method="fixed_sequence")
    with np.errstate(all="ignore"):
        controller.calibrate(score, positive.astype(int))
    valid = controller.valid_predict_params
    return float(np.min(valid)) if len(valid) else None


def _mapie_p_value(errors, n, cap):
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    errors, n = np.asarray(errors, dtype=float), np.asarray(n, dtype=float)
    return np.array([compute_hoeffding_bentkus_p_value(np.array([e / m]), int(m), cap, binary=True)[0, 0]
                     for e, m in zip(errors, n, strict=True)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pass_threshold_agrees_with_mapie(seed):
    """Escape = FPR of "pass" with good as the positive class. With MAPIE's own p-value our scan picks MAPIE's
    threshold exactly; with the exact binomial p-value (smaller than Hoeffding-Bentkus) it passes at least as
    much, never more than its cap allows."""
    score, names = draw(np.random.default_rng(seed), 400)
    good = names == "good"
    grid, _ = pass_candidates(score, ~good)
    theirs = _mapie_threshold(score, good, grid, 0.05, 0.95)
    same_test = pass_threshold(score, ~good, cap=0.05, confidence=0.95, p_value=_mapie_p_value)
    exact = pass_threshold(score, ~good, cap=0.05, confidence=0.95)
    assert theirs is not None and same_test.threshold == pytest.approx(theirs, abs=0, rel=0)
    assert exact.threshold <= theirs and exact.upper_bound <= 0.05


@pytest.mark.parametrize("seed", [3, 4])
def test_reject_threshold_agrees_with_mapie(seed):
    """Overkill = FPR of "reject" with defective as the positive class, scored by -score."""
    score, names = draw(np.random.default_rng(seed), 400)
    good = names == "good"
    grid, _ = reject_candidates(score, good)
    # "reject iff score < t" is "reject iff -score > -t"; MAPIE thresholds with >=, so shift by one ulp.
    flipped = -np.nextafter(grid, -np.inf)
    theirs = _mapie_threshold(-score, ~good, flipped, 0.05, 0.95)
    same_test = reject_threshold(score, good, cap=0.05, confidence=0.95, p_value=_mapie_p_value)
    exact = reject_threshold(score, good, cap=0.05, confidence=0.95)
    assert theirs is not None
    assert -np.nextafter(same_test.threshold, -np.inf) == theirs
    assert exact.threshold >= same_test.threshold


def test_too_few_images_switch_a_side_off_and_say_so():
    rng = np.random.default_rng(2)
    score, names = draw(rng, 120, bad_share=0.2)  # ~24 defective: a 1% cap needs 368 at 0.975
    tw = fit_three_way(score, names, CLASSES, "good", max_escape=0.01, max_overkill=0.05)
    assert tw.pass_threshold is None and not tw.escape.supported and tw.escape.needed == 368
    v = verdicts(score, tw.pass_threshold, tw.reject_threshold)
    assert not (v == "PASS").any()
    result = outcomes(v, names, "good", tw.critical_classes)
    lines = verdict_lines(tw, result)
    assert "needs at least 368 critical defective calibration images" in lines[0]
    assert lines[-1].startswith("verdict: the policy decides only")


def test_nuisance_escapes_are_reported_not_capped():
    rng = np.random.default_rng(3)
    score, names = draw(rng, 800)
    stains_look_good = names == "stain"
    score[stains_look_good] = rng.beta(*GOOD_BETA, int(stains_look_good.sum()))
    tw_all = fit_three_way(score, names, CLASSES, "good", max_escape=0.05, max_overkill=0.05)
    tw_crack = fit_three_way(score, names, CLASSES, "good", max_escape=0.05, max_overkill=0.05, critical=["crack"])
    assert tw_crack.nuisance_classes == ["stain"] and tw_crack.pass_threshold < tw_all.pass_threshold
    v = verdicts(score, tw_crack.pass_threshold, tw_crack.reject_threshold)
    result = outcomes(v, names, "good", ["crack"])
    assert result["nuisance_escape"]["rate"] > 0.2 and result["escape"]["rate"] <= 0.05
    with pytest.raises(CalibrationError, match="not defect classes"):
        fit_three_way(score, names, CLASSES, "good", max_escape=0.05, max_overkill=0.05, critical=["good"])


def test_crossing_thresholds_leave_no_review_band():
    score = np.r_[np.linspace(0.9, 1.0, 300), np.linspace(0.0, 0.1, 300)]
    names = np.array(["good"] * 300 + ["crack"] * 300, dtype=object)
    tw = fit_three_way(score, names, CLASSES, "good", max_escape=0.05, max_overkill=0.05)
    assert tw.pass_threshold == tw.reject_threshold and tw.notes
    assert (verdicts(score, tw.pass_threshold, tw.reject_threshold) != "REVIEW").all()


def _logits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.choice(3, n, p=[0.6, 0.25, 0.15])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 2.5
    return logits, y


def test_policy_decides_pass_reject_review_and_round_trips():
    rng = np.random.default_rng(4)
    logits, y = _logits(rng, 900)
    policy, extras = calibrate_from_logits(logits, y, CLASSES, good_class="good", max_escape=0.05,
                                           max_overkill=0.05, temperature_data=_logits(rng, 300))
    assert policy.escape_threshold is None and policy.three_way["pass_threshold"] is not None
    again = Policy.from_json(policy.to_json())
    assert again.three_way == json.loads(json.dumps(policy.three_way))
    test_logits, test_y = _logits(rng, 2000)
    labels = decide(test_logits, again, inputs="logits").labels
    assert set(labels) == {"good", "crack", "stain", REVIEW}
    m = apply_policy_metrics(test_y, test_logits, again, CLASSES, inputs="logits")
    assert m["escape"]["rate"] <= 0.05 and m["overkill"]["rate"] <= 0.05
    assert m["automation"]["rate"] == pytest.approx(1 - m["review_rate"])
    assert extras["verdict"][-1].startswith("verdict:")
    assert ThreeWay.from_dict(again.three_way).pass_threshold == again.three_way["pass_threshold"]


def test_version_one_policy_files_still_load():
    old = {"classes": CLASSES, "good_class": "good", "temperature": 1.3, "escape_threshold": 0.8,
           "escape_guarantee": {"max_escape": 0.05}, "version": 1}
    policy = Policy.from_dict(old)
    assert policy.three_way is None
    labels = decide(np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]]), policy, inputs="probs").labels
    assert list(labels) == ["good", "crack"]


def test_malformed_three_way_is_refused():
    with pytest.raises(PolicyError, match="three_way.pass_threshold"):
        Policy(classes=CLASSES, good_class="good", three_way={"pass_threshold": "high", "reject_threshold": 0.1})
    with pytest.raises(PolicyError, match="needs a good class"):
        Policy(classes=CLASSES, three_way={"pass_threshold": 0.9, "reject_threshold": 0.1})
    with pytest.raises(CalibrationError, match="together with an escape cap"):
        calibrate_from_logits(*_logits(np.random.default_rng(0), 50), CLASSES, good_class="good", max_overkill=0.05)


def test_the_line_follows_a_three_way_policy(trained_run, tmp_path):
    """calibrate -> evaluate -> export -> Predictor -> sort: the same PASS / REJECT / REVIEW everywhere, and
    every REVIEW image is filed in OUT/REVIEW where a person finds it."""
    import shutil

    import pandas as pd

    from defectscope.decision.calibrate import calibrate
    from defectscope.evaluation.evaluate import evaluate
    from defectscope.onnx_export.exporter import export
    from defectscope.runtime.predictor import Predictor
    from defectscope.station.sorter import sort

    run = shutil.copytree(trained_run, tmp_path / "run")
    # Two good calibration images: only loose caps at a low confidence can be certified on the tiny set.
    out = calibrate(run, good_class="GOOD", max_escape=0.7, max_overkill=0.7, confidence=0.6, drift_rate=None)
    tw = out["policy"]["three_way"]
    assert tw["escape"]["supported"] and tw["overkill"]["supported"]
    # Widen the band by hand so the tiny, well-separated data set sends some images to a person.
    policy = json.loads((run / "policy.json").read_text())
    policy["three_way"]["pass_threshold"], policy["three_way"]["reject_threshold"] = 0.9, 0.6
    (run / "policy.json").write_text(json.dumps(policy))
    metrics = evaluate(run, report=False)
    assert metrics["policy"]["automation"]["rate"] == pytest.approx(1 - metrics["policy"]["review_rate"])
    onnx_path = tmp_path / "model.onnx"
    export(run, onnx_path)
    predictions = pd.read_csv(run / "evaluation" / "predictions.csv")
    results = Predictor(onnx_path).predict_batch(list(predictions["path"]))
    decisions = [r.decision for r in results]
    assert decisions == list(predictions["decision"]) and REVIEW in decisions
    expected = {"GOOD": "PASS", REVIEW: "REVIEW"}
    assert [r.verdict for r in results] == [expected.get(d, "REJECT") for d in decisions]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i, path in enumerate(predictions["path"]):
        shutil.copy(path, inbox / f"{i:03d}.png")
    sort(onnx_path, inbox, tmp_path / "sorted", mode="copy", progress=False, settle_seconds=0)
    filed = sorted(p.name for p in (tmp_path / "sorted" / REVIEW).iterdir())
    assert filed == [f"{i:03d}.png" for i, d in enumerate(decisions) if d == REVIEW]
