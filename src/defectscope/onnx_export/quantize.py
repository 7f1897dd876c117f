"""8-bit quantization of an exported fp32 ONNX model with onnxruntime.quantization.

``dynamic``: weights stored as uint8, activations quantized on the fly; no data needed.
``static``: weights and activations int8/uint8 with ranges calibrated on training images (QDQ format).
Everything computed from the pooled ``features`` (the classifier head, the softmax, the Drift score) stays
in float: it costs nothing to keep and the Drift score's distances are sensitive to rounding. The QDQ file
runs in int8 on ONNX Runtime and on OpenVINO alike.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from defectscope.runtime.card import INPUT, OUTPUTS

QUANTIZE_MODES = ("dynamic", "static")

# Only the heavy ops: quantizing Softmax or the pooled features would cost accuracy and save nothing.
_OPS = ["Conv", "Gemm", "MatMul"]


def quantize_model(src: str | Path, dst: str | Path, mode: str, calibration: np.ndarray | None = None,
                   *, batch_size: int = 16) -> dict[str, Any]:
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
            excluded = _name_nodes_and_find_head(src, named)
            if mode == "dynamic":
                # uint8 weights: ORT's CPU kernel for dynamically quantized Conv (ConvInteger) is uint8 x uint8
                # only; int8 weights export fine but fail at session creation.
                quantize_dynamic(str(named), str(dst), op_types_to_quantize=_OPS, weight_type=QuantType.QUInt8,
                                 nodes_to_exclude=excluded)
                return {"mode": mode, "weights": "uint8", "activations": "uint8 (dynamic)", "ops": _OPS,
                        "kept_in_float": len(excluded)}
            if calibration is None or len(calibration) == 0:
                raise ValueError("static quantization needs calibration images")
            quantize_static(
                str(named), str(dst), _Calibration(calibration, batch_size), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=_OPS, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            )
        return {"mode": mode, "weights": "int8 per channel", "activations": "uint8 (MinMax calibrated)",
                "ops": _OPS, "calibration_images": len(calibration), "kept_in_float": len(excluded)}
    finally:
        root.setLevel(level)


def _name_nodes_and_find_head(src: str | Path, dst: Path) -> list[str]:
    """Copy ``src`` to ``dst`` with every node named (the quantizer excludes nodes by name) and return the
    names of the nodes computed from the ``features`` output: the head and the Drift score."""
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
    onnx.save(model, str(dst))
    return excluded


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
