"""The metadata an exported ONNX file carries, shared by the exporter and the predictor.

Every value is a JSON string under one of the keys below, in the ONNX ``metadata_props``; the exporter
writes the same dictionary (decoded) to a sidecar ``<model>.json``. Only the standard library and
onnxruntime or OpenVINO are used here, so the torch-free predictor can import this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1

KEY_SPEC = "defectscope.spec"
KEY_POLICY = "defectscope.policy"
KEY_PROVENANCE = "defectscope.provenance"
KEY_FORMAT = "defectscope.format_version"
KEYS = (KEY_SPEC, KEY_POLICY, KEY_PROVENANCE, KEY_FORMAT)

INPUT = "image"
# The second input of a model trained with metadata inputs: float32 (N, M), the encoded values
# (spec "metadata_inputs"; defectscope.data.metadata_inputs encodes them). Absent from image-only models.
METADATA_INPUT = "metadata"
# drift_score is the policy's Drift score computed inside the graph (zeros when the policy has no Drift rule).
OUTPUTS = ("logits", "probabilities", "features", "drift_score")
HEATMAP_OUTPUT = "heatmap"  # optional: (N, h, w) Grad-CAM of the decided class in [0, 1] (models.cam)


class MetadataError(ValueError):
    """An ONNX file without defectscope metadata, or from a newer, incompatible format."""


def encode(metadata: dict[str, Any]) -> dict[str, str]:
    """Key -> JSON text, as stored in the ONNX file (``None`` becomes ``"null"``)."""
    return {key: json.dumps(metadata.get(key)) for key in KEYS}


def decode(props: dict[str, str], origin: str = "model") -> dict[str, Any]:
    """Parse and validate the defectscope keys of an ONNX ``metadata_props`` mapping."""
    missing = [k for k in (KEY_SPEC, KEY_FORMAT) if k not in props]
    if missing:
        raise MetadataError(f"{origin}: not a defectscope export (metadata {', '.join(missing)} missing)")
    try:
        metadata = {key: json.loads(props[key]) if key in props else None for key in KEYS}
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{origin}: corrupt defectscope metadata ({exc})") from exc
    if not isinstance(metadata[KEY_FORMAT], int) or metadata[KEY_FORMAT] > FORMAT_VERSION:
        raise MetadataError(
            f"{origin}: metadata format {metadata[KEY_FORMAT]!r} is newer than this defectscope understands "
            f"({FORMAT_VERSION}); upgrade defectscope"
        )
    return metadata


def read_metadata(model_path: str | Path) -> dict[str, Any]:
    """The decoded defectscope metadata of an ONNX file, read with whichever runtime is installed
    (onnxruntime, else OpenVINO; the onnx package is never needed)."""
    import importlib.util

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"{model_path}: no such model file")
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return decode(session.get_modelmeta().custom_metadata_map, str(model_path))
    from defectscope.deploy.runtimes import _ov_core, onnx_props_from_openvino

    return decode(onnx_props_from_openvino(_ov_core().read_model(str(model_path))), str(model_path))


def sidecar_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")
