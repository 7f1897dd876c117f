"""A two-stage model on the line: the backbone (bf16, int8 or fp32) on the views of a batch in one call, then
the head in fp32 (see :mod:`defectscope.onnx_export.stages` for the files).

:class:`StagedEngine` is an :class:`~defectscope.runtime.engines.Engine`: ``run(x)`` returns probabilities,
features and the Drift score like the one-graph model. ``views``: the test-time views the line runs (a prefix
subset of the model's, e.g. 1, 2 or 4 of its 4 quarter turns); fewer views is fewer backbone passes, and the
runtime choice measures whether the policy's caps still hold with them. numpy and the runtimes only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defectscope.runtime import card as md

POOLED = "pooled"  # the backbone stage's output and the head stage's input
HEAD_OUTPUTS = (md.OUTPUTS[1], md.OUTPUTS[2], md.OUTPUTS[3])  # probabilities, features, drift_score
MAX_CALL = 32  # images per backbone call (views included)


def backbone_path(model_path: str | Path, precision: str = "fp32") -> Path:
    """``<stem>.backbone.onnx`` (fp32 and bf16 run from it) or ``<stem>.backbone.int8.onnx``."""
    model_path = Path(model_path)
    infix = ".backbone.int8" if precision == "int8" else ".backbone"
    return model_path.with_name(f"{model_path.stem}{infix}.onnx")


def head_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.head.onnx")


def stage_files(model_path: str | Path) -> list[Path]:
    return [backbone_path(model_path), backbone_path(model_path, "int8"), head_path(model_path)]


def view(x: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` (0..7) of images (..., H, W), as :func:`defectscope.models.heads.dihedral`: ``k % 4`` quarter
    turns, then a horizontal flip when ``k >= 4``."""
    turns = k % 4
    if turns == 1:
        x = np.flip(np.swapaxes(x, -2, -1), -2)
    elif turns == 2:
        x = np.flip(np.flip(x, -2), -1)
    elif turns == 3:
        x = np.flip(np.swapaxes(x, -2, -1), -1)
    return np.flip(x, -1) if k >= 4 else x


def line_views(model_views: list[int], n: int) -> list[int]:
    """The first ``n`` of the model's views in an order that keeps a subgroup where it can: 2 of 4 quarter
    turns are the identity and the half turn (0, 2), not two neighbours."""
    order = sorted(model_views, key=lambda k: (k % 2, k))  # 0, 2, (4, 6,) 1, 3, ...
    if n < 1 or n > len(order):
        raise ValueError(f"views must be 1..{len(order)} for this model, got {n}")
    return order[:n]


class OrtStage:
    """One stage graph in ONNX Runtime (fp32 or int8 QDQ)."""

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None):
        from defectscope.runtime.engines import ort_session

        self.session = ort_session(path, threads=threads, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, {self.input: x})


class OvStage:
    """One stage graph in OpenVINO at a precision hint (f32, bf16, f16)."""

    def __init__(self, path: Path, hint: str, threads: int, device: str = "CPU"):
        from defectscope.runtime.engines import _ov_core

        core = _ov_core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if device == "CPU":
            config.update({"INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False})
        self.compiled = core.compile_model(core.read_model(str(path)), device, config)
        self.request = self.compiled.create_infer_request()
        self._index = {name: i for i, o in enumerate(self.compiled.outputs) for name in o.get_names()}

    def run(self, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        result = self.request.infer({0: x})
        return [np.asarray(result[self.compiled.outputs[self._index[n]]], dtype=np.float32) for n in names]


class StagedEngine:
    """Backbone stage on all views of a batch in one call, mean over views, head stage in fp32."""

    layout = "staged"

    def __init__(self, backbone: Any, head: Any, views: list[int], *, runtime: str = "onnxruntime",
                 precision: str = "fp32", device: str = "cpu", threads: int = 1, model_file: Path | None = None):
        self.backbone, self.head, self.views = backbone, head, list(views)
        self.runtime, self.precision, self.device, self.threads = runtime, precision, device, threads
        self.model_file = model_file or Path("staged")
        self.props: dict[str, str] = {}
        self.has_heatmap = False

    def features_of(self, x: np.ndarray) -> np.ndarray:
        """Pooled backbone features (N, F) averaged over the views, the views sent as one batch."""
        n = len(x)
        batch = x if self.views == [0] else np.ascontiguousarray(np.concatenate([view(x, k) for k in self.views]))
        # At most MAX_CALL images per backbone call: a runtime's working memory grows with the largest batch it
        # ever saw (ONNX Runtime's arena kept 1.7 GB after 4 views x 32 images in one call, 0.5 GB at 32), and
        # past a few dozen images a bigger call is no faster.
        pooled = np.concatenate([self.backbone.run(batch[i:i + MAX_CALL], [POOLED])[0]
                                 for i in range(0, len(batch), MAX_CALL)]) if len(batch) else \
            self.backbone.run(batch, [POOLED])[0]
        if len(self.views) == 1:
            return np.asarray(pooled, dtype=np.float32)
        return pooled.reshape(len(self.views), n, -1).mean(0, dtype=np.float32)

    def run(self, x: np.ndarray, metadata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs, features, drift = self.head.run(self.features_of(x), list(HEAD_OUTPUTS))
        return probs, features, drift


_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8: the QDQ file, float elsewhere


def available(model_path: str | Path, precision: str = "fp32") -> bool:
    return backbone_path(model_path, precision).is_file() and head_path(model_path).is_file()


def create(model_path: str | Path, runtime: str, precision: str, views: list[int], *, device: str = "cpu",
           threads: int = 1, stages: dict[tuple[str, ...], Any] | None = None) -> StagedEngine:
    """A :class:`StagedEngine` for ``model_path``'s stage files: the backbone at ``precision`` in ``runtime``,
    the head in fp32 (ONNX Runtime when installed, else OpenVINO). ``stages``: a cache of built stages, so
    candidates that differ only in their views share one compiled backbone."""
    from defectscope.runtime import engines

    stages = {} if stages is None else stages
    path = backbone_path(model_path, precision)
    if not available(model_path, precision):
        raise engines.RuntimeUnavailable(f"{path}: no {precision} backbone stage beside {Path(model_path).name} "
                                         "(written by `defectscope export` for models that can be staged)")
    installed = engines.installed_runtimes()
    if runtime not in installed:
        raise engines.RuntimeUnavailable(f"runtime {runtime} is not installed")
    key = (runtime, precision, device, str(threads))
    if key not in stages:
        if runtime == "onnxruntime":
            if precision not in ("fp32", "int8") or device != "cpu":
                raise engines.RuntimeUnavailable(f"onnxruntime runs the backbone stage in fp32 or int8 on the CPU, "
                                                 f"not {precision} on {device}")
            stages[key] = OrtStage(path, threads)
            actual = "cpu"
        else:
            ov_device = engines._ov_device(device)
            caps = engines.openvino_capabilities(ov_device)
            needed = {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}.get(precision)
            if needed and needed not in caps:
                raise engines.RuntimeUnavailable(f"OpenVINO {ov_device} has no {needed} support "
                                                 f"(capabilities: {', '.join(caps)})")
            stages[key] = OvStage(path, _HINT[precision], threads, ov_device)
            actual = "cpu" if ov_device == "CPU" else "gpu"
        stages[key].device = actual
    head_key = ("head", str(threads))
    if head_key not in stages:
        stages[head_key] = (OrtStage(head_path(model_path), threads) if "onnxruntime" in installed
                            else OvStage(head_path(model_path), "f32", threads))
    backbone = stages[key]
    return StagedEngine(backbone, stages[head_key], views, runtime=runtime, precision=precision,
                        device=backbone.device, threads=threads, model_file=path)
