"""Per-class purity of REJECT decisions: the guarantee on repeated synthetic draws, the rule inside ``decide``,
the flag's parsing, old policies, and calibrate -> export -> Predictor on the tiny run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectscope.cli.options import per_class_numbers
from defectscope.decision.calibrate import calibrate_from_logits
from defectscope.decision.outcomes import apply_policy_metrics
from defectscope.decision.policy import PURITY_REASON, REVIEW, Policy, PolicyError, decide, purity_kept
from defectscope.decision.reject_purity import GRID, fallback_levels, resolve_targets
from defectscope.decision.thresholds import CalibrationError
from defectscope.errors import UsageError

CLASSES = ["good", "crack", "stain", "dust"]
PRIOR = [0.5, 0.2, 0.15, 0.15]
# Stain and dust look alike (their logits share a bump): REJECTs as them are impure even when the model is sure;
# crack's purity crosses 90% in the middle of the grid, where an uncorrected pick lands too low.
SIGNAL = np.array([[2.6, 0, 0, 0], [0, 2.4, 0, 0], [0, 0, 2.0, 0.8], [0, 0, 0.8, 2.0]])


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.choice(len(CLASSES), n, p=PRIOR)
    return rng.normal(size=(n, len(CLASSES))) + SIGNAL[y], y


VAL = draw(np.random.default_rng(99), 400)  # fixed before any calibration draw: the temperature's images
BIG = draw(np.random.default_rng(98), 40_000)  # stands in for production: the true purity of a fitted rule


def _fit(logits, y, **kw):
    policy, _ = calibrate_from_logits(logits, y, CLASSES, good_class="good", max_escape=0.1, max_overkill=0.1,
                                      confidence=kw.pop("confidence", 0.8), temperature_data=VAL, **kw)
    return policy


def _true_purity(policy: Policy) -> dict[str, float]:
    labels = decide(BIG[0], policy, inputs="logits").labels
    names = np.array(CLASSES, dtype=object)[BIG[1]]
    return {c: float(np.mean(names[labels == c] == c)) for c in CLASSES[1:] if (labels == c).any()}


@pytest.mark.slow
def test_reject_purity_falls_below_target_no_more_often_than_the_confidence_allows():
    """Over many calibration draws (every threshold refitted, the REJECT threshold included), P(some class's
    true REJECT purity < its target) <= 1 - confidence; an uncorrected pick fails far more often."""
    rng = np.random.default_rng(3)
    target, confidence, draws = 0.9, 0.8, 120
    failures = naive_failures = certified = 0
    for _ in range(draws):
        logits, y = draw(rng, 1000)
        policy = _fit(logits, y, reject_purity=target, confidence=confidence)
        gates = policy.three_way["reject_purity"]["classes"]
        truth = _true_purity(policy)
        failures += any(truth.get(c, 1.0) < target for c, e in gates.items() if e["threshold"] is not None)
        certified += sum(e["threshold"] is not None for e in gates.values())
        naive_failures += _naive_fails(policy, logits, y, target)
    delta = 1 - confidence
    assert failures / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws), failures
    assert certified >= 0.8 * draws  # the test has something to check: thresholds are certified
    assert naive_failures / draws > delta + 0.1, naive_failures  # the scenario can break a purity target


def _naive_fails(policy: Policy, logits: np.ndarray, y: np.ndarray, target: float) -> bool:
    """The lowest grid point whose empirical purity reaches the target, no test: does it miss in production?"""
    naive = json.loads(json.dumps(policy.three_way))
    base = Policy.from_dict({**policy.to_dict(), "three_way": {**naive, "reject_purity": None}})
    labels = decide(logits, base, inputs="logits").labels
    probs = decide(logits, base, inputs="logits").probs
    names = np.array(CLASSES, dtype=object)[y]
    for c, entry in naive["reject_purity"]["classes"].items():
        mine = labels == c
        q = probs[mine, CLASSES.index(c)]
        ok = [t for t in GRID if (q >= t).any() and np.mean(names[mine][q >= t] == c) >= target]
        entry["threshold"] = min(ok) if ok else None
    truth = _true_purity(Policy.from_dict({**policy.to_dict(), "three_way": naive}))
    return any(truth.get(c, 1.0) < target for c, e in naive["reject_purity"]["classes"].items()
               if e["threshold"] is not None)


def test_the_readme_states_the_images_a_target_needs():
    from pathlib import Path

    from defectscope.decision.reject_purity import class_purity

    needed = class_purity(np.zeros(0), np.zeros(0, dtype=bool), 0.9, confidence=1 - 0.05 / 3,
                          policy_confidence=0.95).needed
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"a 90% target needs at least {needed} calibration REJECTs" in readme


def test_fallback_levels_pass_a_certified_level_on_and_restart_after_a_failure():
    certified, levels = fallback_levels(np.array([1.0, 0.001, 0.015, 1.0, 0.009]), 0.05)
    assert certified.tolist() == [False, True, True, False, True]
    assert levels == pytest.approx([0.01, 0.01, 0.02, 0.03, 0.01])


def test_purity_only_moves_rejects_to_review_and_leaves_the_caps_alone():
    rng = np.random.default_rng(5)
    logits, y = draw(rng, 900)
    plain, gated = _fit(logits, y), _fit(logits, y, reject_purity={"stain": 0.97, "*": 0.85})
    assert {k: plain.three_way[k] for k in ("pass_threshold", "reject_threshold")} == \
        {k: gated.three_way[k] for k in ("pass_threshold", "reject_threshold")}
    test_logits, test_y = draw(rng, 3000)
    a, b = decide(test_logits, plain, inputs="logits"), decide(test_logits, gated, inputs="logits")
    changed = a.labels != b.labels
    assert changed.any() and set(b.labels[changed]) == {REVIEW} and set(b.reasons[changed]) == {PURITY_REASON}
    assert not np.isin(a.labels[changed], ["good", REVIEW]).any()  # only REJECTs move
    m = apply_policy_metrics(test_y, test_logits, gated, CLASSES, inputs="logits")
    m0 = apply_policy_metrics(test_y, test_logits, plain, CLASSES, inputs="logits")
    assert m["escape"] == m0["escape"] and m["automation"]["rate"] < m0["automation"]["rate"]
    assert set(m["reject_purity"]) == {"crack", "stain", "dust"}
    assert m["reject_purity"]["stain"]["target"] == 0.97
    tw = gated.three_way["reject_purity"]
    assert tw["class_confidence"] == pytest.approx(1 - 0.2 / 3)  # Bonferroni across the three classes
    assert any(line.startswith("REJECT purity of stain") for line in gated.three_way["verdict"])


def test_a_class_the_data_cannot_certify_sends_every_reject_as_it_to_review_and_says_so():
    rng = np.random.default_rng(6)
    logits, y = draw(rng, 250)
    policy = _fit(logits, y, reject_purity={"dust": 0.995})
    entry = policy.three_way["reject_purity"]["classes"]["dust"]
    assert entry["threshold"] is None and not entry["supported"]
    line = next(x for x in policy.three_way["verdict"] if x.startswith("REJECT purity of dust"))
    assert "every REJECT as dust goes to REVIEW" in line
    labels = decide(draw(rng, 2000)[0], policy, inputs="logits").labels
    assert "dust" not in set(labels) and "stain" in set(labels)  # ungated classes are still rejected as themselves


def test_the_gate_reads_the_policy_file_and_refuses_a_malformed_one():
    probs = np.array([[0.1, 0.85, 0.03, 0.02], [0.1, 0.5, 0.3, 0.1], [0.1, 0.1, 0.45, 0.35]])
    decided = np.array(["crack", "crack", "stain"], dtype=object)
    purity = {"score": "probability", "classes": {"crack": {"threshold": 0.8}, "stain": {"threshold": None}}}
    assert purity_kept(probs, CLASSES, decided, purity).tolist() == [True, False, False]
    margin = {"score": "margin", "classes": {"crack": {"threshold": 0.3}}}
    assert purity_kept(probs, CLASSES, decided, margin).tolist() == [True, False, True]
    tw = {"pass_threshold": 0.9, "reject_threshold": 0.5}
    with pytest.raises(PolicyError, match="'good', which is not a defect class"):
        Policy(classes=CLASSES, good_class="good", three_way={**tw, "reject_purity": {
            "score": "probability", "classes": {"good": {"threshold": 0.5}}}})
    with pytest.raises(PolicyError, match="crack.threshold"):
        Policy(classes=CLASSES, good_class="good", three_way={**tw, "reject_purity": {
            "score": "probability", "classes": {"crack": {"threshold": "high"}}}})


def test_a_policy_without_purity_still_loads_and_decides_as_before():
    old = {"classes": CLASSES, "good_class": "good", "temperature": 1.0, "version": 2,
           "three_way": {"pass_threshold": 0.8, "reject_threshold": 0.3}}
    labels = decide(np.array([[0.9, 0.05, 0.03, 0.02], [0.1, 0.4, 0.3, 0.2], [0.5, 0.2, 0.2, 0.1]]),
                    Policy.from_dict(old), inputs="probs").labels
    assert list(labels) == ["good", "crack", REVIEW]


def test_per_class_numbers_parse_and_name_what_is_wrong():
    assert per_class_numbers("--reject-purity", "0.9") == 0.9
    assert per_class_numbers("--reject-purity", "scratch=0.95, particle=0.8") == {"scratch": 0.95, "particle": 0.8}
    assert per_class_numbers("--reject-purity", "0.9,scratch=0.95") == {"*": 0.9, "scratch": 0.95}
    with pytest.raises(UsageError, match="'high' is not a number \\(for class 'scratch'\\)"):
        per_class_numbers("--reject-purity", "scratch=high")
    with pytest.raises(UsageError, match="each class once"):
        per_class_numbers("--reject-purity", "scratch=0.9,scratch=0.8")


def test_purity_targets_name_a_class_that_does_not_exist_with_the_nearest_one():
    classes = ["GOOD", "scratch", "spot"]
    assert resolve_targets({"*": 0.9, "spot": 0.8}, classes, "GOOD") == {"scratch": 0.9, "spot": 0.8}
    with pytest.raises(CalibrationError, match="no defect class 'scrach' \\(did you mean 'scratch'\\?\\)"):
        resolve_targets({"scrach": 0.9}, classes, "GOOD")
    with pytest.raises(CalibrationError, match="'GOOD' is the good class"):
        resolve_targets({"GOOD": 0.9}, classes, "GOOD")
    with pytest.raises(CalibrationError, match="strictly between 0 and 1"):
        resolve_targets(1.0, classes, "GOOD")
    with pytest.raises(CalibrationError, match="three-way policy"):
        calibrate_from_logits(*draw(np.random.default_rng(0), 80), CLASSES, good_class="good", max_escape=0.2,
                              reject_purity=0.9)


def test_calibrate_flag_refuses_a_misspelt_class_in_one_line(trained_run, tmp_path, capsys):
    import shutil

    from defectscope.cli import main

    run = shutil.copytree(trained_run, tmp_path / "run")
    code = main(["calibrate", str(run), "--max-escape", "0.7", "--max-overkill", "0.7", "--reject-purity",
                 "scrath=0.9", "--no-drift"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'scrath'" in err and "did you mean 'scratch'" in err
    assert not (run / "policy.json").exists() or json.loads((run / "policy.json").read_text()) == json.loads(
        (trained_run / "policy.json").read_text())


def test_calibrate_with_purity_then_export_then_predictor_decides_as_python(trained_run, tmp_path):
    """calibrate --reject-purity -> export -> the torch-free Predictor: its decisions are the policy's in python
    on the same probabilities, the purity gate included."""
    import shutil

    from defectscope.decision.calibrate import calibrate
    from defectscope.onnx_export.exporter import export
    from defectscope.runtime.predictor import Predictor

    run = shutil.copytree(trained_run, tmp_path / "run")
    out = calibrate(run, good_class="GOOD", max_escape=0.7, max_overkill=0.7, confidence=0.6, drift_rate=None,
                    reject_purity={"scratch": 0.5, "spot": 0.5})
    purity = out["policy"]["three_way"]["reject_purity"]
    assert set(purity["classes"]) == {"scratch", "spot"} and purity["confidence"] == 0.6
    # The tiny set certifies little: set the gates by hand so the exported rule has both outcomes to get right.
    policy = json.loads((run / "policy.json").read_text())
    policy["three_way"]["reject_threshold"] = policy["three_way"]["pass_threshold"]
    policy["three_way"]["reject_purity"]["classes"]["scratch"]["threshold"] = 0.9
    policy["three_way"]["reject_purity"]["classes"]["spot"]["threshold"] = None
    (run / "policy.json").write_text(json.dumps(policy))
    onnx_path = tmp_path / "model.onnx"
    export(run, onnx_path)
    from defectscope.rundir import Run

    paths = list(Run(run).table["path"])
    results = Predictor(onnx_path).predict_batch(paths)
    probs = np.array([[r.probabilities[c] for c in Run(run).classes] for r in results])
    python = decide(probs, Policy.from_dict(policy), inputs="probs")
    assert [r.decision for r in results] == [str(x) for x in python.labels]
    assert [r.reason for r in results] == [str(x) for x in python.reasons]
    decisions = {r.decision for r in results}
    assert "spot" not in decisions and REVIEW in decisions
    assert PURITY_REASON in {r.reason for r in results}
    from defectscope.evaluation.evaluate import evaluate

    metrics = evaluate(run)  # evaluate's metrics and the report's policy section carry the per-class purity
    assert set(metrics["policy"]["reject_purity"]) == {"scratch", "spot"}
    assert metrics["policy"]["reject_purity"]["spot"]["of"] == 0
    html = (run / "evaluation" / "report.html").read_text()
    assert "REJECT purity" in html and "every REJECT as it goes to REVIEW" in html


def test_acceptance_measures_a_flip_across_a_purity_threshold_from_that_threshold():
    """An int8 candidate moving a REJECT as crack to REVIEW near crack's purity threshold is rounding, not a change
    of behaviour: its distance is to that threshold, not to the (far) escape-score thresholds."""
    from defectscope.runtime.acceptance import MAX_FLIP_LOG_ODDS, flips

    policy = Policy(classes=CLASSES, good_class="good", three_way={
        "pass_threshold": 0.9, "reject_threshold": 0.5,
        "reject_purity": {"score": "probability", "classes": {"crack": {"threshold": 0.8}}}})
    fp32 = np.array([[0.05, 0.81, 0.07, 0.07]])
    candidate = np.array([[0.05, 0.79, 0.08, 0.08]])
    d32, d = (list(decide(p, policy, inputs="probs").labels) for p in (fp32, candidate))
    assert (d32, d) == (["crack"], [REVIEW])
    row = flips(d32, d, fp32, np.zeros(1), policy, drift_on=False)[0]
    assert row["log_odds_from_purity_threshold"] == pytest.approx(0.0645, abs=1e-3)
    assert row["distance"] < MAX_FLIP_LOG_ODDS < row["log_odds_from_threshold"]
