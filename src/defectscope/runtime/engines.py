"""Inference engines for an exported model: ONNX Runtime or OpenVINO, fp32 or reduced precision, CPU or GPU.

Each engine runs the exported graph (input ``image`` float32 (N, 1, H, W) in [0, 1]) and returns the
``probabilities``, ``features`` and ``drift_score`` outputs as float32 numpy arrays, whatever precision it
computes in. Nothing here imports torch; onnxruntime and openvino are imported only when an engine of
theirs is built, so a line PC needs just the one it uses.

Precisions (what each runtime can do, and where):

============  =========================================  ==============================================
precision     onnxruntime                                openvino
============  =========================================  ==============================================
fp32          ``model.onnx``                             ``model.onnx``
int8          ``model.int8.onnx`` (static QDQ, written   the same QDQ file: OpenVINO runs its quantized
              by ``defectscope export``)                 convolutions in int8
bf16          -                                          CPUs with AVX512-BF16 or AMX (OpenVINO reports
                                                         ``BF16`` among the CPU's capabilities)
fp16          -                                          GPUs (OpenVINO reports ``FP16``)
============  =========================================  ==============================================

Devices: ``cpu`` or ``gpu``. ``gpu`` is CUDAExecutionProvider for onnxruntime (onnxruntime-gpu) or the
OpenVINO ``GPU`` device; when it is absent the engine falls back to the CPU and says so in the log and in
:attr:`Engine.device`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from defectscope.errors import DefectscopeError
from defectscope.machine import cpu_flags, cpu_name  # noqa: F401  (part of this module's API: choice, benches)
from defectscope.runtime import card as md

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8", "bf16", "fp16")
DEVICES = ("cpu", "gpu")
RUN_OUTPUTS = md.OUTPUTS[1:]  # probabilities, features, drift_score: what a prediction needs


class RuntimeUnavailable(DefectscopeError, RuntimeError):
    """A runtime, precision or device this machine (or this model's files) cannot provide."""


class NotAnExport(DefectscopeError, ValueError):
    """A model path that is no exported model: a training run, its weights, or another kind of file."""


# What makes a folder a training run (defectscope.rundir's file names: rundir itself needs pandas, which a line
# PC has not got). Not model.json: an export folder has one too, the model card's sidecar.
_RUN_FILES = ("config.yaml", "dataset.csv", "model.safetensors", "checkpoint.pt")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def check_model_path(model_path: str | Path) -> Path:
    """``model_path`` when it can be an exported model: an ``.onnx`` file or a cascade's ``.json`` manifest.

    Raises :class:`NotAnExport` saying what the path is and what to pass instead (a run's export, or the
    command that writes it). A path that does not exist passes: the caller reports it as missing.
    """
    path = Path(model_path)
    if path.is_dir():
        in_run = _is_run(path)
        what = "a training run" if in_run else "a folder"
        exported = sorted(p for p in (path / "export" if in_run else path).glob("*.onnx")
                          if not p.name.endswith((".int8.onnx", ".backbone.onnx", ".head.onnx")))
        if exported:
            raise NotAnExport(f"{path} is {what}, not an exported model; pass the .onnx file, e.g. {exported[0]}")
        if in_run:
            raise NotAnExport(f"{path} is a training run, not an exported model; export it first: `defectscope "
                              f"export {path}` (writes {path / 'export' / 'model.onnx'}), then pass that .onnx file")
        raise NotAnExport(f"{path} is a folder, not an exported model; pass the .onnx file "
                          "`defectscope export RUN` writes (RUN/export/model.onnx)")
    if not path.exists() or path.suffix.lower() in (".onnx", ".json"):
        return path
    kind = "training weights, not" if path.suffix.lower() in _WEIGHT_SUFFIXES else "not"
    run = path.parent if _is_run(path.parent) else None
    export = f"defectscope export {run}" if run else "defectscope export RUN"
    raise NotAnExport(f"{path} is {kind} an exported model (.onnx); run `{export}` and pass the .onnx file")


def _is_run(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _RUN_FILES)


class Engine(Protocol):
    runtime: str
    precision: str
    device: str
    threads: int
    model_file: Path

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities, features, drift_score) for a float32 batch (N, 1, H, W)."""
        ...


def installed_runtimes() -> list[str]:
    """The runtimes importable here, in preference order (found without importing them)."""
    return [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]


def variant_path(model_path: str | Path, precision: str) -> Path:
    """The file a precision runs from: the model itself, or ``<stem>.int8.onnx`` beside it for int8."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.int8.onnx") if precision == "int8" else model_path


def openvino_capabilities(device: str = "CPU") -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of a device (e.g. FP32, INT8, BF16, FP16), [] without it."""
    try:
        core = _ov_core()
        if device not in core.available_devices:
            return []
        return list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except (ImportError, RuntimeError):
        return []


def candidates(model_path: str | Path, device: str = "cpu", int8_file: Path | None = None) -> list[tuple[str, str]]:
    """(runtime, precision) pairs worth measuring for this model on this machine, fp32 first; int8 ones when
    ``int8_file`` exists (default: the whole graph's int8 variant)."""
    out: list[tuple[str, str]] = []
    installed = installed_runtimes()
    has_int8 = (int8_file or variant_path(model_path, "int8")).is_file()
    if "onnxruntime" in installed:
        out.append(("onnxruntime", "fp32"))
        if has_int8 and device == "cpu":
            out.append(("onnxruntime", "int8"))
    if "openvino" in installed:
        caps = openvino_capabilities(_ov_device(device) if device == "gpu" else "CPU")
        out.append(("openvino", "fp32"))
        if "BF16" in caps:
            out.append(("openvino", "bf16"))
        if "FP16" in caps and device == "gpu":
            out.append(("openvino", "fp16"))
        if has_int8 and "INT8" in caps:
            out.append(("openvino", "int8"))
    return out


def create_engine(model_path: str | Path, runtime: str = "onnxruntime", precision: str = "fp32", *,
                  device: str = "cpu", threads: int | None = None, providers: list[str] | None = None) -> Engine:
    """An engine for ``model_path`` (the fp32 .onnx; variants are found beside it).

    Raises :class:`RuntimeUnavailable` naming what is missing (the runtime package, the int8 file, the
    CPU feature) - never silently runs another precision than the one asked for.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)} or auto")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)} or auto")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if importlib.util.find_spec(runtime) is None:
        extra = "pip install onnxruntime" if runtime == "onnxruntime" else "pip install openvino"
        raise RuntimeUnavailable(f"runtime {runtime} is not installed ({extra})")
    check_model_path(model_path)
    path = variant_path(model_path, precision)
    if not path.is_file():
        raise RuntimeUnavailable(f"{path}: no {precision} model beside {Path(model_path).name} "
                                 "(written by `defectscope export` unless --no-int8)")
    threads = threads or os.cpu_count() or 1
    if runtime == "onnxruntime":
        return OrtEngine(path, precision, device=device, threads=threads, providers=providers)
    return OpenVinoEngine(path, precision, device=device, threads=threads)


# ------------------------------------------------------------------------------------------- onnxruntime

def ort_session(path: str | Path, *, threads: int | None = None, providers: list[str] | None = None) -> Any:
    """The one way an ONNX Runtime session is made here (engines, cascades, the model card, export checks):
    ``threads`` intra-op threads (None: ONNX Runtime's default), one inter-op thread, no spinning, quiet."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning ORT workers would steal the cores the decode threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def read_metadata(model_path: str | Path) -> dict[str, Any]:
    """The decoded defectscope metadata of an ONNX file, read with whichever runtime is installed
    (onnxruntime, else OpenVINO; the onnx package is never needed)."""
    check_model_path(model_path)
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"{model_path}: no such model file")
    if importlib.util.find_spec("onnxruntime") is not None:
        return md.decode(ort_session(model_path).get_modelmeta().custom_metadata_map, str(model_path))
    return md.decode(onnx_props_from_openvino(_ov_core().read_model(str(model_path))), str(model_path))


def read_card(model_path: str | Path) -> md.ModelCard:
    """:func:`read_metadata` as a :class:`~defectscope.runtime.card.ModelCard`."""
    return md.ModelCard.from_metadata(read_metadata(model_path))


class OrtEngine:
    """ONNX Runtime. fp32 and int8 (a QDQ graph) on the CPU; fp32 on CUDA when onnxruntime-gpu is installed."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, precision: str, *, device: str = "cpu", threads: int = 1,
                 providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise RuntimeUnavailable(f"onnxruntime runs fp32 and int8 models here, not {precision} "
                                     "(use --runtime openvino for bf16/fp16)")
        self.model_file, self.precision, self.threads = path, precision, threads
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device == "gpu":
                if "CUDAExecutionProvider" in available:
                    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
                else:
                    log.warning("no CUDAExecutionProvider in this onnxruntime (%s): running on the CPU",
                                ", ".join(available))
        self.session = ort_session(path, threads=threads, providers=providers)
        self.device = "gpu" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.props: dict[str, str] = self.session.get_modelmeta().custom_metadata_map
        # Read once: the predictor asks on every batch.
        self.has_heatmap = any(o.name == md.HEATMAP_OUTPUT for o in self.session.get_outputs())

    def run(self, x: np.ndarray, metadata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs, features, drift = self.session.run(list(RUN_OUTPUTS), _feeds(x, metadata))
        return probs, features, drift

    def run_with_heatmap(self, x: np.ndarray, metadata: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """(probabilities, features, drift_score, heatmap) of a graph with the heatmap output."""
        return tuple(self.session.run([*RUN_OUTPUTS, md.HEATMAP_OUTPUT], _feeds(x, metadata)))


# ---------------------------------------------------------------------------------------------- openvino

_CORE: Any = None


def _ov_core() -> Any:
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def _ov_device(device: str) -> str:
    """The OpenVINO device name for ``device``: CPU, or the first GPU when one is present (else CPU)."""
    if device == "cpu":
        return "CPU"
    gpus = [d for d in _ov_core().available_devices if d.startswith("GPU")]
    return gpus[0] if gpus else "CPU"


_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


class OpenVinoEngine:
    """OpenVINO. fp32 everywhere; bf16 on CPUs that have it; fp16 on GPUs; int8 from the QDQ model.

    For int8 the non-quantized layers (the head, the Drift score) run in f32: the inference precision hint
    only concerns layers the QDQ graph left in float.
    """

    runtime = "openvino"

    def __init__(self, path: Path, precision: str, *, device: str = "cpu", threads: int = 1) -> None:
        core = _ov_core()
        ov_device = _ov_device(device)
        if device == "gpu" and ov_device == "CPU":
            log.warning("no OpenVINO GPU device (devices: %s): running on the CPU",
                        ", ".join(core.available_devices))
        caps = list(core.get_property(ov_device, "OPTIMIZATION_CAPABILITIES"))
        needed = {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}.get(precision)
        if needed and needed not in caps:
            raise RuntimeUnavailable(f"OpenVINO {ov_device} ({cpu_name() if ov_device == 'CPU' else ov_device}) "
                                     f"has no {needed} support (capabilities: {', '.join(caps)})")
        self.model_file, self.precision, self.threads = path, precision, threads
        self.device = "cpu" if ov_device == "CPU" else "gpu"
        model = core.read_model(str(path))
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",  # one stream: the predictor sends one batch at a time
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
        }
        if ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
            # Pinned inference threads would keep the decode threads off their cores.
            config["ENABLE_CPU_PINNING"] = False
        self.compiled = core.compile_model(model, ov_device, config)
        self.request = self.compiled.create_infer_request()
        names = [sorted(o.get_names()) for o in self.compiled.outputs]
        self._index = {}
        for name in RUN_OUTPUTS:
            found = [i for i, n in enumerate(names) if name in n]
            if not found:
                raise md.MetadataError(f"{path}: no output {name!r} in the graph (not a defectscope export?)")
            self._index[name] = found[0]
        heat = [i for i, n in enumerate(names) if md.HEATMAP_OUTPUT in n]
        if heat:
            self._index[md.HEATMAP_OUTPUT] = heat[0]
        self.props = onnx_props_from_openvino(model)

    @property
    def has_heatmap(self) -> bool:
        return md.HEATMAP_OUTPUT in self._index

    def run(self, x: np.ndarray, metadata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        result = self.request.infer(_feeds(x, metadata))
        outs = [np.asarray(result[self.compiled.outputs[self._index[n]]], dtype=np.float32) for n in RUN_OUTPUTS]
        return outs[0], outs[1], outs[2]

    def run_with_heatmap(self, x: np.ndarray, metadata: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """(probabilities, features, drift_score, heatmap) of a graph with the heatmap output."""
        result = self.request.infer(_feeds(x, metadata))
        names = (*RUN_OUTPUTS, md.HEATMAP_OUTPUT)
        return tuple(np.asarray(result[self.compiled.outputs[self._index[n]]], dtype=np.float32) for n in names)


def _feeds(x: np.ndarray, metadata: np.ndarray | None) -> dict[str, np.ndarray]:
    """Graph inputs: the images, plus the encoded metadata (N, M) of a model trained with metadata inputs."""
    if metadata is None:
        return {md.INPUT: x}
    return {md.INPUT: x, md.METADATA_INPUT: np.ascontiguousarray(metadata, dtype=np.float32)}


def onnx_props_from_openvino(model: Any) -> dict[str, str]:
    """The ONNX ``metadata_props`` OpenVINO keeps in a read model's rt_info (``framework`` section)."""
    props: dict[str, str] = {}
    for key in md.KEYS:
        for section in (["framework", key], [key]):
            try:
                if model.has_rt_info(section):
                    props[key] = str(model.get_rt_info(section).astype(str))
                    break
            except Exception:  # an rt_info layout this OpenVINO does not have: the sidecar is the fallback
                continue
    return props
