"""The two-stage export: the backbone (one view) and the head (features -> outputs) as two ONNX files.

``model.onnx`` runs the whole model in one graph, its test-time views included. Beside it the exporter writes

* ``<stem>.backbone.onnx``: ``image`` float32 (N, 1, H, W) in [0, 1] -> ``pooled`` (N, F), the backbone's
  pooled features of ONE view (normalisation inside). The runtime makes the views itself (quarter turns and
  flips of the input, :func:`defectscope.runtime.staged.view`), sends all of them as one batch and averages;
  this stage may run in bf16 or int8 (``<stem>.backbone.int8.onnx``, calibrated on training images in every view).
* ``<stem>.head.onnx``: ``pooled`` (N, F), averaged over the views -> ``logits``, ``probabilities``,
  ``features``, ``drift_score``: the feature transform, the classifier head and the Drift score, always run in
  fp32 (an RBF head's ``|f|^2 - 2 f.l + |l|^2`` does not survive bf16 rounding).

So the precision that is cheap to lower (the convolutions) is lowered and what the policy's thresholds are
computed from is not. Only models whose Drift score reads pooled features and that take no metadata inputs
are staged (:func:`unstageable` says why not); the pair is checked against ``model.onnx`` before it is kept.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defectscope.decision.drift.member import POOLED
from defectscope.onnx_export.drift_heads import FusedDriftHead, GraphHead, drift_output
from defectscope.runtime import card as md
from defectscope.runtime import staged

PARITY_TOL = 1e-4  # max abs difference of probabilities, two stages (fp32) vs model.onnx


class BackboneStage(nn.Module):
    """Image in [0, 1] -> the backbone's pooled features of that one view."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.backbone((image - self.model.mean) / self.model.std)


class HeadStage(nn.Module):
    """Pooled features averaged over the views -> logits, probabilities, features, drift_score."""

    def __init__(self, model: nn.Module, drift: GraphHead | None):
        super().__init__()
        self.model, self.drift = model, drift

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.post(pooled)
        logits = self.model.logits_from_features(features)
        drift = (drift_output(self.drift, features, logits, None, None) if self.drift is not None
                 else torch.zeros_like(logits[:, 0]))
        return logits, torch.softmax(logits, dim=1), features, drift


def unstageable(model: nn.Module, drift: GraphHead | None, stages: Any) -> str | None:
    """Why this model cannot run as backbone + head, or None when it can."""
    if getattr(model, "metadata_dim", 0):
        return "the model takes metadata inputs"
    if stages:
        return "its Drift score reads the backbone's intermediate maps"
    if not hasattr(model, "backbone") or not hasattr(model, "post"):
        return "not a single Classifier (an ensemble)"
    members = drift.members if isinstance(drift, FusedDriftHead) else ([drift] if drift is not None else [])
    if any(getattr(m, "reads", None) != POOLED for m in members):
        return "its Drift score reads the image itself"
    return None


def export_stages(model: nn.Module, drift: GraphHead | None, out: Path, tmp: Path, opset: int,
                  x_check: np.ndarray, views: list[int]) -> tuple[Path, Path, dict[str, Any]]:
    """Write the two stage graphs into ``tmp`` and check them (fp32, ONNX Runtime, views made in numpy)
    against ``out``'s full graph on ``x_check``; returns (backbone, head, report)."""
    import onnx

    from defectscope.runtime import engines

    size = int(x_check.shape[-1])
    backbone, head = tmp / "backbone.onnx", tmp / "head.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(BackboneStage(model).eval(), (torch.rand(2, 1, size, size),), str(backbone),
                          input_names=[md.INPUT], output_names=[staged.POOLED], opset_version=opset,
                          dynamic_axes={md.INPUT: {0: "batch"}, staged.POOLED: {0: "batch"}}, dynamo=False)
        dim = int(model.num_features)
        torch.onnx.export(HeadStage(model, drift).eval(), (torch.rand(2, dim),), str(head),
                          input_names=[staged.POOLED], output_names=list(md.OUTPUTS), opset_version=opset,
                          dynamic_axes={n: {0: "batch"} for n in (staged.POOLED, *md.OUTPUTS)}, dynamo=False)
    for path in (backbone, head):
        onnx.checker.check_model(str(path), full_check=True)
    full = engines.ort_session(out)
    pair = staged.StagedEngine(staged.OrtStage(backbone), staged.OrtStage(head), views)
    diffs, drift_diffs = [], []
    for i in range(0, len(x_check), 32):
        x = x_check[i:i + 32]
        p_full, d_full = full.run([md.OUTPUTS[1], md.OUTPUTS[3]], {md.INPUT: x})
        p, _, d = pair.run(x)
        diffs.append(float(np.abs(p - p_full).max()))
        scale = float(np.abs(d_full).max()) or 1.0
        drift_diffs.append(float(np.abs(d - d_full).max()) / scale)
    report = {"views": list(views), "images": int(len(x_check)),
              "max_abs_diff_probabilities": max(diffs, default=0.0),
              "max_rel_diff_drift_score": max(drift_diffs, default=0.0), "tolerance": PARITY_TOL}
    report["ok"] = report["max_abs_diff_probabilities"] <= PARITY_TOL and report["max_rel_diff_drift_score"] <= 1e-3
    return backbone, head, report


def write_stages(model: nn.Module, heads: nn.Module, out: Path, tmp: Path, opset: int, x_check: np.ndarray,
                 calibration: np.ndarray | None, write: Any) -> dict[str, Any]:
    """Export, check and write the stage files beside ``out`` (``write(src, dst)`` adds the card); the int8
    backbone (calibrated on every view of ``calibration``, see :mod:`~defectscope.onnx_export.backbone_int8`)
    too when given. Stale stage files are removed first."""
    from defectscope.onnx_export.backbone_int8 import quantize_backbone

    for path in staged.stage_files(out):
        path.unlink(missing_ok=True)
    why = unstageable(model, getattr(heads, "drift", None), getattr(heads, "stages", None))
    if why is not None:
        return {"written": False, "reason": why}
    backbone, head, report = export_stages(model, heads.drift, out, tmp, opset, x_check, list(model.views))
    if not report["ok"]:
        return {"written": False, "reason": "the two stages do not match model.onnx", "parity": report}
    write(backbone, staged.backbone_path(out))
    write(head, staged.head_path(out))
    result: dict[str, Any] = {"written": True, "parity": report, "files": [staged.backbone_path(out).name,
                                                                           staged.head_path(out).name]}
    if calibration is not None:
        q = tmp / "backbone.int8.onnx"
        result["int8"] = quantize_backbone(backbone, q, calibration, list(model.views))
        write(q, staged.backbone_path(out, "int8"))
        result["files"].append(staged.backbone_path(out, "int8").name)
    return result


def drop_refused_int8(out: Path, threads: int | None = None) -> dict[str, Any]:
    """Test the int8 files beside ``out`` (whole graph in ONNX Runtime, and the int8 backbone on all views in
    every installed runtime: the same QDQ file rounds differently in each) with the runtime's acceptance test
    on the check set, and delete a file no runtime accepts: an export writes no variant it would itself
    refuse. Returns {file name: the test's verdict (per runtime for the backbone)}."""
    from defectscope.runtime import choice, engines

    ref = choice.load_reference(out)
    card = engines.read_card(out)
    verdicts: dict[str, Any] = {}
    if ref is None:
        return verdicts
    whole = engines.variant_path(out, "int8")
    if whole.is_file():
        verdicts[whole.name] = _int8_verdict(out, {"runtime": "onnxruntime", "precision": "int8"}, ref, card, threads)
        if not verdicts[whole.name]["accepted"]:
            whole.unlink()
            verdicts[whole.name]["written"] = False
    backbone = staged.backbone_path(out, "int8")
    if backbone.is_file():
        views = len(card.spec.get("views") or [0])
        per_runtime = {runtime: _int8_verdict(out, {"runtime": runtime, "precision": "int8", "layout": "staged",
                                                    "views": views}, ref, card, threads)
                       for runtime in ("onnxruntime", "openvino") if runtime in engines.installed_runtimes()}
        accepted = [r for r, v in per_runtime.items() if v["accepted"]]
        verdicts[backbone.name] = {"accepted": bool(accepted), "accepted_in": accepted, "runtimes": per_runtime}
        if not accepted:
            backbone.unlink()
            verdicts[backbone.name]["written"] = False
    return verdicts


def _int8_verdict(out: Path, row: dict[str, Any], ref: dict[str, np.ndarray], card: Any,
                  threads: int | None) -> dict[str, Any]:
    from defectscope.runtime import acceptance, choice

    engine = choice.engine_for(out, row, threads=threads or 1)
    probs, drift = choice._outputs(engine, ref["images"])
    _, drift_on_drift = choice._outputs(engine, ref["drift_images"])
    del engine
    test = acceptance.check(probs, drift, drift_on_drift, ref, card.policy, card.classes)
    return {"accepted": test["accepted"], "refused": test.get("refused"), "accuracy": test.get("accuracy"),
            "accuracy_fp32": test.get("accuracy_fp32"), "automation": test.get("automation"),
            "automation_fp32": test.get("automation_fp32")}
