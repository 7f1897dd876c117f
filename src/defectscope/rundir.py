"""The run directory: one folder holding everything a training run made and everything later stages read.

    RUN/config.yaml        final layered config
    RUN/dataset.csv        the dataset table with the split of every image
    RUN/skipped.csv        files skipped with skip_bad, and why
    RUN/history.csv        per-epoch loss and validation metrics
    RUN/model.safetensors  best weights (never pickled)
    RUN/model.json         architecture, classes, input size, normalisation, provenance
    RUN/checkpoint.pt      last epoch's full state for --resume (tensors only, weights_only loadable)
    RUN/evaluation/        metrics.json and predictions.csv from `defectscope evaluate`
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

CONFIG = "config.yaml"
TABLE = "dataset.csv"
SKIPPED = "skipped.csv"
HISTORY = "history.csv"
WEIGHTS = "model.safetensors"
SPEC = "model.json"
EVALUATION = "evaluation"


class RunError(FileNotFoundError):
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


def run_images(rows: pd.DataFrame, spec: dict[str, Any], data=None, *, skip_bad: bool = True):
    """``(rows, images)``: the rows' images decoded and resized exactly as the model was trained on them
    (``spec``'s size and resize mode), through the run's cache; unreadable rows are dropped with
    ``skip_bad``, else raise. ``data`` is the run's DataConfig (pixel limit, cache folder), or defaults."""
    from defectscope.config import DataConfig
    from defectscope.data.cache import drop_bad, load_images

    data = data or DataConfig()
    rows = rows.reset_index(drop=True)
    images, bad = load_images(rows, spec["image_size"], resize=spec.get("resize", "squash"),
                              max_pixels=data.max_pixels, skip_bad=skip_bad, cache_dir=data.cache_dir)
    return drop_bad(rows, images, bad)


def load_model(run_dir: str | Path):
    """Rebuild the run's model from model.json and model.safetensors, in eval mode on the CPU."""
    from safetensors.torch import load_file

    from defectscope.models.factory import model_from_spec

    spec = read_spec(run_dir)
    model = model_from_spec(spec)
    model.load_state_dict(load_file(str(Path(run_dir) / WEIGHTS)))
    return model.eval(), spec
