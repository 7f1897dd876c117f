"""The whole chain on tiny data: train -> calibrate (with Drift) -> evaluate -> export -> predict -> sort.

Every consumer applies the one policy through one function, so the exported model must decide exactly
what evaluate decided.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from defectscope.decision.calibrate import calibrate
from defectscope.evaluation.evaluate import evaluate
from defectscope.onnx_export.exporter import export
from defectscope.runtime.predictor import Predictor

quiet: dict = {}


@pytest.fixture(scope="module")
def calibrated_run(trained_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    shutil.copytree(trained_run, run)
    # The tiny run has few calibration images: a loose cap and a 25% false-flag rate keep it feasible.
    calibrate(run, good_class="GOOD", max_escape=0.5, confidence=0.8, cost_matrix="valeo_pwa",
              review_rate=0.1, drift_rate=0.25, drift_score="mahalanobis", **quiet)
    return run


def test_policy_has_drift_and_files(calibrated_run):
    policy = json.loads((calibrated_run / "policy.json").read_text())
    assert policy["drift"]["score"] == "mahalanobis"
    assert policy["drift_threshold"] is not None
    assert (calibrated_run / "drift.safetensors").is_file()


def test_exported_model_decides_like_evaluate(calibrated_run, tmp_path):
    metrics = evaluate(calibrated_run, report=False, **quiet)
    assert "policy" in metrics and metrics["policy"]["n"] == metrics["n"]
    onnx_path = tmp_path / "model.onnx"
    report = export(calibrated_run, onnx_path, **quiet)
    assert report["parity"]["drift_score"] == "mahalanobis"
    assert report["parity"]["max_rel_diff_drift_score"] < 1e-4
    predictions = pd.read_csv(calibrated_run / "evaluation" / "predictions.csv")
    predictor = Predictor(onnx_path)
    results = predictor.predict_batch(list(predictions["path"]))
    assert [r.decision for r in results] == list(predictions["decision"])
    assert np.allclose([r.drift_score for r in results], predictions["drift_score"], rtol=1e-3, atol=1e-3)


def test_far_drift_image_is_flagged_by_the_predictor(calibrated_run, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    export(calibrated_run, onnx_path, **quiet)
    predictor = Predictor(onnx_path)
    checker = np.indices((40, 40)).sum(0) % 2 * 255  # a checkerboard: nothing like the training images
    result = predictor.predict(checker.astype(np.uint8))
    assert result.decision == "Drift"
    assert result.drift_score > 1.0  # relative to the policy's Drift line, which is 1.0


def test_an_image_that_fails_to_decode_is_an_error_not_drift(calibrated_run, tmp_path):
    from defectscope.data.images import ImageDecodeError
    from defectscope.runtime.predictor import UNREADABLE

    onnx_path = tmp_path / "model.onnx"
    export(calibrated_run, onnx_path, **quiet)
    predictor = Predictor(onnx_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ImageDecodeError):
        predictor.predict(broken)
    (row,) = predictor.predict_batch([broken])
    assert row.decision == UNREADABLE and row.error and row.drift_score is None
