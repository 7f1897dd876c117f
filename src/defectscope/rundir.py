"""The run directory: one folder holding everything a run made, opened by every later stage as a :class:`Run`.

    RUN/config.yaml          final layered config
    RUN/dataset.csv          the dataset table with the split of every image
    RUN/skipped.csv          files skipped with skip_bad, and why
    RUN/history.csv          per-epoch loss and validation metrics
    RUN/model.safetensors    best weights (never pickled)
    RUN/model.json           architecture, classes, input size, normalisation, provenance
    RUN/checkpoint.pt        last epoch's full state for --resume (tensors only, weights_only loadable)
    RUN/policy.json          the decision policy from `defectscope calibrate`
    RUN/drift.safetensors    statistics of the training features for the Drift scores (+ drift.json)
    RUN/patch_drift.safetensors  per-position Gaussians of the training images' feature maps (+ patch_drift.json)
    RUN/drift_eval.json      Drift scores measured by `defectscope drift-eval` (+ drift_eval_scores.npz)
    RUN/cascade_policy.json  a two-stage cascade with this run as its classifier (`defectscope cascade`)
    RUN/evaluation/          metrics.json, predictions.csv, logits.npy, report.html from `defectscope evaluate`

This module knows where each file is and how it is stored (YAML, CSV, JSON, safetensors); what a policy or a
set of Drift statistics means is for ``defectscope.decision`` to say, which reads them through a Run.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope.config import RunConfig, config_from_dict, load_yaml
from defectscope.errors import DefectscopeError

CONFIG = "config.yaml"
TABLE = "dataset.csv"
SKIPPED = "skipped.csv"
HISTORY = "history.csv"
WEIGHTS = "model.safetensors"
SPEC = "model.json"
CHECKPOINT = "checkpoint.pt"
POLICY = "policy.json"
DRIFT_WEIGHTS = "drift.safetensors"
DRIFT_PARAMS = "drift.json"
PATCH_DRIFT_WEIGHTS = "patch_drift.safetensors"
PATCH_DRIFT_PARAMS = "patch_drift.json"
DRIFT_EVAL = "drift_eval.json"
DRIFT_EVAL_SCORES = "drift_eval_scores.npz"
DRIFT_EVAL_RUNS = "drift_eval_runs"
EVALUATION = "evaluation"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
LOGITS = "logits.npy"
CASCADE_POLICY = "cascade_policy.json"


class RunError(DefectscopeError, FileNotFoundError):
    """A folder that is not a (finished) run directory."""


def read_table(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / TABLE
    if not path.is_file():
        raise RunError(f"{run_dir}: not a defectscope run directory (no {TABLE})")
    # Labels and metadata stay strings: '001' must not become 1.
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def read_spec(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SPEC
    if not path.is_file():
        raise RunError(f"{run_dir}: no trained model ({SPEC} missing; did training finish?)")
    return json.loads(path.read_text())


def save_model(model, spec: dict[str, Any], run_dir: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(run_dir) / WEIGHTS))
    (Path(run_dir) / SPEC).write_text(json.dumps(spec, indent=2))


class Run:
    """A finished run directory, read lazily: each file is read once, on first use.

    >>> run = Run("runs/first")  # doctest: +SKIP
    >>> rows, images = run.images(run.rows("test"))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / TABLE).is_file():
            raise RunError(f"{self.path}: not a defectscope run directory (no {TABLE})")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @cached_property
    def raw_config(self) -> dict[str, Any]:
        """config.yaml as written (an older run may lack it: then the defaults)."""
        path = self.path / CONFIG
        return load_yaml(path) if path.is_file() else {}

    @cached_property
    def config(self) -> RunConfig:
        return config_from_dict(self.raw_config)

    @property
    def seed(self) -> int:
        return int(self.raw_config.get("seed", 0))

    @cached_property
    def table(self) -> pd.DataFrame:
        return read_table(self.path)

    @cached_property
    def spec(self) -> dict[str, Any]:
        return read_spec(self.path)

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    def rows(self, split: str) -> pd.DataFrame:
        """The table's rows of one split."""
        return self.table[self.table["split"] == split]

    def labels(self, rows: pd.DataFrame) -> np.ndarray:
        """Class indices of ``rows`` in the model's class order."""
        index = {c: i for i, c in enumerate(self.classes)}
        return rows["label"].map(index).to_numpy()

    def model(self):
        """Rebuild the model from model.json and model.safetensors, in eval mode on the CPU (a new copy each call)."""
        from safetensors.torch import load_file

        from defectscope.models.factory import model_from_spec

        model = model_from_spec(self.spec)
        model.load_state_dict(load_file(str(self.path / WEIGHTS)))
        return model.eval()

    def images(self, rows: pd.DataFrame, *, skip_bad: bool = True) -> tuple[pd.DataFrame, np.ndarray]:
        """``(rows, images)``: the rows' images decoded and resized exactly as the model was trained on them,
        through the run's cache; unreadable rows are dropped with ``skip_bad``, else raise."""
        from defectscope.data.cache import drop_bad, load_images

        data = self.config.data
        rows = rows.reset_index(drop=True)
        images, bad = load_images(rows, self.image_size, resize=self.spec.get("resize", "squash"),
                                  max_pixels=data.max_pixels, skip_bad=skip_bad, cache_dir=data.cache_dir)
        return drop_bad(rows, images, bad)

    @cached_property
    def metadata_encoder(self):
        """The encoder of the model's metadata inputs (``metadata_inputs`` in model.json), or None."""
        from defectscope.data.metadata_inputs import MetadataEncoder

        return MetadataEncoder.from_spec(self.spec.get("metadata_inputs"))

    def metadata(self, rows: pd.DataFrame) -> np.ndarray | None:
        """The encoded metadata inputs (N, M) of ``rows`` (rows as :meth:`images` returns them), or None
        for a model that takes the image alone."""
        encoder = self.metadata_encoder
        return None if encoder is None else encoder.encode_table(rows)

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON file of the run, or None when it does not exist."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def policy(self) -> dict[str, Any] | None:
        """policy.json as a dict (``defectscope.decision.policy.Policy.from_dict`` gives the object), or None."""
        return self.read_json(POLICY)

    def drift_statistics(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, parameters) of drift.safetensors + drift.json, or None when Drift was not fitted."""
        return self._statistics(DRIFT_WEIGHTS, DRIFT_PARAMS)

    def save_drift_statistics(self, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Path:
        return self._save_statistics(DRIFT_WEIGHTS, DRIFT_PARAMS, arrays, params)

    def patch_drift_statistics(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, parameters) of patch_drift.safetensors + patch_drift.json, or None when not fitted."""
        return self._statistics(PATCH_DRIFT_WEIGHTS, PATCH_DRIFT_PARAMS)

    def save_patch_drift_statistics(self, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Path:
        return self._save_statistics(PATCH_DRIFT_WEIGHTS, PATCH_DRIFT_PARAMS, arrays, params)

    def _statistics(self, weights_name: str, params_name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        weights, params = self.path / weights_name, self.path / params_name
        if not weights.is_file() or not params.is_file():
            return None
        from safetensors.numpy import load_file

        return load_file(str(weights)), json.loads(params.read_text())

    def _save_statistics(self, weights_name: str, params_name: str, arrays: dict[str, np.ndarray],
                         params: dict[str, Any]) -> Path:
        from safetensors.numpy import save_file

        save_file(arrays, str(self.path / weights_name))
        (self.path / params_name).write_text(json.dumps(params, indent=2) + "\n")
        return self.path / weights_name
