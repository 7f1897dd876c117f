"""``defectscope export``: turn a run into one self-describing ONNX file (plus a JSON sidecar).

The graph takes ``image`` float32 ``(N, 1, H, W)`` in [0, 1] (and, for a model trained with metadata inputs,
``metadata`` float32 ``(N, M)``: the encoded values, see :mod:`defectscope.data.metadata_inputs`) and returns
``logits``, ``probabilities`` (softmax), ``features`` (pooled penultimate features) and ``drift_score`` (the
policy's Drift score: a pooled score, the patch score read from the backbone's intermediate maps in the same
pass, or their standardised max; see :mod:`defectscope.onnx_export.drift_heads`). Normalisation is inside the
graph; everything else a deployment needs (classes, input size, resize mode, policy, provenance) is in the
file's metadata, so :class:`defectscope.runtime.predictor.Predictor` needs nothing but the .onnx file.

Every export is checked before it is written: the ONNX checker, then ONNX Runtime against PyTorch on real
images of the run's test split.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defectscope._version import __version__
from defectscope.decision.drift import DriftError
from defectscope.decision.drift.rule import DriftRule
from defectscope.decision.policy import decide_labels
from defectscope.errors import DefectscopeError
from defectscope.models.cam import CamHead, forward_with_map, supports_cam
from defectscope.onnx_export.drift_heads import GraphHead, drift_output, rule_head
from defectscope.onnx_export.quantize import QUANTIZE_MODES, quantize_model
from defectscope.onnx_export.stages import drop_refused_int8, write_stages
from defectscope.rundir import EVALUATION, METRICS, SPEC, Run
from defectscope.runtime import card as md
from defectscope.runtime import choice, engines
from defectscope.runtime.staged import stage_files

log = logging.getLogger(__name__)

PARITY_IMAGES = 64  # test images compared between torch and ONNX Runtime
PARITY_TOL = 1e-4  # max abs difference of fp32 probabilities
DRIFT_PARITY_TOL = 1e-3  # max abs difference of the Drift score, relative to its largest magnitude
CALIBRATION_IMAGES = 128  # training images for static quantization


class ExportError(DefectscopeError, RuntimeError):
    """The export failed its self-check, or would overwrite a file of the run."""


class ExportHeads(nn.Module):
    """The run's Classifier with the outputs a deployment needs, in one forward pass; with ``heatmap`` a fifth
    output, the decided class's Grad-CAM (:mod:`defectscope.models.cam`)."""

    def __init__(self, model: nn.Module, drift: GraphHead | None = None, heatmap: bool = False):
        super().__init__()
        self.model = model
        self.drift = drift
        self.cam = CamHead(model) if heatmap else None

    def forward(self, image: torch.Tensor, metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.cam is None:
            features = self.model.forward_features(image)
        else:
            pooled, features, final = forward_with_map(self.model, image)
        logits = self.model.logits_from_features(features, metadata)
        drift = (drift_output(self.drift, features, logits, None, image) if self.drift is not None
                 else torch.zeros_like(logits[:, 0]))
        if self.cam is None:
            return logits, torch.softmax(logits, dim=1), features, drift
        return logits, torch.softmax(logits, dim=1), features, drift, self.cam(pooled, features, final, logits)


def drift_head_for(run: Run, policy: dict[str, Any] | None = None) -> tuple[GraphHead | None, tuple[int, ...] | None]:
    """(the Drift head of the policy (default: the run's), the backbone stages it reads or None): the graph head
    of its one member (:func:`~defectscope.onnx_export.drift_heads.graph_head`), or a
    :class:`~defectscope.onnx_export.drift_heads.FusedDriftHead` for a max of standardised scores; (None, None)
    when the policy has no Drift rule. The head's ``score_name`` is the policy's score."""
    policy = run.policy if policy is None else policy
    drift = (policy or {}).get("drift")
    if not drift or policy.get("drift_threshold") is None:
        return None, None
    try:
        rule = DriftRule.from_policy(run, drift)  # the same statistics calibrate and evaluate use
    except DriftError as exc:
        raise ExportError(f"{exc}; calibrate again") from None
    head = rule_head(rule)
    head.score_name = drift["score"]
    return head, rule.stages


def export_heads(model: nn.Module, run: Run, policy: dict[str, Any] | None = None, *, heatmap: bool = False
                 ) -> nn.Module:
    """The graph to export: :class:`ExportHeads`, or MultiLayerExportHeads when the Drift score reads maps.
    ``heatmap``: add the Grad-CAM output where the model supports it (global-average-pooled backbones)."""
    from defectscope.onnx_export.drift_heads import MultiLayerExportHeads

    head, stages = drift_head_for(run, policy)
    if stages:
        return MultiLayerExportHeads(model, head, stages).eval()  # no heatmap beside the patch score's maps
    return ExportHeads(model, head, heatmap=heatmap and supports_cam(model)).eval()


def export(
    run: str | Path | Run,
    out: str | Path,
    *,
    quantize: str | None = None,
    opset: int = 17,
    int8: bool = True,
    select: bool = True,
) -> dict[str, Any]:
    """Export ``run`` to ``out`` (.onnx) and ``out.with_suffix('.json')``; return the check report.

    ``quantize``: ``None`` (fp32), ``'dynamic'`` or ``'static'`` (calibrated on up to 128 training
    images). The fp32 graph must match PyTorch (probabilities within 1e-4, identical argmax on up to 64
    test images) or :class:`ExportError` is raised and nothing is written. A quantized model is compared
    to the fp32 one on the whole test split and the differences are reported, not enforced.

    Beside an fp32 ``out`` it also writes (see :mod:`defectscope.runtime.choice`):
    ``<stem>.check.npz``, the reference set that ``--runtime auto`` checks candidates on; with ``int8``,
    ``<stem>.int8.onnx``, statically quantized on the run's calibration images; with ``select``, the
    measured runtime choice for this machine, in the sidecar under ``runtime_selection``.
    """
    if quantize not in (None, *QUANTIZE_MODES):
        raise ValueError(f"unknown quantize mode {quantize!r}; use None, {', '.join(map(repr, QUANTIZE_MODES))}")
    run = Run(Path(run.path if isinstance(run, Run) else run).resolve())
    out = Path(out).resolve()
    sidecar = md.sidecar_path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"{out}: the exported model's name must end in .onnx (its sidecar is the .json)")
    if sidecar == run.file(SPEC):
        # RUN/model.onnx would put its sidecar over RUN/model.json, the run's own spec.
        raise ExportError(f"{out}: its sidecar {sidecar.name} would overwrite the run's {SPEC}; "
                          "choose another name, e.g. RUN/export/model.onnx")
    model, spec = run.model(), run.spec
    heads = export_heads(model, run, heatmap=True)
    heatmap = getattr(heads, "cam", None) is not None
    x_test, y_test, split, m_test = _split_inputs(run)
    takes_metadata = bool(spec.get("metadata_inputs"))
    if takes_metadata and quantize == "static":
        raise ExportError("static quantization of a model with metadata inputs is not supported (its calibration "
                          "feeds images only); export fp32 or quantize='dynamic'")

    report: dict[str, Any] = {"model": str(out), "sidecar": str(sidecar), "opset": opset,
                              "quantization": None, "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _torch_export(heads, spec, fp32, opset)
        report["parity"] = _check_parity(heads, fp32, x_test[:PARITY_IMAGES], split,
                                         None if m_test is None else m_test[:PARITY_IMAGES])
        log.info(f"fp32 parity on {report['parity']['images']} {split} images: max |dp| = "
            f"{report['parity']['max_abs_diff_probabilities']:.2e}, argmax mismatches = 0")
        final = fp32
        report["size_bytes"] = {"fp32": fp32.stat().st_size}
        if quantize:
            final = Path(tmp) / "quantized.onnx"
            calibration = _calibration_inputs(run) if quantize == "static" else None
            report["quantization"] = quantize_model(fp32, final, quantize, calibration)
            report["quantized_vs_fp32"] = _compare(fp32, final, x_test, y_test, split, m_test)
            report["size_bytes"]["quantized"] = final.stat().st_size
            q = report["quantized_vs_fp32"]
            log.info(f"{quantize} quantization: size {report['size_bytes']['fp32']} -> {final.stat().st_size} bytes, "
                f"{split} accuracy {q['accuracy_fp32']:.4f} -> {q['accuracy_quantized']:.4f}, "
                f"max |dp| = {q['max_abs_diff_probabilities']:.3f}, decisions changed = {q['argmax_mismatches']}")
        metadata = build_metadata(run, spec, quantize, heatmap=heatmap)
        _write_onnx_with_metadata(final, out, metadata)
        _write_int8_variant(run, spec, fp32, out, Path(tmp), report, wanted=quantize is None and int8,
                            takes_metadata=takes_metadata, heatmap=heatmap)
        if quantize is None:  # backbone + head files: reduced precision where it is safe, views chosen at the line
            report["stages"] = write_stages(model, heads, out, Path(tmp), opset, x_test[:PARITY_IMAGES],
                                            _calibration_inputs(run) if int8 and not takes_metadata else None,
                                            lambda src, dst: shutil.copyfile(src, dst))
        else:
            report["stages"] = {"written": False, "reason": "a quantized export"}
            for stale in stage_files(out):
                stale.unlink(missing_ok=True)
    selection_record = None
    choice.cache_path(out).unlink(missing_ok=True)  # choices measured for an earlier model
    choice.reference_path(out).unlink(missing_ok=True)
    if quantize is None and takes_metadata:
        # The reference set and the runtime candidates feed images only; the predictor runs such a model
        # with ONNX Runtime fp32 (runtime/precision auto resolve to that).
        report["reference_set"] = None
    elif quantize is None:  # a quantized main model has no fp32 to check candidates against
        drift_x = _drift_images(x_test, spec)
        to_u8 = lambda a: np.rint(a[:, 0] * 255).astype(np.uint8)  # noqa: E731 - exact: inputs are u8 / 255
        choice.write_reference(out, to_u8(x_test), y_test, drift_x)
        report["reference_set"] = {"file": str(choice.reference_path(out)), "split": split,
                                   "images": len(x_test), "drift_images": len(drift_x)}
        _drop_refused_int8(out, report)
        if select:
            policy, classes = metadata[md.KEY_POLICY], list(spec["classes"])
            selection_record = choice.select(out, decide=lambda p, d: decide_labels(p, policy, classes, d),
                                              choice_seconds=None)  # export: the whole choice, no budget
            # choice.select logs its one summary line itself
    sidecar.write_text(json.dumps({**metadata, "export_check": report,
                                   **({choice.SELECTION_KEY: selection_record} if selection_record else {})},
                                  indent=2))
    log.info(f"exported {out} and {sidecar.name}")
    return report


def _drop_refused_int8(out: Path, report: dict[str, Any]) -> None:
    """An int8 file the runtime's own acceptance test refuses is not left beside the model; the report says so."""
    report["int8_checks"] = drop_refused_int8(out, os.cpu_count())
    if "int8" in report and not engines.variant_path(out, "int8").is_file():
        report["int8"]["written"] = False
        report["size_bytes"].pop("int8", None)


def _write_int8_variant(run, spec: dict, fp32: Path, out: Path, tmp: Path, report: dict[str, Any], *, wanted: bool,
                        takes_metadata: bool, heatmap) -> None:
    """``<stem>.int8.onnx`` beside ``out`` (static quantization on the run's calibration images), or no such
    file: an int8 file of an earlier export would not match this model."""
    int8_path = engines.variant_path(out, "int8")
    if wanted and takes_metadata:
        log.info("no int8 variant: static quantization feeds images only, and this model takes metadata too")
        int8_path.unlink(missing_ok=True)
    elif wanted:
        q = tmp / "int8.onnx"
        report["int8"] = {"model": str(int8_path),
                          "quantization": quantize_model(fp32, q, "static", _calibration_inputs(run))}
        _write_onnx_with_metadata(q, int8_path, build_metadata(run, spec, "static", heatmap=heatmap))
        report["size_bytes"]["int8"] = int8_path.stat().st_size
    else:
        int8_path.unlink(missing_ok=True)


DRIFT_CORRUPTED = 128  # corrupted test images in the reference set's Drift images
DRIFT_FAR = 32  # far-off images (wafer maps, digits)


def _drift_images(x_test: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Drift images for the reference set: test images under each line corruption, plus far-off images."""
    from defectscope.data import corruptions

    size = int(spec["image_size"])
    base = np.rint(x_test[:, 0] * 255).astype(np.uint8)
    parts = []
    if len(base):
        rows = np.random.default_rng(0).choice(len(base), min(DRIFT_CORRUPTED, len(base)), replace=False)
        names = list(corruptions.CORRUPTIONS)
        for i, name in enumerate(names):
            chosen = base[rows[i::len(names)]]
            if len(chosen):
                parts.append(corruptions.corrupt(chosen, name, seed=i))
    parts.append(corruptions.wafer_maps(DRIFT_FAR // 2, size, seed=1))
    parts.append(corruptions.digit_glyphs(DRIFT_FAR - DRIFT_FAR // 2, size, seed=2))
    return np.concatenate(parts).astype(np.uint8)


def build_metadata(run: Run, spec: dict[str, Any], quantize: str | None, *, heatmap: bool = False) -> dict[str, Any]:
    """The decoded metadata dictionary (keys in :mod:`defectscope.runtime.card`)."""
    resize = spec.get("resize", "squash")
    metrics_file = run.file(EVALUATION) / METRICS
    provenance = {
        "dataset_sha256": spec.get("dataset_sha256"),
        "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
        "trained_with": spec.get("defectscope_version"),
        "defectscope_version": __version__,
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run.path),
        "quantization": quantize,
    }
    full_spec = {
        **spec,
        # Added keys (not in model.json): how a deployment must feed the graph and what it returns.
        "preprocessing": (
            "wafer map: die states 0/1/2 rendered as 0/128/255, resized with PIL nearest-neighbour, "
            if spec.get("input_kind") == "wafer_map" else
            f"grayscale: decode to 1 channel, resize ({resize}) with PIL bilinear, ")
        + "scale to [0,1]; normalisation inside the graph",
        "graph": {"input": md.INPUT, "outputs": [*md.OUTPUTS, *([md.HEATMAP_OUTPUT] if heatmap else [])],
                  **({"inputs": [md.INPUT, md.METADATA_INPUT]} if spec.get("metadata_inputs") else {})},
    }
    return {
        md.KEY_SPEC: full_spec,
        # Parsed then re-encoded compactly; the policy module owns its content, we only carry it.
        md.KEY_POLICY: run.policy,
        md.KEY_PROVENANCE: provenance,
        md.KEY_FORMAT: md.FORMAT_VERSION,
    }


def _torch_export(heads: nn.Module, spec: dict[str, Any], path: Path, opset: int) -> None:
    import onnx

    size = spec["image_size"]
    dummy = torch.rand(2, spec.get("in_chans", 1), size, size)
    batch = {0: "batch"}
    args: tuple[torch.Tensor, ...] = (dummy,)
    inputs = [md.INPUT]
    if heads.model.metadata_dim:
        args, inputs = (dummy, torch.zeros(2, heads.model.metadata_dim)), [md.INPUT, md.METADATA_INPUT]
    outputs = [*md.OUTPUTS, *([md.HEATMAP_OUTPUT] if getattr(heads, "cam", None) is not None else [])]
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo=True, which needs onnxscript; it still
        # handles every Classifier we build and keeps the export dependency-free.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            heads, args, str(path), input_names=inputs, output_names=outputs,
            dynamic_axes={name: batch for name in (*inputs, *outputs)}, opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def _write_onnx_with_metadata(src: Path, dst: Path, metadata: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(src))
    keep = [p for p in proto.metadata_props if p.key not in md.KEYS]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in md.encode(metadata).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "defectscope"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(dst)  # never a half-written model under the final name


def _feeds(x: np.ndarray, metadata: np.ndarray | None) -> dict[str, np.ndarray]:
    """The graph inputs: the images, and the encoded metadata of a model that takes them."""
    if metadata is None:
        return {md.INPUT: x}
    return {md.INPUT: x, md.METADATA_INPUT: np.ascontiguousarray(metadata, dtype=np.float32)}


def _run(session, x: np.ndarray, batch_size: int = 64, with_drift: bool = False, metadata: np.ndarray | None = None,
         with_heatmap: bool = False):
    """(logits, probabilities[, drift_score][, heatmap]) of ONNX Runtime over x (and its metadata) in batches."""
    names = [md.OUTPUTS[0], md.OUTPUTS[1], *([md.OUTPUTS[3]] if with_drift else []),
             *([md.HEATMAP_OUTPUT] if with_heatmap else [])]
    outs = [session.run(names, _feeds(x[i:i + batch_size], None if metadata is None else metadata[i:i + batch_size]))
            for i in range(0, len(x), batch_size)]
    return tuple(np.concatenate([o[j] for o in outs]) for j in range(len(names)))


def _check_parity(heads: nn.Module, path: Path, x: np.ndarray, split: str,
                  metadata: np.ndarray | None = None) -> dict[str, Any]:
    with torch.no_grad():
        extra = () if metadata is None else (torch.from_numpy(np.asarray(metadata, dtype=np.float32)),)
        t_out = heads(torch.from_numpy(x), *extra)
        t_logits, t_probs, t_drift = t_out[0], t_out[1], t_out[3]
    heatmap = len(t_out) > 4
    o_logits, o_probs, o_drift, *o_heat = _run(engines.ort_session(path), x, with_drift=True, metadata=metadata,
                                               with_heatmap=heatmap)
    t_probs, t_logits = t_probs.numpy(), t_logits.numpy()
    diff = float(np.abs(o_probs - t_probs).max()) if len(x) else 0.0
    mismatches = int((o_probs.argmax(1) != t_probs.argmax(1)).sum())
    result = {
        "images": len(x), "split": split, "tolerance": PARITY_TOL,
        "max_abs_diff_probabilities": diff,
        "max_abs_diff_logits": float(np.abs(o_logits - t_logits).max()) if len(x) else 0.0,
        "argmax_mismatches": mismatches,
    }
    if heads.drift is not None and len(x):
        scale = float(np.abs(t_drift.numpy()).max()) or 1.0
        result["drift_score"] = getattr(heads.drift, "score_name", None)
        result["max_rel_diff_drift_score"] = float(np.abs(o_drift - t_drift.numpy()).max()) / scale
        if result["max_rel_diff_drift_score"] > DRIFT_PARITY_TOL:
            raise ExportError(f"ONNX Runtime's Drift score ({result['drift_score']}) differs from PyTorch's by "
                              f"{result['max_rel_diff_drift_score']:.3g} of its scale (tolerance {DRIFT_PARITY_TOL}); "
                              f"nothing written")
    if heatmap and len(x):
        result["max_abs_diff_heatmap"] = float(np.abs(o_heat[0] - t_out[4].numpy()).max())
    if diff > PARITY_TOL or mismatches:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch on {split} images: max |dp| = {diff:.3g} "
                          f"(tolerance {PARITY_TOL}), {mismatches} different decisions; nothing written")
    return result


def _compare(fp32: Path, quantized: Path, x: np.ndarray, y: np.ndarray, split: str,
             metadata: np.ndarray | None = None) -> dict[str, Any]:
    _, p32 = _run(engines.ort_session(fp32), x, metadata=metadata)
    _, pq = _run(engines.ort_session(quantized), x, metadata=metadata)
    if not len(x):
        return {"images": 0, "split": split}
    acc32, accq = float((p32.argmax(1) == y).mean()), float((pq.argmax(1) == y).mean())
    return {
        "images": len(x), "split": split,
        "accuracy_fp32": acc32, "accuracy_quantized": accq, "accuracy_change": accq - acc32,
        "max_abs_diff_probabilities": float(np.abs(pq - p32).max()),
        "mean_abs_diff_probabilities": float(np.abs(pq - p32).mean()),
        "argmax_mismatches": int((pq.argmax(1) != p32.argmax(1)).sum()),
    }


def _images(run: Run, split: str, limit: int | None = None, seed: int = 0, *, with_metadata: bool = False,
            ) -> tuple[np.ndarray, ...]:
    """Graph inputs float32 (N, 1, H, W) and class indices of one split, decoded as training did; with
    ``with_metadata`` also the encoded metadata inputs (N, M) (None for an image-only model)."""
    table = run.table
    table = table[(table["split"] == split) & table["label"].isin(run.classes)].reset_index(drop=True)
    if limit is not None and len(table) > limit:
        # A seeded sample spread over the split, not its first rows (tables are often sorted by class).
        rows = np.sort(np.random.default_rng(seed).choice(len(table), limit, replace=False))
        table = table.iloc[rows].reset_index(drop=True)
    table, images = run.images(table)
    # The same scaling as training's to_input: uint8 / 255 in float32.
    x = (images.astype(np.float32) / np.float32(255))[:, None]
    if with_metadata:
        return x, run.labels(table), run.metadata(table)
    return x, run.labels(table)


def _split_inputs(run: Run) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None]:
    """The test split (images, labels, name, encoded metadata or None), or the first non-empty of val/train."""
    for split in ("test", "val", "train"):
        x, y, m = _images(run, split, with_metadata=True)
        if len(x):
            return x, y, split, m
    raise ExportError(f"{run.path}: no readable images in its dataset table to check the export against")


def _calibration_inputs(run: Run) -> np.ndarray:
    return _images(run, "train", CALIBRATION_IMAGES, seed=run.spec.get("seed") or 0)[0]
