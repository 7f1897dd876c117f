"""The torch-free Predictor: metadata-driven preprocessing, sources, batches, unreadable files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from defectscope.data.images import ImageDecodeError
from defectscope.onnx_export.exporter import export
from defectscope.rundir import Run
from defectscope.runtime.predictor import UNREADABLE, Predictor


@pytest.fixture(scope="module")
def model_path(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("predictor") / "model.onnx"
    export(trained_run, out)
    return out


@pytest.fixture(scope="module")
def predictor(model_path):
    return Predictor(model_path)


def test_works_without_torch(model_path, folder_dataset):
    png = next((folder_dataset / "scratch").glob("*.png"))
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from defectscope.runtime.predictor import Predictor\n"
        f"print(json.dumps(Predictor({str(model_path)!r}).predict({str(png)!r}).to_dict()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["image"] == str(png)
    assert result["decision"] in ("GOOD", "scratch", "spot")


def test_every_source_type_gives_the_same_probabilities(predictor, folder_dataset):
    png = next((folder_dataset / "spot").glob("*.png"))
    with Image.open(png) as im:
        pil = im.copy()
    results = [predictor.predict(s) for s in (png, str(png), png.read_bytes(), pil, np.array(pil))]
    assert results[0].path == str(png) and results[2].path is None
    for r in results[1:]:
        assert r.probabilities == results[0].probabilities


def test_to_dict_shape(predictor, folder_dataset):
    d = predictor.predict(next((folder_dataset / "GOOD").glob("*.png"))).to_dict()
    assert list(d) == ["image", "decision", "reason", "verdict", "confidence", "top_class", "predictions",
                       "drift_score", "timing"]
    probs = [p["probability"] for p in d["predictions"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    assert d["top_class"] == d["predictions"][0]["class"] == d["decision"]  # argmax until a policy is wired
    assert d["reason"] == "most probable class"
    assert d["confidence"] == probs[0] and d["drift_score"] is None
    assert set(d["timing"]) == {"decode_ms", "infer_ms"}
    json.dumps(d)


def test_single_unreadable_raises(predictor, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageDecodeError):
        predictor.predict(bad)


def test_batch_keeps_order_and_reports_unreadable(predictor, folder_dataset, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = sorted(folder_dataset.glob("*/*.png"))[::9][:6]
    sources = [*files[:3], bad, *files[3:]]
    results = predictor.predict_batch(sources, batch_size=3)
    assert [r.path for r in results] == [str(s) for s in sources]
    assert results[3].decision == UNREADABLE and "corrupt.png" in results[3].error
    assert results[3].to_dict()["predictions"] == []
    for source, r in zip(sources, results, strict=True):
        if source != bad:
            assert r.error is None
            single = predictor.predict(source).probabilities
            assert all(abs(single[c] - p) < 1e-6 for c, p in r.probabilities.items())


def test_features_on_request(predictor, folder_dataset):
    png = next((folder_dataset / "GOOD").glob("*.png"))
    assert predictor.predict(png).features is None
    (r,) = predictor.predict_batch([png], return_features=True)
    assert r.features.ndim == 1 and r.features.size > 0


def test_probabilities_equal_torch_on_test_images(predictor, trained_run):
    """Same probabilities as the trained model fed the way training feeds it: preprocessing parity."""
    import torch

    from defectscope.data.cache import load_images
    from defectscope.models.inference import predict_logits

    run = Run(trained_run)
    table = run.rows("test").reset_index(drop=True)
    model, spec = run.model(), run.spec
    images, _ = load_images(table, spec["image_size"], resize=spec["resize"])
    expected = torch.softmax(predict_logits(model, images), 1).numpy()
    results = predictor.predict_batch(table["path"].tolist(), batch_size=4)
    got = np.array([[r.probabilities[c] for c in spec["classes"]] for r in results])
    assert len(got) == len(table) > 0
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_each_decision_says_why_and_how_sure():
    from defectscope.decision.policy import Policy, decide_rows

    classes = ["GOOD", "scratch"]
    policy = Policy(classes=classes, good_class="GOOD", temperature=1.0, escape_threshold=0.8,
                    review_threshold=0.55, drift_threshold=10.0, drift={"score": "mahalanobis"}).to_dict()
    probs = np.array([[0.95, 0.05], [0.7, 0.3], [0.52, 0.48], [0.1, 0.9], [0.95, 0.05]])
    drift = np.array([1.0, 1.0, 1.0, 1.0, 30.0])
    decisions, reasons, sure = decide_rows(probs, policy, classes, drift)
    assert decisions == ["GOOD", "scratch", "REVIEW", "scratch", "Drift"]
    assert reasons == ["most probable class", "below the escape threshold", "review band", "most probable class",
                       "Drift: unlike the training images"]
    np.testing.assert_allclose(sure[[0, 1, 3]], [0.95, 0.3, 0.9])  # the decided class's probability
    assert np.isnan(sure[[2, 4]]).all()


def test_the_drift_score_a_person_reads_is_one_at_the_line():
    from defectscope.decision.policy import relative_drift

    np.testing.assert_allclose(relative_drift([0.0, 2.75e13, 5.5e13], 2.75e13), [0.0, 1.0, 2.0])
    negative = relative_drift([-12.0, -10.0, -8.0], -10.0)  # energy-like scores below zero
    assert negative[1] == 1.0 and negative[0] < 1.0 < negative[2]
