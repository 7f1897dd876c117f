"""The main job's code path on the real ELPV images, with a tiny recipe so it runs in seconds."""

from __future__ import annotations

import logging

import pytest


@pytest.mark.real_data
@pytest.mark.slow
def test_demo_on_real_elpv(tmp_path, monkeypatch, caplog):
    from defectscope import demo as demo_module

    tiny = {**demo_module.DEMO_RECIPE, "model.name": "seed_cnn1", "model.pretrained": "none",
            "model.image_size": 32, "train.epochs": 1, "train.progress": False}
    monkeypatch.setattr(demo_module, "DEMO_RECIPE", tiny)
    with caplog.at_level(logging.INFO, logger="defectscope"):
        metrics = demo_module.demo(tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    assert metrics["n"] == pytest.approx(0.15 * 2624, abs=4)
    assert metrics["classes"] == ["defective", "functional", "likely_defective", "possibly_defective"]
    text = "\n".join(lines)
    assert "accuracy" in text and "macro-F1" in text and str(tmp_path / "run") in text
    assert "automation rate" in text and "verdict" in text
    # each silent stage says it started (a piped log is otherwise quiet for minutes)
    for stage in ("evaluating on the test split", "calibrating the decision policy", "evaluating again",
                  "exporting the ONNX model"):
        assert stage in text, stage
    assert (tmp_path / "run" / "evaluation" / "report.html").is_file()
    assert (tmp_path / "run" / "export" / "model.onnx").is_file()
    assert (tmp_path / "run" / "policy.json").is_file()
    # a second demo never overwrites the first
    demo_module.demo(tmp_path)
    assert (tmp_path / "run2" / "model.safetensors").is_file()
