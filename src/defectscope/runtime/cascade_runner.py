"""Run a two-file cascade export (screen.onnx + classifier.onnx + cascade.json) with ONNX Runtime only.

The classifier runs only on the images the screen did not pass - the compute the cascade saves. Its outputs
follow the one-graph export's contract exactly (``defectscope.onnx_export.cascade_graph``), so the predictor
decides both forms with the same policy code: a screen-passed image gets the one-hot probability of the good
class, logits 0 / ``PASSED_LOGIT``, zero features and the lowest float32 as its drift score (never Drift).
This module must never import torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.runtime import card as md

MANIFEST_KIND = "defectscope.cascade_manifest"
MANIFEST_VERSION = 1
SCREEN_OUTPUT = "p_good"
PASSED_LOGIT = -1.0e4  # exp(-1e4) is 0 in float32 and float64: the good class gets probability 1
DRIFT_FLOOR = float(np.finfo(np.float32).min)


def is_manifest(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".json"


def float32_ceil(t: float) -> np.float32:
    """The smallest float32 >= t: ``p >= t`` and ``p >= float32_ceil(t)`` agree for every float32 p."""
    f = np.float32(t)
    return np.nextafter(f, np.float32(np.inf)) if float(f) < t else f


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise md.MetadataError(f"{path}: not a readable cascade manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
        raise md.MetadataError(f"{path}: not a defectscope cascade manifest (give an .onnx model or the "
                               f"cascade.json written by `defectscope cascade --export files`)")
    if int(data.get("version", 0)) > MANIFEST_VERSION:
        raise md.MetadataError(f"{path}: cascade manifest version {data['version']} is newer than this defectscope")
    for key in ("screen", "classifier", "screen_threshold", "good_class"):
        if key not in data:
            raise md.MetadataError(f"{path}: cascade manifest lacks {key!r}")
    return data


def combine(passed: np.ndarray, good_index: int, n_classes: int, n_features: int,
            sent: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four graph outputs of a batch: classifier outputs (for the images not passed) where they exist,
    the screen-passed values elsewhere."""
    n = len(passed)
    logits = np.full((n, n_classes), PASSED_LOGIT, np.float32)
    logits[:, good_index] = 0.0
    probs = np.zeros((n, n_classes), np.float32)
    probs[:, good_index] = 1.0
    features = np.zeros((n, n_features), np.float32)
    drift = np.full(n, DRIFT_FLOOR, np.float32)
    if sent is not None:
        rest = ~passed
        logits[rest], probs[rest], features[rest], drift[rest] = sent
    return logits, probs, features, drift


class CascadeRunner:
    """The screen and classifier sessions of a manifest; ``run(x)`` gives the graph outputs of a batch."""

    def __init__(self, manifest_path: str | Path, make_session: Callable[[Path], Any]):
        self.path = Path(manifest_path)
        self.manifest = read_manifest(self.path)
        self.screen = make_session(self.path.parent / self.manifest["screen"])
        self.classifier = make_session(self.path.parent / self.manifest["classifier"])
        spec = md.decode(self.classifier.get_modelmeta().custom_metadata_map,
                         str(self.path.parent / self.manifest["classifier"]))[md.KEY_SPEC]
        self.classes = list(spec["classes"])
        self.good_index = self.classes.index(self.manifest["good_class"])
        self.threshold = float(self.manifest["screen_threshold"])
        self.n_features = int(self.classifier.get_outputs()[md.OUTPUTS.index("features")].shape[1])
        self.last_sent = 0  # images the classifier ran on in the last batch (for throughput accounting)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        p_good = self.screen.run([SCREEN_OUTPUT], {md.INPUT: x})[0]
        # float64 comparison, as the threshold was calibrated: scores are float32 values, t a float64.
        passed = p_good.astype(np.float64) >= self.threshold
        self.last_sent = int((~passed).sum())
        sent = tuple(self.classifier.run(list(md.OUTPUTS), {md.INPUT: np.ascontiguousarray(x[~passed])})) \
            if self.last_sent else None
        return combine(passed, self.good_index, len(self.classes), self.n_features, sent)
