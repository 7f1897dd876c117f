"""ONNX export: torch parity, metadata round trip, dynamic batch, quantization."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from defectscope import rundir
from defectscope.onnx_export import exporter as export_mod
from defectscope.onnx_export.exporter import ExportError, export
from defectscope.runtime import card as md
from defectscope.runtime.engines import read_metadata

ADDED_SPEC_KEYS = {"preprocessing", "graph"}


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return out, export(trained_run, out)


def onnx_metadata(path) -> dict:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def test_fp32_export_matches_torch(exported):
    _, report = exported
    parity = report["parity"]
    assert parity["split"] == "test" and parity["images"] > 0
    assert parity["max_abs_diff_probabilities"] <= 1e-4
    assert parity["argmax_mismatches"] == 0


def test_metadata_in_onnx_and_sidecar_equals_run(exported, trained_run):
    out, report = exported
    model_json = json.loads((trained_run / rundir.SPEC).read_text())
    sidecar = json.loads(md.sidecar_path(out).read_text())
    for meta in (onnx_metadata(out), read_metadata(out), sidecar):
        spec = meta[md.KEY_SPEC]
        assert {k: v for k, v in spec.items() if k not in ADDED_SPEC_KEYS} == model_json
        assert "squash" in spec["preprocessing"] and spec["graph"]["input"] == "image"
        assert meta[md.KEY_POLICY] is None
        assert meta[md.KEY_FORMAT] == md.FORMAT_VERSION
        provenance = meta[md.KEY_PROVENANCE]
        assert provenance["dataset_sha256"] == model_json["dataset_sha256"]
        assert provenance["source_run"] == str(trained_run.resolve())
    assert sidecar["export_check"] == report


def test_policy_json_is_embedded(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    policy = {"version": 1, "thresholds": {"GOOD": 0.9}, "review": "REVIEW"}
    (run / "policy.json").write_text(json.dumps(policy))
    out = tmp_path / "out" / "model.onnx"
    # Not a policy the decision module accepts (only its embedding is tested): nothing can decide with it,
    # so no runtime selection.
    export(run, out, int8=False, select=False)
    assert onnx_metadata(out)[md.KEY_POLICY] == policy
    assert json.loads(md.sidecar_path(out).read_text())[md.KEY_POLICY] == policy


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(exported, batch):
    out, _ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    size = read_metadata(out)[md.KEY_SPEC]["image_size"]
    x = np.random.default_rng(0).random((batch, 1, size, size), dtype=np.float32)
    logits, probs, features, _ = session.run(list(md.OUTPUTS), {"image": x})
    assert logits.shape == probs.shape == (batch, 3)
    assert features.shape[0] == batch and features.ndim == 2
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantization_smaller_and_reported(exported, trained_run, tmp_path, mode):
    fp32, _ = exported
    out = tmp_path / "q.onnx"
    report = export(trained_run, out, quantize=mode)
    assert out.stat().st_size <= fp32.stat().st_size
    q = report["quantized_vs_fp32"]
    assert {"accuracy_fp32", "accuracy_quantized", "accuracy_change", "max_abs_diff_probabilities"} <= set(q)
    assert q["images"] > 0 and report["quantization"]["mode"] == mode
    assert read_metadata(out)[md.KEY_PROVENANCE]["quantization"] == mode
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"image": np.zeros((2, 1, 32, 32), np.float32)})[0]
    assert probs.shape == (2, 3)


def test_failed_parity_writes_nothing(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "PARITY_TOL", -1.0)
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="disagrees"):
        export(trained_run, out)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_run_spec(trained_run):
    with pytest.raises(ExportError, match="model.json"):
        export(trained_run, trained_run / "model.onnx")


def test_unknown_quantize_mode(trained_run, tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        export(trained_run, tmp_path / "m.onnx", quantize="int4")
