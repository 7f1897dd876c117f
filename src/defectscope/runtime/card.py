"""The model card an exported ONNX file carries (its defectscope metadata), shared by the exporter and the
predictor.

Every value is a JSON string under one of the keys below, in the ONNX ``metadata_props``; the exporter
writes the same dictionary (decoded) to a sidecar ``<model>.json``. :class:`ModelCard` is the typed view of
it. Only the standard library is used here (reading the card out of a file is
:func:`defectscope.runtime.engines.read_metadata`, which needs a runtime).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectscope.errors import DefectscopeError

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


class MetadataError(DefectscopeError, ValueError):
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


def sidecar_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


@dataclass(frozen=True)
class ModelCard:
    """What an exported model says about itself: the run's spec (classes, input size, preprocessing, graph
    inputs and outputs), the decision policy (None: argmax), provenance, and the card's format version."""

    spec: dict[str, Any]
    policy: dict[str, Any] | None
    provenance: dict[str, Any] | None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ModelCard:
        """From the decoded dictionary (:func:`decode`)."""
        return cls(spec=metadata[KEY_SPEC], policy=metadata.get(KEY_POLICY),
                   provenance=metadata.get(KEY_PROVENANCE), format_version=int(metadata[KEY_FORMAT]))

    @classmethod
    def from_props(cls, props: dict[str, str], origin: str = "model") -> ModelCard:
        """From an ONNX ``metadata_props`` mapping, validated."""
        return cls.from_metadata(decode(props, origin))

    def to_metadata(self) -> dict[str, Any]:
        """The decoded dictionary, keyed as in the ONNX file."""
        return {KEY_SPEC: self.spec, KEY_POLICY: self.policy, KEY_PROVENANCE: self.provenance,
                KEY_FORMAT: self.format_version}

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def resize(self) -> str:
        return self.spec.get("resize", "squash")

    @property
    def input_kind(self) -> str:
        """``image``, or ``wafer_map`` for die grids (rendered and resized nearest, as in training)."""
        return self.spec.get("input_kind", "image")

    @property
    def takes_metadata(self) -> bool:
        return bool(self.spec.get("metadata_inputs"))

    @property
    def has_drift(self) -> bool:
        return bool(self.policy and self.policy.get("drift"))

