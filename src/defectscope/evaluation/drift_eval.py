"""Measure how well each Drift score separates normal images from unlike ones: ``defectscope drift-eval``.

:func:`drift_eval`: AUROC and FPR@95 of every score on corrupted, unrelated, held-out-class or held-out-group
images -> ``RUN/drift_eval.json`` with the best score, and the raw per-image scores -> ``RUN/drift_eval_scores.npz``
(plain float arrays, for the report's histograms).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope.decision.costs import DRIFT
from defectscope.decision.drift import SCORES, DriftError
from defectscope.decision.drift_fit import fit_scorer
from defectscope.evaluation.corruptions import CORRUPTIONS, FAR_DRIFT, corrupt
from defectscope.rundir import DRIFT_EVAL, DRIFT_EVAL_RUNS, SPEC, Run

log = logging.getLogger(__name__)

SEP = "__"  # npz keys: normal__<score>, <kind>__<score>, and <kind>__normal__<score> for retrained kinds
KINDS = ("heldout_class", "group", "corruptions", "far")


# ---------------------------------------------------------------- metrics (numpy + sklearn)

def auroc_fpr95(normal: np.ndarray, drift: np.ndarray) -> tuple[float | None, float | None]:
    """(AUROC with Drift positive, false-flag rate on normal images at 95% Drift recall), as OpenOOD."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if len(normal) == 0 or len(drift) == 0:
        return None, None
    big = np.finfo(np.float64).max
    # NaN/inf (a degenerate feature) counts as "as unlike training as possible".
    s = np.nan_to_num(np.concatenate([normal, drift]).astype(np.float64), nan=big, posinf=big, neginf=-big)
    y = np.concatenate([np.zeros(len(normal)), np.ones(len(drift))])
    fpr, tpr, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), float(fpr[np.searchsorted(tpr, 0.95, side="left")])


# ---------------------------------------------------------------- the evaluation protocol

def _evaluate_sets(normal: dict[str, np.ndarray], drift_sets: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per drift set, and pooled over them: AUROC and FPR@95 of every score."""
    parts: dict[str, Any] = {}
    for name, scores in drift_sets.items():
        metrics = {s: auroc_fpr95(normal[s], scores[s]) for s in SCORES}
        parts[name] = {"auroc": {s: m[0] for s, m in metrics.items()}, "fpr95": {s: m[1] for s, m in metrics.items()},
                       "n_drift": len(next(iter(scores.values())))}
    pooled = {s: np.concatenate([d[s] for d in drift_sets.values()]) for s in SCORES}
    metrics = {s: auroc_fpr95(normal[s], pooled[s]) for s in SCORES}
    return {"auroc": {s: m[0] for s, m in metrics.items()}, "fpr95": {s: m[1] for s, m in metrics.items()},
            "n_normal": len(normal[SCORES[0]]), "n_drift": len(pooled[SCORES[0]]), "parts": parts}


def _mean_over_parts(parts: dict[str, Any], n_normal: int) -> dict[str, Any]:
    """Held-out experiments use a different model each, so their scores are not pooled; metrics are averaged."""
    out: dict[str, Any] = {"parts": parts, "n_normal": n_normal}
    for metric in ("auroc", "fpr95"):
        out[metric] = {}
        for s in SCORES:
            vals = [p[metric][s] for p in parts.values() if p[metric][s] is not None]
            out[metric][s] = float(np.mean(vals)) if vals else None
    out["n_drift"] = sum(p["n_drift"] for p in parts.values())
    return out


class _Scoring:
    """A run with its model loaded once: scores images with the Drift statistics of its training split."""

    def __init__(self, run: Run):
        import torch

        self.run = run
        self.model = run.model()
        torch.set_num_threads(run.config.train.threads or torch.get_num_threads())
        self.scorer = fit_scorer(run, self.model)

    def score(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from defectscope.models.inference import features_and_logits

        return self.scorer.score(*features_and_logits(self.model, images))


def _retrain(run: Run, rows: pd.DataFrame, classes: list[str], out: Path, epochs: int) -> Path:
    """Train the run's recipe on ``rows`` (their train/val splits) into ``out``; reuses a finished one."""
    from defectscope.config import config_from_dict
    from defectscope.training.train import train

    if (out / SPEC).is_file():
        log.info(f"reusing the retrained model in {out}")
        return out
    if out.exists():
        shutil.rmtree(out)  # an unfinished earlier attempt
    out.mkdir(parents=True)
    manifest = out.parent / f"{out.name}.csv"
    keep = rows[rows["split"].isin(["train", "val", "test"])].drop(columns=["source"])
    keep.to_csv(manifest, index=False)
    raw = json.loads(json.dumps(run.raw_config))  # a deep copy
    raw["data"].update({"source": str(manifest), "image_root": None, "path_column": "path", "label_column": "label",
                        "split_column": "split", "classes": classes, "group_column": None, "stratify": []})
    raw["train"]["epochs"] = epochs
    raw["train"]["progress"] = False
    for phase in raw["train"].get("phases") or []:
        phase["epochs"] = min(int(phase["epochs"]), epochs)
    logging.getLogger("defectscope.training").disabled = True  # the retrained models' epochs are noise here
    try:
        train(None, out, config=config_from_dict(raw))
    finally:
        logging.getLogger("defectscope.training").disabled = False
    log.info(f"retrained {run.config.model.name} on {len(classes)} classes for <= {epochs} epochs: {out}")
    return out


def _heldout_experiment(run: Run, train_rows: pd.DataFrame, normal_rows: pd.DataFrame, drift_rows: pd.DataFrame,
                        out: Path, epochs: int) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                         dict[str, np.ndarray]]:
    """(metrics of the part, its normal scores, its drift scores), scored by the retrained model."""
    classes = [c for c in run.classes if c in set(train_rows["label"])]
    sub = Run(_retrain(run, train_rows, classes, out, epochs))
    scoring = _Scoring(sub)
    normal = scoring.score(sub.images(normal_rows)[1])
    drift = scoring.score(sub.images(drift_rows)[1])
    part = _evaluate_sets(normal, {"drift": drift})["parts"]["drift"] | {"n_normal": len(normal[SCORES[0]])}
    return part, normal, drift


def _pool(sets: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {s: np.concatenate([np.asarray(d[s], dtype=np.float64).reshape(-1) for d in sets]) for s in SCORES}


def save_scores(path: str | Path, normal: dict[str, np.ndarray] | None,
                kinds: dict[str, dict[str, Any]]) -> Path:
    """Write the raw scores as float64 arrays in a compressed npz (no pickled objects).

    ``normal``: score name -> scores of the normal images under the run's own model (None when only
    retrained kinds ran); ``kinds[kind] = {"drift": {score: array}, "normal": {score: array} or absent}``,
    ``normal`` given for kinds scored by a retrained model (their own normal images).
    """
    arrays: dict[str, np.ndarray] = {}
    if normal is not None:
        arrays.update({f"normal{SEP}{s}": np.asarray(normal[s], dtype=np.float64).reshape(-1) for s in SCORES})
    for kind, sets in kinds.items():
        arrays.update({f"{kind}{SEP}{s}": np.asarray(v, dtype=np.float64).reshape(-1)
                       for s, v in sets["drift"].items()})
        if sets.get("normal") is not None:
            arrays.update({f"{kind}{SEP}normal{SEP}{s}": np.asarray(v, dtype=np.float64).reshape(-1)
                           for s, v in sets["normal"].items()})
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path


def load_scores(path: str | Path) -> dict[str, Any]:
    """Read :func:`save_scores`' file back: ``{"normal": {score: array} or None, "kinds": {kind: {"drift":
    {score: array}, "normal": {score: array} or None}}}``; pickled objects are refused."""
    with np.load(Path(path), allow_pickle=False) as z:
        arrays = {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
    normal = {k.split(SEP, 1)[1]: v for k, v in arrays.items() if k.startswith(f"normal{SEP}")} or None
    kinds: dict[str, dict[str, Any]] = {}
    for key, v in arrays.items():
        kind, _, rest = key.partition(SEP)
        if kind == "normal" or not rest:
            continue
        entry = kinds.setdefault(kind, {"drift": {}, "normal": None})
        if rest.startswith(f"normal{SEP}"):
            entry["normal"] = (entry["normal"] or {}) | {rest.split(SEP, 1)[1]: v}
        else:
            entry["drift"][rest] = v
    return {"normal": normal, "kinds": kinds}


def _extra_images(folder: str | Path, size: int, resize: str) -> np.ndarray:
    from defectscope.data.files import list_images
    from defectscope.data.images import load_gray

    files = list_images(folder, recursive=True)
    if not files:
        raise DriftError(f"{folder}: no image files for extra_drift")
    return np.stack([load_gray(p, size, resize) for p in files])


def drift_eval(
    run: str | Path,
    *,
    kinds: Sequence[str] = ("corruptions", "far"),
    extra_drift: str | Path | None = None,
    out: str | Path | None = None,
    heldout_epochs: int = 3,
    group_column: str | None = None,
    train_value: str | None = None,
    n_far: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate every Drift score on a Drift protocol, pick the best, and write ``RUN/drift_eval.json``
    (or ``out``). Normal images are the run's test split, scored by the run's own model, whose Drift
    statistics are fitted on its training split (nothing is calibrated, so the whole test split is used).

    Kinds: ``corruptions`` (each corruption of the test images, pooled and per corruption), ``far``
    (``n_far`` wafer maps and digit images each), ``heldout_class`` (one class at a time: the run's recipe
    retrained without it for ``heldout_epochs`` epochs; Drift = every image of that class; slow),
    ``group`` (retrained on rows whose ``group_column`` equals ``train_value``, e.g. ELPV ``type=mono``;
    Drift = all other rows; slow). ``extra_drift``: a folder of real Drift images, its own kind ``extra``.
    Retrained runs go to ``RUN/drift_eval_runs/`` and are reused when present. The best score has the
    highest AUROC averaged over the kinds run. The per-image scores behind the metrics go beside the JSON
    (``RUN/drift_eval_scores.npz``, see :func:`save_scores`; a kind's parts pooled).
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise DriftError(f"unknown drift kinds {sorted(unknown)}; valid: {', '.join(KINDS)}")
    if not kinds and extra_drift is None:
        raise DriftError("nothing to evaluate: give kinds or extra_drift")
    r = run if isinstance(run, Run) else Run(run)
    test_rows = r.rows("test")
    if test_rows.empty:
        raise DriftError(f"{run}: the test split is empty; drift evaluation needs normal test images")
    results: dict[str, Any] = {}
    raw: dict[str, dict[str, Any]] = {}  # per kind, the per-image scores behind the metrics
    normal = None
    needs_base = {"corruptions", "far"} & set(kinds) or extra_drift is not None
    if needs_base:
        scoring = _Scoring(r)
        _, normal_images = r.images(test_rows)
        normal = scoring.score(normal_images)
        if "corruptions" in kinds:
            sets = {name: scoring.score(corrupt(normal_images, name, seed=seed)) for name in CORRUPTIONS}
            results["corruptions"] = _evaluate_sets(normal, sets)
            raw["corruptions"] = {"drift": _pool(list(sets.values()))}
        if "far" in kinds:
            sets = {name: scoring.score(fn(n_far, r.image_size, seed=seed)) for name, fn in FAR_DRIFT.items()}
            results["far"] = _evaluate_sets(normal, sets)
            raw["far"] = {"drift": _pool(list(sets.values()))}
        if extra_drift is not None:
            images = _extra_images(extra_drift, r.image_size, r.spec.get("resize", "squash"))
            extra = scoring.score(images)
            results["extra"] = _evaluate_sets(normal, {str(extra_drift): extra})
            raw["extra"] = {"drift": _pool([extra])}
    work = r.path / DRIFT_EVAL_RUNS
    if "heldout_class" in kinds:
        if len(r.classes) < 3:
            raise DriftError("holding out a class needs at least 3 classes (2 remain to train on)")
        parts, normals, drifts = {}, [], []
        for c in r.classes:
            log.info(f"held-out class {c!r}: retraining without it")
            others = r.table[r.table["label"] != c]
            parts[c], n_sc, d_sc = _heldout_experiment(r, others, others[others["split"] == "test"],
                                                       r.table[r.table["label"] == c], work / f"without_{c}",
                                                       heldout_epochs)
            normals.append(n_sc)
            drifts.append(d_sc)
        results["heldout_class"] = _mean_over_parts(parts, len(test_rows))
        raw["heldout_class"] = {"drift": _pool(drifts), "normal": _pool(normals)}
    if "group" in kinds:
        if group_column is None or train_value is None:
            raise DriftError("the group kind needs group_column and train_value (e.g. 'type', 'mono')")
        if group_column not in r.table.columns:
            raise DriftError(f"no column {group_column!r} in the dataset table; columns: {list(r.table.columns)}")
        inside = r.table[r.table[group_column].astype(str) == str(train_value)]
        outside = r.table[r.table[group_column].astype(str) != str(train_value)]
        if inside.empty or outside.empty:
            raise DriftError(f"{group_column}={train_value!r} must split the table into two non-empty groups")
        log.info(f"held-out group: retraining on {group_column}={train_value!r} only")
        part, n_sc, d_sc = _heldout_experiment(r, inside, inside[inside["split"] == "test"], outside,
                                               work / f"only_{group_column}_{train_value}", heldout_epochs)
        results["group"] = _mean_over_parts({f"{group_column}!={train_value}": part}, part["n_normal"])
        raw["group"] = {"drift": _pool([d_sc]), "normal": _pool([n_sc])}

    mean_auroc = {}
    for s in SCORES:
        vals = [k["auroc"][s] for k in results.values() if k["auroc"][s] is not None]
        mean_auroc[s] = float(np.mean(vals)) if vals else None
    ranked = [s for s in SCORES if mean_auroc[s] is not None]
    best = max(ranked, key=lambda s: mean_auroc[s]) if ranked else None
    report = {
        "run": str(r.path), "model": r.spec.get("architecture", r.config.model.name), "image_size": r.image_size,
        "scores": list(SCORES), "kinds": results, "mean_auroc": mean_auroc, "best_score": best,
        "protocol": {
            "normal": "the run's test split", "positive": DRIFT, "seed": seed, "n_far": n_far,
            "heldout_epochs": heldout_epochs if {"heldout_class", "group"} & set(kinds) else None,
            "group": {"column": group_column, "train_value": train_value} if "group" in kinds else None,
            "fpr95": "false-flag rate on normal images at the threshold flagging 95% of Drift",
        },
    }
    path = Path(out) if out is not None else r.path / DRIFT_EVAL
    path.write_text(json.dumps(report, indent=2) + "\n")
    # Beside the JSON: RUN/drift_eval_scores.npz by default, <out stem>_scores.npz otherwise.
    scores_path = save_scores(path.with_name(f"{path.stem}_scores.npz"), normal, raw)
    for kind, res in results.items():
        log.info(f"{kind:>13}: " + ", ".join(f"{s} AUROC {_fmt(res['auroc'][s])} FPR@95 {_fmt(res['fpr95'][s])}"
                                        for s in SCORES))
    log.info(f"best drift score: {best} (mean AUROC {_fmt(mean_auroc.get(best))}); written: {path}, {scores_path}")
    return report


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = ["KINDS", "auroc_fpr95", "drift_eval", "load_scores", "save_scores"]
