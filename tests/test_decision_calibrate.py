"""calibrate() on a real (tiny) trained run: writes policy.json, refuses caps its data cannot support."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from defectscope import rundir
from defectscope.config import load_yaml
from defectscope.decision.calibrate import calibrate, calibration_split
from defectscope.decision.policy import Policy, decide
from defectscope.decision.thresholds import CalibrationError


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run")


def test_calibrate_writes_policy(run_copy):
    out = calibrate(run_copy, max_escape=0.5, confidence=0.8, cost_matrix="valeo_pwa", review_rate=0.2)
    path = run_copy / "policy.json"
    assert out["path"] == str(path)
    policy = Policy.from_json(path)
    assert policy.to_dict() == out["policy"] == json.loads(path.read_text())
    assert policy.good_class == "GOOD" and policy.temperature > 0
    g = policy.escape_guarantee
    assert g["escape_ucb"] <= 0.5 and g["n_defective"] >= g["min_defective_needed"]
    assert policy.cost_matrix["classes"][-1] == "Drift"
    assert policy.review_target["review_rate"] == 0.2 and policy.review_threshold is not None
    table = rundir.read_table(run_copy)
    seed = int(load_yaml(run_copy / rundir.CONFIG).get("seed", 0))
    calib, held = calibration_split(table, seed)
    assert policy.calibration["n_calib"] == calib.sum() and policy.calibration["n_eval"] == held.sum()
    d = decide(np.zeros((2, 3)), policy)
    assert len(d.labels) == 2
    m = out["calibration_metrics"]
    assert m["n"] == calib.sum() and "pwa" in m


def test_calibrate_refuses_too_few_defective(run_copy):
    with pytest.raises(CalibrationError, match="at least 299 defective"):
        calibrate(run_copy, max_escape=0.01)
    assert not (run_copy / "policy.json").exists()
