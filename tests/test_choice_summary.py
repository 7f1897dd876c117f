"""The runtime choice's one-line summary: each candidate's speed, a refusal's reason beside its candidate, and a
reason shared by several untested candidates said once, with the candidates it concerns."""

from __future__ import annotations

from defectscope.runtime.choice import summary


def _record(candidates: dict) -> dict:
    return {"candidates": candidates, "chosen": {"key": "openvino_fp32", "runtime": "openvino", "precision": "fp32",
                                                 "device": "cpu"}}


def test_untested_candidates_are_listed_once_with_their_reason():
    line = summary(_record({
        "onnxruntime_fp32": {"images_per_second": 34.9, "accepted": True},
        "openvino_bf16": {"images_per_second": 100.9, "accepted": False, "refused": "5.6% of decisions differ"},
        "openvino_fp32": {"images_per_second": 43.2, "accepted": True},
        "onnxruntime_int8": {"images_per_second": 30.1, "accepted": None, "checked": False},
        "openvino_int8": {"images_per_second": 20.5, "accepted": None, "checked": False},
    }))
    assert line.count("slower than the choice") == 1
    assert "onnxruntime_int8, openvino_int8: not tested, slower than the choice" in line
    assert "openvino_bf16 100.9/s (refused: 5.6% of decisions differ)" in line
    assert "onnxruntime_int8 30.1/s" in line and "openvino_int8 20.5/s" in line
    assert " -> openvino_fp32 (cpu)" in line


def test_a_budget_reason_shared_by_several_is_also_said_once():
    spent = "not tested: the choice's time budget was spent"
    line = summary(_record({
        "openvino_fp32": {"images_per_second": 43.2, "accepted": True},
        "a_bf16": {"images_per_second": 90.0, "accepted": None, "checked": False, "refused": spent},
        "b_bf16": {"images_per_second": 80.0, "accepted": None, "checked": False, "refused": spent},
        "c_int8": {"images_per_second": 10.0, "accepted": None, "checked": False},
    }))
    assert line.count("time budget was spent") == 1 and line.count("slower than the choice") == 1
    assert f"a_bf16, b_bf16: {spent}" in line and "c_int8: not tested, slower than the choice" in line


def test_a_summary_without_untested_candidates_is_unchanged():
    line = summary(_record({"openvino_fp32": {"images_per_second": 43.2, "accepted": True},
                            "onnxruntime_fp32": {"images_per_second": 34.9, "accepted": True}}))
    assert line == "openvino_fp32 43.2/s, onnxruntime_fp32 34.9/s -> openvino_fp32 (cpu)"
