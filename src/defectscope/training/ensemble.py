"""``defectscope ensemble``: several finished runs on one split -> one run whose model averages their votes.

The members can be anything trained on the same images, labels and split: frozen-feature runs of
different backbones, fine-tunes with different seeds (``train.init_seed``), a frozen and a fine-tuned
model. The result is an ordinary run directory (config, dataset table, history, model.json +
model.safetensors), so calibrate, evaluate, drift-eval and export treat it like any run, and the export is
one ONNX graph holding every member.

Why the split must match: a member's validation or test image that another member trained on would make the
ensemble's validation, calibration and test scores optimistic; the dataset table's hash in each model.json
(file names, labels, splits) is compared, and any difference is an error.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope import rundir
from defectscope._version import __version__
from defectscope.errors import DefectscopeError
from defectscope.models.ensemble import ARCHITECTURE
from defectscope.rundir import Run

log = logging.getLogger(__name__)


class EnsembleError(DefectscopeError, ValueError):
    """Runs that cannot be ensembled (different classes, inputs or splits), or a bad output folder."""


def _check_members(runs: list[Run]) -> None:
    first = runs[0]
    paths = [r.path.resolve() for r in runs]
    if len(set(paths)) != len(paths):
        raise EnsembleError("a run is given twice; each member must be a different run")
    defaults = {"resize": "squash", "in_chans": 1, "input_kind": "image"}  # older runs' specs lack these keys
    for r in runs[1:]:
        for key, what in (("classes", "classes (names and order)"), ("image_size", "input size"),
                          ("resize", "resize mode"), ("in_chans", "input channels"), ("input_kind", "input kind")):
            a, b = first.spec.get(key, defaults.get(key)), r.spec.get(key, defaults.get(key))
            if a != b:
                raise EnsembleError(f"{r.path} has another {what} than {first.path} ({b!r} vs {a!r}); members of "
                                    "an ensemble take the same input and predict the same classes")
        a, b = first.spec.get("dataset_sha256"), r.spec.get("dataset_sha256")
        if a is None or b is None or a != b:
            raise EnsembleError(
                f"{r.path} was not trained on the same images, labels and split as {first.path} (dataset hashes "
                f"{str(b)[:12]} vs {str(a)[:12]}); an image one member trained on would be a validation or test "
                "image of another. Train the members with the same data and seed (vary the member seed with "
                "--set train.init_seed=N, or the architecture or recipe)")
    for r in runs:
        if r.spec.get("metadata_inputs"):
            raise EnsembleError(f"{r.path} takes metadata inputs; ensembles of such models are not supported")
        if r.spec.get("architecture") == ARCHITECTURE:
            raise EnsembleError(f"{r.path} is itself an ensemble; give its member runs instead")


def _val_scores(model, run: Run) -> dict[str, Any]:
    """Validation macro-F1 / accuracy of the ensemble and of each member, from one pass over the images."""
    import torch

    from defectscope.metrics import classification_metrics
    from defectscope.models.inference import features_and_logits

    rows, images = run.images(run.rows("val"))
    if not len(rows):
        return {}
    labels = run.labels(rows)
    feats, logits = features_and_logits(model, images)
    with torch.no_grad():
        members = [z.numpy() for z in model.head.member_logits(torch.from_numpy(feats))]

    def score(z: np.ndarray) -> dict[str, float]:
        m = classification_metrics(labels, z.argmax(1), run.classes)
        return {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4)}

    return {"images": int(len(rows)), "ensemble": score(logits), "members": [score(z) for z in members]}


def ensemble(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Combine the finished runs ``runs`` (two or more, same classes, input and split) into the run ``out``.

    The new run's model averages the members' class probabilities; its validation scores, and each
    member's, are in ``out/model.json`` under ``ensemble_val``. Returns ``out``.

    >>> defectscope.ensemble(["runs/lite0", "runs/lite1"], "runs/both")  # doctest: +SKIP
    """
    from defectscope.models.factory import ModelError, ensemble_model, model_spec
    from defectscope.training.train import machine_info

    if len(runs) < 2:
        raise EnsembleError(f"an ensemble needs at least two runs; got {len(runs)}")
    members = [Run(p) for p in runs]
    _check_members(members)  # reads every member's model.json: a run without a model fails here, naming it
    out = Path(out)
    if (out / rundir.SPEC).exists() or (out / rundir.TABLE).exists():  # every member holds both
        raise EnsembleError(f"{out} already holds a run; choose another output folder")
    try:
        model = ensemble_model([r.model() for r in members])
    except ModelError as exc:
        raise EnsembleError(str(exc)) from None
    first = members[0]
    val = _val_scores(model, first)  # same table and input as every member

    # Only now is the folder made: a failure above leaves nothing that would block a retry.
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(first.file(rundir.TABLE), out / rundir.TABLE)
    shutil.copyfile(first.file(rundir.CONFIG), out / rundir.CONFIG)
    if first.file(rundir.SKIPPED).is_file():
        shutil.copyfile(first.file(rundir.SKIPPED), out / rundir.SKIPPED)
    val_f1 = val.get("ensemble", {}).get("macro_f1", float("nan"))
    pd.DataFrame([{"epoch": 0, "val_macro_f1": val_f1,
                   "val_accuracy": val.get("ensemble", {}).get("accuracy", float("nan"))}]).to_csv(
        out / rundir.HISTORY, index=False)
    spec = model_spec(
        model, ARCHITECTURE, first.classes, first.image_size,
        resize=first.spec.get("resize", "squash"), input_kind=first.spec.get("input_kind", "image"),
        members=[r.spec for r in members], member_runs=[str(r.path) for r in members],
        recipe="ensemble", views=[0], best_epoch=0, epochs_run=0, monitor="val_macro_f1", best_score=val_f1,
        ensemble_val=val, pretrained=first.spec.get("pretrained"),
        train_seconds=round(sum(float(r.spec.get("train_seconds") or 0) for r in members), 1),
        dataset_sha256=first.spec.get("dataset_sha256"), seed=first.spec.get("seed"),
        defectscope_version=__version__, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(),
    )
    rundir.save_model(model, spec, out)
    if val:
        scores = ", ".join(f"{m['macro_f1']:.4f}" for m in val["members"])
        log.info(f"ensemble of {len(members)}: validation macro-F1 {val_f1:.4f} (members {scores}); run saved in {out}")
    return out
