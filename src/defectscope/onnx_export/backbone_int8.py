"""The int8 backbone stage (``<stem>.backbone.int8.onnx``): NNCF post-training quantization where NNCF is
installed, ONNX Runtime's static QDQ otherwise.

Why NNCF: on the demo's model (frozen EfficientNet-Lite0, 4 views, RBF head) ONNX Runtime's static QDQ file
lost 10+ accuracy points on every setting tried (``bench/int8.py``), while NNCF's (per-channel weights,
bias correction) runs 3.6-4.2x ONNX Runtime fp32 in OpenVINO on a CPU with VNNI. Its remaining loss is
concentrated in one layer: measured one convolution at a time on the run's val split, keeping the first
depthwise convolution (the stem's 3x3, 32 channels, at full resolution) in float removed a fifth of the
probability error, more than any other layer, for about a seventh of the speed (4.2x -> 3.6x;
``bench/results/int8_sensitivity.json``).
So that one stays float; the head and the Drift score stay float as for every int8 file.

Calibrated on every test-time view of the calibration images: the stage sees the views as its batch.
Whether the file may run the line is not decided here: export's acceptance test and the runtime choice at
the line judge it per runtime on the check set.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.onnx_export.quantize import _name_nodes_and_find_head, quantize_model

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def first_depthwise(model: Any) -> str | None:
    """Name of the first depthwise convolution (a Conv whose ``group`` equals its input channels > 1) of an
    ONNX model with named nodes, in graph order; None when it has none."""
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "Conv" or group <= 1 or len(node.input) < 2 or node.input[1] not in weights:
            continue
        if numpy_helper.to_array(weights[node.input[1]]).shape[1] == 1:  # one input channel per group
            return node.name
    return None


def _in_every_view(images: np.ndarray, views: list[int]) -> np.ndarray:
    from defectscope.runtime import staged

    return np.ascontiguousarray(np.concatenate([staged.view(images, k) for k in views]), dtype=np.float32)


def _view_batches(images: np.ndarray, views: list[int]) -> list[np.ndarray]:
    x = _in_every_view(images, views)
    return [x[i:i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH)]


def _nncf(src: Path, dst: Path, images: np.ndarray, views: list[int]) -> dict[str, Any]:
    import nncf
    import onnx

    from defectscope.runtime.card import INPUT

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as tmp:
        named = Path(tmp) / "named.onnx"
        kept = _name_nodes_and_find_head(src, named, 0)
        model = onnx.load(str(named))
    depthwise = first_depthwise(model)
    kept += [depthwise] if depthwise else []
    batches = _view_batches(images, views)
    # NNCF prints every ignored node at INFO through its own stdout handler, and rich progress bars on the
    # global console: library code stays quiet (export logs one line of its own).
    from rich import get_console

    nncf_log, console = logging.getLogger("nncf"), get_console()
    level, quiet = nncf_log.level, console.quiet
    nncf_log.setLevel(logging.ERROR)  # and warns that the batches are fewer than the views: all are used
    console.quiet = True
    try:
        quantized = nncf.quantize(model, nncf.Dataset(batches, lambda b: {INPUT: b}),
                                  subset_size=sum(len(b) for b in batches),
                                  ignored_scope=nncf.IgnoredScope(names=kept) if kept else None)
    finally:
        nncf_log.setLevel(level)
        console.quiet = quiet
    onnx.save(quantized, str(dst))
    return {"mode": "static", "engine": f"nncf {nncf.__version__}", "weights": "int8 per channel",
            "activations": "int8 (min-max calibrated, fast bias correction)",
            "calibration_images": int(len(images)), "calibration_views": int(sum(len(b) for b in batches)),
            "kept_in_float": len(kept), "first_depthwise_in_float": depthwise}


def quantize_backbone(src: str | Path, dst: str | Path, images: np.ndarray, views: list[int]) -> dict[str, Any]:
    """Write the int8 backbone stage of ``src`` to ``dst``, calibrated on ``images`` (float32 (N, 1, H, W)
    in [0, 1]) seen in each of ``views``; returns its settings for the export report."""
    src, dst = Path(src), Path(dst)
    if nncf_available():
        try:
            return _nncf(src, dst, images, views)
        except Exception as exc:  # noqa: BLE001 - NNCF refuses some graphs; ONNX Runtime's QDQ still works
            log.warning("NNCF could not quantize %s (%s: %s); using ONNX Runtime's static quantization",
                        src.name, type(exc).__name__, exc)
    report = quantize_model(src, dst, "static", _in_every_view(images, views))
    report["engine"] = "onnxruntime"
    return report
