"""The photometric Drift score: grey-level statistics, their Mahalanobis distance, and the same in the graph."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from defectscope.decision.drift import DriftError
from defectscope.decision.drift.photometric import PhotometricGaussian, grey_stats


def _normal_images(rng: np.random.Generator, n: int, size: int = 24) -> np.ndarray:
    base = rng.uniform(90, 150, (n, 1, 1))
    return np.clip(base + rng.normal(0, 25, (n, size, size)), 0, 255).astype(np.uint8)


def test_grey_stats_against_a_hand_computation():
    img = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    x = img / 255.0
    mean, std = x.mean(), x.std()
    gx = (abs(x[0, 1] - x[0, 0]) + abs(x[1, 1] - x[1, 0])) / 2
    gy = (abs(x[1, 0] - x[0, 0]) + abs(x[1, 1] - x[0, 1])) / 2
    expected = [mean, np.log(std + 1e-3), np.log(gx + 1e-3), np.log(gy + 1e-3)]
    np.testing.assert_allclose(grey_stats(img[None]), [expected], rtol=1e-12)
    # floats in [0, 1] and a channel axis give the same statistics
    np.testing.assert_allclose(grey_stats(x[None, None]), [expected], rtol=1e-12)
    with pytest.raises(DriftError, match="grey images"):
        grey_stats(np.zeros((2, 1, 5), np.uint8))


def test_score_is_the_mahalanobis_distance_of_the_statistics():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train, test = _normal_images(rng, 80), _normal_images(rng, 10)
    g = PhotometricGaussian().fit(train)
    lw = LedoitWolf().fit(grey_stats(train))
    np.testing.assert_allclose(g.score(test), np.sqrt(lw.mahalanobis(grey_stats(test))), rtol=1e-9)
    again = PhotometricGaussian.from_dict(g.to_dict())  # through policy.json's plain JSON
    np.testing.assert_allclose(again.score(test), g.score(test), rtol=1e-12)
    with pytest.raises(DriftError, match="calibrate the run again"):
        PhotometricGaussian.from_dict({**g.to_dict(), "stats": ["mean"]})


def test_exposure_and_contrast_faults_score_far_above_normal_images():
    """What the feature scores miss on ELPV: the same part, darker or flatter."""
    from defectscope.data.corruptions import corrupt

    rng = np.random.default_rng(1)
    g = PhotometricGaussian().fit(_normal_images(rng, 200))
    normal = _normal_images(rng, 50)
    worst_normal = g.score(normal).max()
    for kind in ("underexposure", "contrast_loss", "defocus_blur", "gaussian_noise"):
        assert g.score(corrupt(normal, kind, seed=0)).min() > worst_normal, kind


def test_graph_head_matches_numpy():
    import torch

    from defectscope.onnx_export.drift_heads import PhotometricDriftHead

    rng = np.random.default_rng(2)
    g = PhotometricGaussian().fit(_normal_images(rng, 60))
    images = np.concatenate([_normal_images(rng, 8), np.zeros((1, 24, 24), np.uint8)])  # a constant image too
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255))[:, None]
    head = PhotometricDriftHead(g).eval()
    np.testing.assert_allclose(head(x).numpy(), g.score(images), rtol=1e-4)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run")


def test_calibrate_photometric_records_its_statistics_in_the_policy(run_copy, tmp_path):
    """policy.json carries the photometric Gaussian (no extra file); evaluate and drift-eval compute it."""
    from defectscope.decision.calibrate import calibrate, drift_scores_for
    from defectscope.decision.drift.photometric import fit_photometric
    from defectscope.decision.drift.rule import policy_forward
    from defectscope.decision.policy import Policy
    from defectscope.evaluation.evaluate import evaluate
    from defectscope.rundir import Run

    policy = Policy.from_dict(calibrate(run_copy, drift_score="photometric", drift_rate=0.2)["policy"])
    assert policy.drift["score"] == "photometric" and policy.drift["photometric"]["stats"][0] == "mean"
    run = Run(run_copy)
    _, test = run.images(run.rows("test"))
    f, lg, _ = policy_forward(run.model(), test, None)
    np.testing.assert_allclose(drift_scores_for(run, policy, f, lg, None, test), fit_photometric(run).score(test))
    with pytest.raises(DriftError, match="needs the images"):
        drift_scores_for(run, policy, f, lg)
    assert "drift_rate" in evaluate(run_copy, out=tmp_path / "eval", report=False)["policy"]
