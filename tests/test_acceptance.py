"""The runtime acceptance test, the staged (backbone + fp32 head) model and its views, the bounded choice."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from defectscope.decision.calibrate import calibrate
from defectscope.onnx_export.exporter import export
from defectscope.runtime import acceptance, staged
from defectscope.runtime import choice as selection
from defectscope.runtime import engines as runtimes


@pytest.fixture(scope="module")
def model(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("acceptance")
    run = shutil.copytree(trained_run, root / "run")
    calibrate(run, good_class="GOOD", max_escape=0.5, confidence=0.8, review_rate=0.1, drift_rate=0.25,
              drift_score="mahalanobis")
    out = root / "export" / "model.onnx"
    return out, export(run, out, select=False)


def _check(out, probs, drift=None):
    ref, card = selection.load_reference(out), runtimes.read_card(out)
    drift = ref["fp32_drift"] if drift is None else drift
    return acceptance.check(probs, drift, ref["fp32_drift_on_drift"], ref, card.policy, card.classes), ref, card


def test_the_reference_passes_and_a_cap_breaking_candidate_is_refused(model):
    out, _ = model
    ref = selection.load_reference(out)
    same, _, card = _check(out, ref["fp32_probabilities"])
    assert same["accepted"] and same["differing"]["count"] == 0
    # A deliberately bad candidate: every image looks certainly good, so every defect is PASSed.
    good = card.classes.index(card.policy["good_class"])
    bad = np.full_like(ref["fp32_probabilities"], 1e-6)
    bad[:, good] = 1 - 1e-6 * (bad.shape[1] - 1)
    refused, _, _ = _check(out, bad)
    assert not refused["accepted"] and "breaks the" in refused["refused"]
    assert refused["caps"]["escape"]["held"] is False
    assert refused["differing"]["far"] > 0  # and its flips are far from any threshold


def test_flips_are_listed_with_their_log_odds_distance(model):
    out, _ = model
    ref = selection.load_reference(out)
    p = ref["fp32_probabilities"].astype(np.float64)
    nudged = p * np.exp(np.random.default_rng(0).normal(0, 0.05, p.shape))
    nudged = (nudged / nudged.sum(1, keepdims=True)).astype(np.float32)
    test, _, _ = _check(out, nudged)
    for flip in test["differing"]["listed"]:
        assert flip["distance"] is not None and flip["fp32"] != flip["candidate"]
    assert acceptance.log_odds(0.99) - acceptance.log_odds(0.983) == pytest.approx(0.53, abs=0.01)


def test_views_match_the_torch_views():
    import torch

    from defectscope.models.heads import dihedral

    x = np.random.default_rng(0).random((2, 1, 5, 5)).astype(np.float32)
    for k in range(8):
        np.testing.assert_array_equal(staged.view(x, k), dihedral(torch.from_numpy(x), k).numpy())
    assert staged.line_views([0, 1, 2, 3], 2) == [0, 2]


def test_staged_fp32_matches_the_whole_graph(model):
    out, report = model
    assert report["stages"]["written"] and report["stages"]["parity"]["ok"]
    card = runtimes.read_card(out)
    full = runtimes.create_engine(out)
    pair = selection.engine_for(out, {"runtime": "onnxruntime", "precision": "fp32", "layout": "staged",
                                      "views": len(card.spec.get("views") or [0])})
    x = (selection.load_reference(out)["images"][:16, None] / 255).astype(np.float32)
    np.testing.assert_allclose(pair.run(x)[0], full.run(x)[0], atol=1e-4)


def test_the_staged_backbone_is_called_in_bounded_chunks(model, monkeypatch):
    # Memory: a runtime keeps the working memory of the largest call it saw, so views x batch is split.
    out, _ = model
    card = runtimes.read_card(out)
    pair = selection.engine_for(out, {"runtime": "onnxruntime", "precision": "fp32", "layout": "staged",
                                      "views": len(card.spec.get("views") or [0])})
    x = (selection.load_reference(out)["images"][:7, None] / 255).astype(np.float32)
    whole = pair.features_of(x)
    sizes = []
    run = pair.backbone.run
    monkeypatch.setattr(pair.backbone, "run", lambda b, names: sizes.append(len(b)) or run(b, names))
    monkeypatch.setattr(staged, "MAX_CALL", 3)
    np.testing.assert_allclose(pair.features_of(x), whole, atol=1e-5)
    assert max(sizes) <= 3 and sum(sizes) == 7 * len(pair.views)


def test_the_pre_screen_refuses_only_what_the_full_check_refuses(model):
    out, _ = model
    ref, card = selection.load_reference(out), runtimes.read_card(out)
    good = card.classes.index(card.policy["good_class"])
    bad = ref["fp32_probabilities"].copy()
    bad[:, :] = 1e-6
    bad[:, good] = 1 - 1e-6 * (bad.shape[1] - 1)  # every image certainly good: far flips on the defective ones
    n = len(ref["labels"]) // 2
    defective = np.nonzero(ref["labels"][:n] != good)[0]
    assert len(defective), "the check set's first images hold defective ones"
    screened = acceptance.screen(bad[:n], ref["fp32_drift"][:n], ref, card.policy, card.classes)
    full, _, _ = _check(out, bad)
    assert screened["far"] > 0 and "pre-screen" in screened["refused"] and not full["accepted"]
    # The same bad outputs only beyond the first n images: the screen sees nothing, the full check decides.
    late = ref["fp32_probabilities"].copy()
    late[n:] = bad[n:]
    clean = acceptance.screen(late[:n], ref["fp32_drift"][:n], ref, card.policy, card.classes)
    assert clean["far"] == 0 and "refused" not in clean
    assert not _check(out, late)[0]["accepted"]


def test_a_spent_budget_keeps_the_reference_and_says_what_was_left_out(model, tmp_path):
    out, _ = model
    for f in out.parent.glob("model.*"):
        if f.name != "model.runtime.json":
            shutil.copy(f, tmp_path / f.name)
    copy = tmp_path / "model.onnx"
    record = selection.select(copy, threads=1, bench_images=16, passes=1, choice_seconds=1e-6)
    assert list(record["candidates"])[0] == "onnxruntime_fp32"  # the fallback is measured first
    assert record["chosen"]["key"] == "onnxruntime_fp32"
    left = [k for k, r in record["candidates"].items() if r.get("measured") is False]
    assert record["budget"]["spent"] and record["budget"]["not_measured"] == left
    assert len(left) == len(record["candidates"]) - 1 and "budget" in record["why"]


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None
                    or "BF16" not in runtimes.openvino_capabilities("CPU"), reason="no OpenVINO bf16 here")
def test_bf16_backbone_fp32_head_agrees_away_from_thresholds(model):
    out, _ = model
    card = runtimes.read_card(out)
    engine = selection.engine_for(out, {"runtime": "openvino", "precision": "bf16", "layout": "staged",
                                        "views": len(card.spec.get("views") or [0])})
    ref = selection.load_reference(out)
    probs, drift = selection._outputs(engine, ref["images"])
    test, _, _ = _check(out, probs, drift)
    # Every image whose decision differs was near a threshold: none farther than the rule allows.
    assert all(f["distance"] <= acceptance.MAX_FLIP_LOG_ODDS for f in test["differing"]["listed"]), test["differing"]


def test_refused_int8_files_are_not_left_beside_the_model(model, tmp_path, monkeypatch):
    from defectscope.onnx_export import stages
    from defectscope.onnx_export.backbone_int8 import quantize_backbone
    from defectscope.onnx_export.quantize import quantize_model
    from defectscope.runtime import staged

    out, _ = model
    for f in out.parent.glob("model.*"):
        shutil.copy(f, tmp_path / f.name)
    copy = tmp_path / "model.onnx"
    x = (selection.load_reference(copy)["images"][:8, None] / 255).astype(np.float32)
    quantize_model(copy, runtimes.variant_path(copy, "int8"), "static", x)
    backbone = staged.backbone_path(copy, "int8")
    assert staged.backbone_path(copy).is_file()
    quantize_backbone(staged.backbone_path(copy), backbone, x, [0])
    monkeypatch.setattr(acceptance, "check", lambda *a, **k: {"accepted": False, "refused": "deliberately"})
    verdicts = stages.drop_refused_int8(copy)
    assert verdicts["model.int8.onnx"]["written"] is False and not runtimes.variant_path(copy, "int8").exists()
    # The backbone is tested in every installed runtime; refused by all of them, it is not kept either.
    assert verdicts[backbone.name]["written"] is False and not backbone.exists()
    assert set(verdicts[backbone.name]["runtimes"]) == {"onnxruntime", "openvino"} & set(runtimes.installed_runtimes())


def test_auto_without_bf16_or_amx_picks_what_it_measured(model, tmp_path, monkeypatch):
    out, _ = model
    for f in out.parent.glob("model.*"):
        if f.suffix != ".json" or f.name == "model.json":
            shutil.copy(f, tmp_path / f.name)
    copy = tmp_path / "model.onnx"
    monkeypatch.setattr(runtimes, "openvino_capabilities", lambda device="CPU": ["FP32", "INT8"])
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: {"avx2", "fma"})
    record = selection.select(copy, threads=1, bench_images=16, passes=1)
    assert not any(r["precision"] == "bf16" for r in record["candidates"].values())
    assert record["machine"]["matrix"]["amx"] is False and record["machine"]["matrix"]["avx512_bf16"] is False
    accepted = {k: r for k, r in record["candidates"].items() if r.get("accepted")}
    best = max(accepted, key=lambda k: accepted[k]["images_per_second"])
    assert record["chosen"]["key"] == best
    # The record round-trips through the cache file.
    selection.remember(copy, record)
    assert selection.recorded(copy, 1, "cpu") == json.loads(json.dumps(record))


def test_an_int8_backbone_is_a_candidate_without_a_whole_graph_int8_file(model, tmp_path):
    from defectscope.onnx_export.backbone_int8 import quantize_backbone
    from defectscope.runtime import staged

    out, _ = model
    for f in out.parent.glob("model.*"):
        if ".int8." not in f.name:
            shutil.copy(f, tmp_path / f.name)
    copy = tmp_path / "model.onnx"
    card = runtimes.read_card(copy)
    keys = lambda: {(r["runtime"], r["precision"], r["layout"]) for r in selection.candidate_rows(copy, "cpu", card)}  # noqa: E731
    assert not any(p == "int8" for _, p, _ in keys())
    x = (selection.load_reference(copy)["images"][:8, None] / 255).astype(np.float32)
    quantize_backbone(staged.backbone_path(copy), staged.backbone_path(copy, "int8"), x, [0])
    assert not runtimes.variant_path(copy, "int8").exists()
    int8 = {(r, lay) for r, p, lay in keys() if p == "int8"}
    assert ("onnxruntime", "staged") in int8 and all(lay == "staged" for _, lay in int8)
    if "INT8" in runtimes.openvino_capabilities("CPU"):
        assert ("openvino", "staged") in int8
