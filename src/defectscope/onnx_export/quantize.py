"""8-bit quantization of an exported fp32 ONNX model with onnxruntime.quantization.

``dynamic``: weights stored as uint8, activations quantized on the fly; no data needed.
``static``: weights and activations int8/uint8 with ranges calibrated on training images (QDQ format).
Everything computed from the pooled ``features`` (the classifier head, the softmax, the Drift score) stays
in float: it costs nothing to keep and the Drift score's distances are sensitive to rounding. The QDQ file
runs in int8 on ONNX Runtime and on OpenVINO alike.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from defectscope.runtime.card import INPUT, OUTPUTS

QUANTIZE_MODES = ("dynamic", "static")

# Only the heavy ops: quantizing Softmax or the pooled features would cost accuracy and save nothing.
_OPS = ["Conv", "Gemm", "MatMul"]


@dataclasses.dataclass(frozen=True)
class StaticSettings:
    """The knobs of static quantization (``bench/int8.py`` measures them; the defaults are what export writes).

    ``reduce_range``: 7-bit weights. ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI (AVX2) multiply
    pairs with VPMADDUBSW, whose 16-bit sums saturate with full-range weights; 7 bits cannot overflow.
    ``float_tail``: the last N convolutions before the pooled features (per view) stay in float: the head
    standardises every pooled feature by its training spread, so an 8-bit feature map with one scale for all
    1280 channels rounds the narrow ones to nothing.
    ``method``: activation range calibration ("minmax", "percentile", "entropy").
    """

    reduce_range: bool = False
    activations: str = "uint8"
    weights: str = "int8"
    method: str = "minmax"
    percentile: float = 99.999
    float_tail: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_STATIC = StaticSettings()
_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}


def quantize_model(src: str | Path, dst: str | Path, mode: str, calibration: np.ndarray | None = None,
                   *, batch_size: int = 16, settings: StaticSettings = DEFAULT_STATIC) -> dict[str, Any]:
    """Write a quantized copy of ``src`` to ``dst`` and return its settings for the export report.

    ``calibration`` (static only) is float32 ``(N, 1, H, W)`` in [0, 1]: the graph's own input.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; valid modes: {', '.join(QUANTIZE_MODES)}")
    # onnxruntime.quantization logs every skipped node at INFO/WARNING through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix=".quantize-", dir=Path(dst).parent) as tmp:
            named = Path(tmp) / "named.onnx"
            excluded = _name_nodes_and_find_head(src, named, settings.float_tail if mode == "static" else 0)
            if mode == "dynamic":
                # uint8 weights: ORT's CPU kernel for dynamically quantized Conv (ConvInteger) is uint8 x uint8
                # only; int8 weights export fine but fail at session creation.
                quantize_dynamic(str(named), str(dst), op_types_to_quantize=_OPS, weight_type=QuantType.QUInt8,
                                 nodes_to_exclude=excluded)
                return {"mode": mode, "weights": "uint8", "activations": "uint8 (dynamic)", "ops": _OPS,
                        "kept_in_float": len(excluded)}
            if calibration is None or len(calibration) == 0:
                raise ValueError("static quantization needs calibration images")
            extra = {"CalibPercentile": settings.percentile} if settings.method == "percentile" else {}
            quantize_static(
                str(named), str(dst), _Calibration(calibration, batch_size), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=_OPS, per_channel=True, reduce_range=settings.reduce_range,
                activation_type=_TYPES[settings.activations], weight_type=_TYPES[settings.weights],
                calibrate_method=_METHODS[settings.method], nodes_to_exclude=excluded, extra_options=extra,
            )
        return {"mode": mode, "weights": f"{settings.weights} per channel" + (" (7-bit)" if settings.reduce_range
                                                                            else ""),
                "activations": f"{settings.activations} ({settings.method} calibrated)", "ops": _OPS,
                "calibration_images": len(calibration), "kept_in_float": len(excluded),
                "settings": settings.as_dict()}
    finally:
        root.setLevel(level)


def _name_nodes_and_find_head(src: str | Path, dst: Path, float_tail: int = 0) -> list[str]:
    """Copy ``src`` to ``dst`` with every node named (the quantizer excludes nodes by name) and return the
    names of the nodes computed from the ``features`` output (the head and the Drift score) and of the last
    ``float_tail`` convolutions before it on every path (see :class:`StaticSettings`)."""
    import onnx

    model = onnx.load(str(src))
    nodes = model.graph.node
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    tensors, excluded = {OUTPUTS[2]}, []
    for node in nodes:  # ONNX graphs are topologically sorted: one pass finds every descendant
        if tensors.intersection(node.input):
            excluded.append(node.name)
            tensors.update(node.output)
    # A patch Drift score reads the backbone's intermediate maps, not ``features``: the nodes only the
    # Drift output needs (its Mahalanobis matmuls) stay in float too; the shared backbone is quantized.
    needed_by_features = _ancestors(nodes, OUTPUTS[2])
    excluded += [n.name for n in nodes if n.name in _ancestors(nodes, OUTPUTS[3]) - needed_by_features
                 and n.name not in excluded]
    excluded += [n for n in _conv_tail(nodes, _feature_output(nodes), float_tail) if n not in excluded]
    onnx.save(model, str(dst))
    return excluded


def _feature_output(nodes) -> str:
    """``features`` in a whole graph; the backbone stage's only output (``pooled``) otherwise."""
    produced = {o for n in nodes for o in n.output}
    if OUTPUTS[2] in produced:
        return OUTPUTS[2]
    consumed = {i for n in nodes for i in n.input}
    return next((o for n in reversed(list(nodes)) for o in n.output if o not in consumed), OUTPUTS[2])


def _conv_tail(nodes, output: str, depth: int) -> list[str]:
    """Names of the Conv nodes ``output`` depends on with fewer than ``depth`` Convs between them and it."""
    if depth <= 0:
        return []
    after: dict[str, int] = {output: 0}  # tensor -> fewest Convs between it and ``output``
    names = []
    for node in reversed(list(nodes)):
        below = [after[o] for o in node.output if o in after]
        if not below:
            continue
        here = min(below)
        if node.op_type == "Conv":
            if here < depth:
                names.append(node.name)
            here += 1
        for i in node.input:
            after[i] = min(after.get(i, here), here)
    return names


def _ancestors(nodes, output: str) -> set[str]:
    """Names of the nodes ``output`` is computed from (one reverse pass over the sorted graph)."""
    wanted, names = {output}, set()
    for node in reversed(list(nodes)):
        if wanted.intersection(node.output):
            names.add(node.name)
            wanted.update(node.input)
    return names


class _Calibration(CalibrationDataReader):
    """Feeds the calibration images batch by batch under the graph's input name."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self._batches = iter([{INPUT: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)
