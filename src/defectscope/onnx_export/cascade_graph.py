"""Export a calibrated two-stage cascade (``defectscope cascade``) for deployment, in either of two forms:

``form="graph"``: ONE ONNX file with the predictor's usual contract (``image`` -> logits, probabilities,
features, drift_score). Where the screen passes an image, the outputs are the screen-passed values of
:mod:`defectscope.runtime.cascade_runner` (one-hot good class: the classifier's policy decides it good);
elsewhere they are the classifier's. An ONNX graph runs every node for every image, so this form costs the
screen PLUS the classifier: simple to deploy, no compute saved.

``form="files"``: a folder with ``screen.onnx`` (``image`` -> ``p_good``), ``classifier.onnx`` (an ordinary
export carrying the cascade's classifier policy) and the manifest ``cascade.json``. ``Predictor("DIR/cascade.json")``
runs the classifier only on the images the screen did not pass: this is where the cascade saves compute.

Both take the classifier's input size; the screen resizes inside (``defectscope.models.screen``). Every
export is checked against the torch composition on the classifier run's test images before it is written.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defectscope.decision.cascade import load_cascade_policy
from defectscope.models.screen import ScreenScore
from defectscope.onnx_export.exporter import (
    PARITY_TOL,
    ExportError,
    ExportHeads,
    _images,
    _write_onnx_with_metadata,
    build_metadata,
    export_heads,
)
from defectscope.rundir import Run
from defectscope.runtime import card as md
from defectscope.runtime import engines
from defectscope.runtime.cascade_runner import (
    DRIFT_FLOOR,
    MANIFEST_KIND,
    MANIFEST_VERSION,
    PASSED_LOGIT,
    SCREEN_OUTPUT,
    CascadeRunner,
    float32_ceil,
)

log = logging.getLogger(__name__)

FORMS = ("graph", "files")
PARITY_IMAGES = 64
MANIFEST = "cascade.json"
GRAPH = "cascade_graph.onnx"  # the one-graph form's name when both forms go to one folder


class CascadeHeads(nn.Module):
    """Screen then classifier in one graph, outputs as the predictor expects (see the module docstring)."""

    def __init__(self, screen: ScreenScore, classifier: ExportHeads, threshold: float, good_index: int,
                 n_classes: int):
        super().__init__()
        self.screen = screen
        self.classifier = classifier
        self.register_buffer("threshold", torch.tensor(float32_ceil(threshold), dtype=torch.float32))
        passed_logits = torch.full((n_classes,), PASSED_LOGIT)
        passed_logits[good_index] = 0.0
        self.register_buffer("passed_logits", passed_logits)
        self.register_buffer("passed_probs", torch.nn.functional.one_hot(torch.tensor(good_index), n_classes).float())
        self.register_buffer("drift_floor", torch.tensor(DRIFT_FLOOR, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        passed = self.screen(image) >= self.threshold
        logits, probs, features, drift = self.classifier(image)
        p = passed[:, None]
        return (torch.where(p, self.passed_logits[None], logits), torch.where(p, self.passed_probs[None], probs),
                torch.where(p, torch.zeros_like(features), features), torch.where(passed, self.drift_floor, drift))


class ScreenGraph(nn.Module):
    def __init__(self, screen: ScreenScore):
        super().__init__()
        self.screen = screen

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.screen(image)


def _stages(cp: dict[str, Any]) -> tuple[Run, Run, ScreenScore, nn.Module]:
    screen_run, clf_run = Run(cp["screen"]["run"]), Run(cp["classifier"]["run"])
    screen = ScreenScore(screen_run.model(), screen_run.image_size,
                         screen_run.classes.index(cp["screen"]["good_class"])).eval()
    heads = export_heads(clf_run.model(), clf_run, cp["classifier"]["policy"])
    return screen_run, clf_run, screen, heads


def _onnx_export(module: nn.Module, path: Path, size: int, outputs: list[str], opset: int) -> None:
    import onnx

    dummy = torch.rand(2, 1, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (dummy,), str(path), input_names=[md.INPUT], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in (md.INPUT, *outputs)}, opset_version=opset,
                          dynamo=False)
    onnx.checker.check_model(str(path), full_check=True)


def _metadata(clf_run: Run, cp: dict[str, Any], form: str, stage: str | None = None) -> dict[str, Any]:
    meta = build_metadata(clf_run, clf_run.spec, None)
    meta[md.KEY_POLICY] = cp["classifier"]["policy"]
    meta[md.KEY_SPEC]["cascade"] = {
        "form": form, "stage": stage, "screen": cp["screen"], "good_class": cp["good_class"],
        "guarantee": {k: cp["guarantee"].get(k) for k in ("method", "max_escape", "confidence", "escape_ucb",
                                                          "screen_pass_rate", "bound")},
    }
    meta[md.KEY_PROVENANCE]["cascade_created"] = cp.get("created")
    return meta


def export_cascade(
    cascade_policy: str | Path | dict[str, Any],
    out: str | Path,
    *,
    form: str = "graph",
    opset: int = 17,
) -> dict[str, Any]:
    """Export the cascade of a cascade policy JSON (from :func:`defectscope.decision.cascade.cascade`).

    ``form="graph"``: ``out`` is the .onnx file (plus its .json sidecar). ``form="files"``: ``out`` is a folder
    receiving screen.onnx, classifier.onnx and cascade.json (give ``out/cascade.json`` to the predictor).
    Returns the check report; raises :class:`ExportError` (nothing written) when ONNX Runtime disagrees with
    the torch composition.
    """
    if form not in FORMS:
        raise ValueError(f"unknown cascade export form {form!r}; use one of {', '.join(FORMS)}")
    cp = cascade_policy if isinstance(cascade_policy, dict) else load_cascade_policy(cascade_policy)
    _, clf_run, screen, heads = _stages(cp)
    classes, good = clf_run.classes, cp["good_class"]
    t_s = float(cp["screen"]["threshold"])
    composed = CascadeHeads(screen, heads, t_s, classes.index(good), len(classes)).eval()
    x = _test_inputs(clf_run)
    size = clf_run.image_size
    out = Path(out).resolve()
    report: dict[str, Any] = {"form": form, "opset": opset, "screen_threshold": t_s}
    if form == "graph":
        if out.suffix != ".onnx":
            raise ExportError(f"{out}: a one-graph cascade export must end in .onnx")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
            path = Path(tmp) / "cascade.onnx"
            _onnx_export(composed, path, size, list(md.OUTPUTS), opset)
            report["parity"] = _parity(composed, lambda batch: engines.ort_session(path).run(list(md.OUTPUTS),
                                                                                  {md.INPUT: batch}), x)
            metadata = _metadata(clf_run, cp, form)
            _write_onnx_with_metadata(path, out, metadata)
        md.sidecar_path(out).write_text(json.dumps({**metadata, "export_check": report}, indent=2))
        report["model"] = str(out)
    else:
        if out.suffix:
            raise ExportError(f"{out}: a two-file cascade export goes to a folder (no file suffix)")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
            tmp = Path(tmp)
            _onnx_export(ScreenGraph(screen).eval(), tmp / "screen.onnx", size, [SCREEN_OUTPUT], opset)
            _onnx_export(heads, tmp / "classifier.onnx", size, list(md.OUTPUTS), opset)
            screen_meta = _metadata(clf_run, cp, form, stage="screen")
            screen_meta[md.KEY_SPEC]["graph"] = {"input": md.INPUT, "outputs": [SCREEN_OUTPUT]}
            screen_meta[md.KEY_POLICY] = None
            _write_onnx_with_metadata(tmp / "screen.onnx", tmp / "screen.final.onnx", screen_meta)
            _write_onnx_with_metadata(tmp / "classifier.onnx", tmp / "classifier.final.onnx",
                                      _metadata(clf_run, cp, form, stage="classifier"))
            manifest = {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "screen": "screen.onnx",
                        "classifier": "classifier.onnx", "screen_threshold": t_s, "good_class": good,
                        "screen_output": SCREEN_OUTPUT, "guarantee": cp["guarantee"]}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
            (tmp / "screen.final.onnx").replace(tmp / "screen.onnx")
            (tmp / "classifier.final.onnx").replace(tmp / "classifier.onnx")
            runner = CascadeRunner(tmp / MANIFEST, engines.ort_session)
            report["parity"] = _parity(composed, runner.run, x)
            for name in ("screen.onnx", "classifier.onnx", MANIFEST):
                (tmp / name).replace(out / name)  # the manifest last: never one that names missing files
        report["model"] = str(out / MANIFEST)
    p = report["parity"]
    log.info(f"cascade export ({form}) checked on {p['images']} test images: max |dp| = "
             f"{p['max_abs_diff_probabilities']:.2e}, screen passed {p['screen_passed']}; written {report['model']}")
    return report


def _test_inputs(run: Run) -> np.ndarray:
    for split in ("test", "val", "train"):
        x, _ = _images(run, split, PARITY_IMAGES)
        if len(x):
            return x
    raise ExportError(f"{run.path}: no readable images to check the cascade export against")


def _parity(composed: CascadeHeads, run_onnx, x: np.ndarray) -> dict[str, Any]:
    with torch.no_grad():
        t_probs = composed(torch.from_numpy(x))[1].numpy()
        t_passed = (composed.screen(torch.from_numpy(x)) >= composed.threshold).numpy()
    o_probs = np.asarray(run_onnx(x)[1])
    diff = float(np.abs(o_probs - t_probs).max()) if len(x) else 0.0
    mismatches = int((o_probs.argmax(1) != t_probs.argmax(1)).sum())
    if diff > PARITY_TOL or mismatches:
        raise ExportError(f"the exported cascade disagrees with the torch composition: max |dp| = {diff:.3g} "
                          f"(tolerance {PARITY_TOL}), {mismatches} different decisions; nothing written")
    return {"images": len(x), "tolerance": PARITY_TOL, "max_abs_diff_probabilities": diff,
            "argmax_mismatches": mismatches, "screen_passed": int(t_passed.sum())}
