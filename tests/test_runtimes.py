"""Runtimes and precisions: OpenVINO beside ONNX Runtime, the int8 model, ``auto`` selection and its records."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from defectscope.decision.calibrate import calibrate
from defectscope.onnx_export.exporter import export
from defectscope.runtime import choice as selection
from defectscope.runtime import engines as runtimes
from defectscope.runtime.engines import RuntimeUnavailable
from defectscope.runtime.predictor import Predictor

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")


@pytest.fixture(scope="module")
def drift_model(trained_run, tmp_path_factory):
    """A tiny run calibrated with a Mahalanobis Drift rule, exported with int8 and selection."""
    root = tmp_path_factory.mktemp("runtimes")
    run = shutil.copytree(trained_run, root / "run")
    calibrate(run, good_class="GOOD", max_escape=0.5, confidence=0.8, cost_matrix="valeo_pwa",
              review_rate=0.1, drift_rate=0.25, drift_score="mahalanobis")
    out = root / "export" / "model.onnx"
    report = export(run, out)
    return out, report


def with_int8(out, tmp_path):
    """``out``, or a copy with an int8 file beside it when the export dropped its refused one."""
    if runtimes.variant_path(out, "int8").is_file():
        return out
    from defectscope.onnx_export.quantize import quantize_model

    ref = selection.load_reference(out)
    copy = tmp_path / "model.onnx"
    for f in out.parent.glob("model.*"):
        shutil.copy(f, tmp_path / f.name)
    quantize_model(out, runtimes.variant_path(copy, "int8"), "static", (ref["images"][:16, None] / 255).astype("f4"))
    return copy


@pytest.fixture(scope="module")
def images(folder_dataset):
    return sorted(folder_dataset.rglob("*.png"))[:24]


def test_export_writes_int8_reference_and_selection(drift_model):
    out, report = drift_model
    assert report["int8"]["quantization"]["mode"] == "static"
    # Written only when it passes the acceptance test; on a CPU without VNNI ONNX Runtime's U8S8 kernels
    # saturate and export refuses it, saying why (never a silent absence).
    written = runtimes.variant_path(out, "int8").is_file()
    assert written == bool(report["int8"].get("written", written))
    if not written:
        assert report["int8_checks"]["model.int8.onnx"]["refused"]
    # The head and the Drift score stay in float: every node fed by the pooled features is excluded.
    assert report["int8"]["quantization"]["kept_in_float"] >= 3
    ref = selection.load_reference(out)
    assert ref["images"].dtype == np.uint8
    assert len(ref["images"]) == len(ref["labels"]) == report["reference_set"]["images"]
    assert len(ref["drift_images"]) == report["reference_set"]["drift_images"] > 0
    record = json.loads(out.with_suffix(".json").read_text())[selection.SELECTION_KEY]
    fp32 = record["candidates"]["onnxruntime_fp32"]
    assert fp32["accepted"] and fp32["decisions_changed"] == 0 and fp32["drift_auroc_change"] == 0
    assert fp32["drift_auroc"] is not None  # the model has a Drift score: its AUROC is compared
    chosen = record["chosen"]
    assert record["candidates"][chosen["key"]]["accepted"] and chosen["key"] in record["why"]
    assert record["machine_key"] == selection.machine_key(selection.machine(), record["threads"], "cpu")
    # The machine is recorded with the flags that decide bf16 / int8 speed.
    assert set(record["machine"]["matrix"]) >= {"avx512_bf16", "amx", "vnni"}
    assert record["first_start"]["peak_rss_mb"] > 0


@needs_openvino
def test_openvino_fp32_matches_onnxruntime(drift_model, images):
    out, _ = drift_model
    ort_p, ov_p = Predictor(out), Predictor(out, runtime="openvino")
    assert ov_p.runtime == "openvino" and ov_p.session is None
    a, b = ort_p.predict_batch(images), ov_p.predict_batch(images)
    for x, y in zip(a, b, strict=True):
        assert x.decision == y.decision
        np.testing.assert_allclose(list(x.probabilities.values()), list(y.probabilities.values()), atol=1e-4)
        assert y.drift_score == pytest.approx(x.drift_score, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_int8_runs_with_drift_scores(drift_model, images, runtime, tmp_path):
    out, _ = drift_model
    out = with_int8(out, tmp_path)
    fp32 = Predictor(out).predict_batch(images)
    int8 = Predictor(out, runtime=runtime, precision="int8")
    assert int8.engine.model_file.name == "model.int8.onnx" and int8.classes == Predictor(out).classes
    preds = int8.predict_batch(images)
    for q in preds:
        assert abs(sum(q.probabilities.values()) - 1) < 1e-4  # softmax stayed in float
        assert q.drift_score is not None and np.isfinite(q.drift_score)
    agree = np.mean([p.top_class == q.top_class for p, q in zip(fp32, preds, strict=True)])
    assert agree >= 0.75, agree  # a tiny, barely trained model: only gross breakage is caught here


def test_unavailable_precision_is_a_clear_error(drift_model, tmp_path):
    out, _ = drift_model
    with pytest.raises(RuntimeUnavailable, match="onnxruntime runs fp32 and int8"):
        Predictor(out, precision="bf16")
    lone = tmp_path / "model.onnx"
    shutil.copy(out, lone)
    with pytest.raises(RuntimeUnavailable, match="no int8 model"):
        Predictor(lone, precision="int8")
    with pytest.raises(ValueError, match="unknown runtime"):
        Predictor(out, runtime="tensorrt")


@needs_openvino
def test_bf16_only_where_the_cpu_has_it(drift_model):
    out, _ = drift_model
    if "BF16" in runtimes.openvino_capabilities("CPU"):
        assert Predictor(out, runtime="openvino", precision="bf16").precision == "bf16"
        assert ("openvino", "bf16") in runtimes.candidates(out)
    else:
        with pytest.raises(RuntimeUnavailable, match="no BF16 support"):
            Predictor(out, runtime="openvino", precision="bf16")
        assert ("openvino", "bf16") not in runtimes.candidates(out)


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_gpu_falls_back_to_cpu(drift_model, images, runtime, caplog):
    out, _ = drift_model
    p = Predictor(out, runtime=runtime, device="gpu")
    if runtime == "onnxruntime":
        has_gpu = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
    else:
        has_gpu = any(d.startswith("GPU") for d in runtimes._ov_core().available_devices)
    assert p.device == ("gpu" if has_gpu else "cpu")
    if not has_gpu:
        assert "running on the CPU" in caplog.text
    assert p.predict(images[0]).decision == Predictor(out).predict(images[0]).decision


def test_auto_uses_the_recorded_choice_without_measuring(drift_model, monkeypatch):
    out, _ = drift_model
    record = json.loads(out.with_suffix(".json").read_text())[selection.SELECTION_KEY]
    monkeypatch.setattr(selection, "select", lambda *a, **k: pytest.fail("measured again"))
    p = Predictor(out, runtime="auto", precision="auto", threads=record["threads"])
    assert (p.runtime, p.precision) == (record["chosen"]["runtime"], record["chosen"]["precision"])
    assert p.selection == record


def test_a_new_machine_measures_once_and_caches(drift_model, tmp_path, monkeypatch):
    out, _ = drift_model
    for f in out.parent.glob("model.*"):
        if f.suffix != ".json" or f.name == "model.json":
            shutil.copy(f, tmp_path / f.name)
    model = tmp_path / "model.onnx"
    info = {**selection.machine(), "cpu": "another CPU"}
    monkeypatch.setattr(selection, "machine", lambda: info)
    first = Predictor(model, runtime="auto", precision="auto", threads=1)
    cache = json.loads(selection.cache_path(model).read_text())
    (key, record), = cache["machines"].items()
    assert key == selection.machine_key(info, 1, "cpu") and record["machine"]["cpu"] == "another CPU"
    assert (first.runtime, first.precision) == (record["chosen"]["runtime"], record["chosen"]["precision"])
    assert "onnxruntime_fp32" in record["candidates"] and "onnxruntime_fp32_backbone_1v" in record["candidates"]

    monkeypatch.setattr(selection, "select", lambda *a, **k: pytest.fail("measured again"))
    again = Predictor(model, runtime="auto", precision="auto", threads=1)
    assert again.selection == record
    # Pinning one side of the choice picks the best accepted candidate of that side.
    pinned = Predictor(model, runtime="onnxruntime", precision="auto", threads=1)
    assert pinned.runtime == "onnxruntime" and any(
        r["accepted"] and (r["runtime"], r["precision"]) == ("onnxruntime", pinned.precision)
        for r in record["candidates"].values())


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    normal, drift = rng.normal(size=50).round(1), rng.normal(1, size=30).round(1)  # rounded: ties
    y = np.r_[np.zeros(50), np.ones(30)]
    assert selection.auroc(normal, drift) == pytest.approx(roc_auc_score(y, np.r_[normal, drift]))


@needs_openvino
def test_cli_predict_with_openvino(drift_model, images, tmp_path):
    out, _ = drift_model
    csv_out = tmp_path / "p.csv"
    done = subprocess.run([sys.executable, "-m", "defectscope.cli", "predict", str(out), *map(str, images[:3]),
                           "--runtime", "openvino", "--precision", "fp32", "--format", "csv", "--out", str(csv_out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(csv_out.read_text().splitlines()) == 4
