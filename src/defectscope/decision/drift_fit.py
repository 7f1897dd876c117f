"""Fit a run's Drift scores, calibrate the Drift threshold, and evaluate the scores on a Drift protocol.

- :func:`fit_drift`: statistics of the training split's features -> ``RUN/drift.safetensors`` + ``drift.json``.
- :func:`calibrate_drift_threshold`: a threshold with a finite-sample false-flag guarantee (numpy only).
- :func:`cost_aware_drift_threshold`: the threshold of least expected cost when labelled Drift exists.
- :func:`drift_eval`: AUROC and FPR@95 of every score on corrupted, unrelated, held-out-class or
  held-out-group images -> ``RUN/drift_eval.json`` with the best score, and the raw per-image scores
  -> ``RUN/drift_eval_scores.npz`` (plain float arrays, for the report's histograms).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope.decision.corruptions import CORRUPTIONS, FAR_DRIFT, corrupt
from defectscope.decision.costs import DRIFT
from defectscope.decision.drift import SCORES, DriftError, DriftScorer

DRIFT_EVAL = "drift_eval.json"
DRIFT_EVAL_SCORES = "drift_eval_scores.npz"
SEP = "__"  # npz keys: normal__<score>, <kind>__<score>, and <kind>__normal__<score> for retrained kinds
KINDS = ("heldout_class", "group", "corruptions", "far")


# ---------------------------------------------------------------- thresholds (numpy only)

def calibrate_drift_threshold(scores_in_distribution: np.ndarray, target_false_flag_rate: float = 0.01) -> float:
    """The Drift threshold (flag iff score > threshold) from scores of held-out in-distribution images.

    Split-conformal rule: with the n scores sorted, the threshold is the k-th smallest with
    k = ceil((n + 1)(1 - alpha)). For a new in-distribution image exchangeable with the calibration
    images, P(score > threshold) <= alpha, averaged over calibration sets (Vovk et al. 2005; Angelopoulos
    & Bates 2021, sec. 1); without ties it is also >= alpha - 1/(n + 1). The plain empirical quantile
    would flag slightly more than alpha. Needs n >= 1/alpha - 1 images (99 for 1%); fewer are refused
    because no calibration score is high enough to guarantee the rate.
    """
    s = np.asarray(scores_in_distribution, dtype=np.float64).reshape(-1)
    alpha = float(target_false_flag_rate)
    if not 0 < alpha < 1:
        raise DriftError(f"target_false_flag_rate must be in (0, 1), got {alpha}")
    if not np.isfinite(s).all():
        raise DriftError("in-distribution drift scores contain NaN or infinity")
    n = len(s)
    # The epsilon keeps (n + 1)(1 - alpha) = 190.00000000000003 from rounding up to 191.
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if k > n:
        need = math.ceil(1 / alpha - 1 - 1e-9)
        raise DriftError(
            f"{n} in-distribution images are too few to guarantee a false-flag rate of {alpha:g}: "
            f"at least {need} are needed (or accept a higher rate)"
        )
    return float(np.sort(s)[max(k, 1) - 1])


def _gain_above(scores: np.ndarray, delta: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: sum of ``delta`` over the items with score > t."""
    order = np.argsort(scores, kind="stable")
    s, d = scores[order], delta[order]
    suffix = np.concatenate([np.cumsum(d[::-1])[::-1], [0.0]])
    return suffix[np.searchsorted(s, thresholds, side="right")]


def cost_aware_drift_threshold(
    scores_in: np.ndarray,
    labels_in: Sequence[str],
    decided_in: Sequence[str],
    scores_drift: np.ndarray,
    decided_drift: Sequence[str],
    cost_matrix: dict[str, Any],
    *,
    drift_prior: float | None = None,
    target_false_flag_rate: float = 0.01,
) -> dict[str, Any]:
    """The threshold minimising the expected cost on calibration images, with its evidence.

    ``labels_in``/``decided_in``: true class and the decision the rest of the policy makes for each
    in-distribution image; ``decided_drift``: that decision for each labelled Drift image. Flagging
    image i costs C[true_i, Drift], not flagging costs C[true_i, decided_i] (true = Drift for Drift
    images). ``drift_prior`` is the Drift share expected in production: labelled Drift examples are
    usually collected, not sampled, so their share in calibration says little; None uses it anyway.
    Ties go to the highest threshold (fewest flags). Without Drift examples the threshold falls back
    to :func:`calibrate_drift_threshold` at ``target_false_flag_rate``.
    """
    s_in = np.asarray(scores_in, dtype=np.float64).reshape(-1)
    s_dr = np.asarray(scores_drift, dtype=np.float64).reshape(-1)
    if len(s_dr) == 0:
        return {"threshold": calibrate_drift_threshold(s_in, target_false_flag_rate), "method": "false_flag_rate",
                "target_false_flag_rate": target_false_flag_rate, "n_in": len(s_in), "n_drift": 0}
    names = list(cost_matrix["classes"])
    if DRIFT not in names:
        raise DriftError(f"a cost-aware Drift threshold needs a {DRIFT!r} row and column in the cost matrix")
    where, c = {n: i for i, n in enumerate(names)}, np.asarray(cost_matrix["costs"], dtype=np.float64)
    if not (len(s_in) == len(labels_in) == len(decided_in)) or len(s_dr) != len(decided_drift):
        raise DriftError("scores, labels and decisions must have one entry per image")
    try:
        keep_in = np.array([c[where[t], where[d]] for t, d in zip(labels_in, decided_in, strict=True)])
        flag_in = np.array([c[where[t], where[DRIFT]] for t in labels_in])
        keep_dr = np.array([c[where[DRIFT], where[d]] for d in decided_drift])
    except KeyError as err:
        raise DriftError(f"label or decision {err.args[0]!r} is not in the cost matrix {names}") from None
    flag_dr = np.full(len(s_dr), c[where[DRIFT], where[DRIFT]])
    if drift_prior is None:
        w_in = w_dr = 1.0 / (len(s_in) + len(s_dr))
    else:
        if not 0 <= drift_prior <= 1:
            raise DriftError(f"drift_prior must be in [0, 1], got {drift_prior}")
        w_in = (1 - drift_prior) / max(len(s_in), 1)
        w_dr = drift_prior / len(s_dr)
    all_s = np.concatenate([s_in, s_dr])
    # Descending, so argmin's first hit is the highest threshold among equal costs.
    cand = np.unique(np.concatenate([all_s, [np.nextafter(all_s.min(), -np.inf)]]))[::-1]
    cost = (w_in * (keep_in.sum() + _gain_above(s_in, flag_in - keep_in, cand))
            + w_dr * (keep_dr.sum() + _gain_above(s_dr, flag_dr - keep_dr, cand)))
    best = int(np.argmin(cost))
    t = float(cand[best])
    return {
        "threshold": t, "method": "cost", "expected_cost_per_image": float(cost[best]),
        "expected_cost_without_drift_flag": float(cost[0]),
        "false_flag_rate": float((s_in > t).mean()) if len(s_in) else None,
        "drift_recall": float((s_dr > t).mean()), "n_in": len(s_in), "n_drift": len(s_dr),
        "drift_prior": drift_prior,
    }


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


# ---------------------------------------------------------------- torch side

def features_and_logits(model, images: np.ndarray, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (N, D) float32, logits (N, K) float64) of uint8 images (N, H, W), one pass."""
    import torch

    from defectscope.training.loop import to_input

    device = next(model.parameters()).device
    x_all = torch.as_tensor(np.asarray(images))
    model.eval()
    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            f = model.forward_features(to_input(x_all[i:i + batch_size], device, False)).float()
            feats.append(f.cpu().numpy())
            logits.append(model.head(f).double().cpu().numpy())
    d, k = model.head.in_features, model.head.out_features
    if not feats:
        return np.empty((0, d), np.float32), np.empty((0, k), np.float64)
    return np.concatenate(feats), np.concatenate(logits)


class _Run:
    """A loaded run: model, spec, config, table, and its images on demand."""

    def __init__(self, run: str | Path):
        import torch

        from defectscope import rundir
        from defectscope.config import config_from_dict, load_yaml

        self.path = Path(run)
        self.model, self.spec = rundir.load_model(self.path)
        self.raw_cfg = load_yaml(self.path / rundir.CONFIG)
        self.cfg = config_from_dict(self.raw_cfg)
        self.table = rundir.read_table(self.path)
        self.classes = list(self.spec["classes"])
        self.size = int(self.spec["image_size"])
        torch.set_num_threads(self.cfg.train.threads or torch.get_num_threads())

    def images(self, rows: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        from defectscope import rundir

        return rundir.run_images(rows, self.spec, self.cfg.data)

    def fit_scorer(self, *, k: int = 10) -> DriftScorer:
        rows, images = self.images(self.table[self.table["split"] == "train"])
        labels = rows["label"].map({c: i for i, c in enumerate(self.classes)}).to_numpy()
        feats, logits = features_and_logits(self.model, images)
        return DriftScorer(k=k, seed=int(self.raw_cfg.get("seed", 0))).fit(feats, logits, labels)

    def score(self, scorer: DriftScorer, images: np.ndarray) -> dict[str, np.ndarray]:
        return scorer.score(*features_and_logits(self.model, images))


def fit_drift(run: str | Path, *, k: int = 10, log=print) -> DriftScorer:
    """Fit the Drift statistics on the features of the run's training split and save them in the run
    (``RUN/drift.safetensors``: class means, tied precision, kNN bank; ``RUN/drift.json``: parameters)."""
    r = _Run(run)
    scorer = r.fit_scorer(k=k)
    weights, _ = scorer.save(r.path)
    log(f"drift statistics of {scorer.n_train} training images ({scorer.bank.shape[1]} features, "
        f"kNN bank {len(scorer.bank)}) written: {weights}")
    return scorer


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


def _retrain(r: _Run, rows: pd.DataFrame, classes: list[str], out: Path, epochs: int, log) -> Path:
    """Train the run's recipe on ``rows`` (their train/val splits) into ``out``; reuses a finished one."""
    from defectscope import rundir, train
    from defectscope.config import config_from_dict

    if (out / rundir.SPEC).is_file():
        log(f"reusing the retrained model in {out}")
        return out
    if out.exists():
        shutil.rmtree(out)  # an unfinished earlier attempt
    out.mkdir(parents=True)
    manifest = out.parent / f"{out.name}.csv"
    keep = rows[rows["split"].isin(["train", "val", "test"])].drop(columns=["source"])
    keep.to_csv(manifest, index=False)
    raw = json.loads(json.dumps(r.raw_cfg))  # a deep copy
    raw["data"].update({"source": str(manifest), "image_root": None, "path_column": "path", "label_column": "label",
                        "split_column": "split", "classes": classes, "group_column": None, "stratify": []})
    raw["train"]["epochs"] = epochs
    raw["train"]["progress"] = False
    for phase in raw["train"].get("phases") or []:
        phase["epochs"] = min(int(phase["epochs"]), epochs)
    train(None, out, config=config_from_dict(raw), log=lambda *a: None)
    log(f"retrained {r.cfg.model.name} on {len(classes)} classes for <= {epochs} epochs: {out}")
    return out


def _heldout_experiment(r: _Run, train_rows: pd.DataFrame, normal_rows: pd.DataFrame, drift_rows: pd.DataFrame,
                        out: Path, epochs: int, log) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                              dict[str, np.ndarray]]:
    """(metrics of the part, its normal scores, its drift scores), scored by the retrained model."""
    classes = [c for c in r.classes if c in set(train_rows["label"])]
    sub = _Run(_retrain(r, train_rows, classes, out, epochs, log))
    scorer = sub.fit_scorer()
    normal = sub.score(scorer, sub.images(normal_rows)[1])
    drift = sub.score(scorer, sub.images(drift_rows)[1])
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
    from defectscope.data.images import IMAGE_EXTENSIONS, load_gray

    files = sorted(p for p in Path(folder).rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
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
    log=print,
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
    r = _Run(run)
    test_rows = r.table[r.table["split"] == "test"]
    if test_rows.empty:
        raise DriftError(f"{run}: the test split is empty; drift evaluation needs normal test images")
    results: dict[str, Any] = {}
    raw: dict[str, dict[str, Any]] = {}  # per kind, the per-image scores behind the metrics
    normal = None
    needs_base = {"corruptions", "far"} & set(kinds) or extra_drift is not None
    if needs_base:
        scorer = r.fit_scorer()
        _, normal_images = r.images(test_rows)
        normal = r.score(scorer, normal_images)
        if "corruptions" in kinds:
            sets = {name: r.score(scorer, corrupt(normal_images, name, seed=seed)) for name in CORRUPTIONS}
            results["corruptions"] = _evaluate_sets(normal, sets)
            raw["corruptions"] = {"drift": _pool(list(sets.values()))}
        if "far" in kinds:
            sets = {name: r.score(scorer, fn(n_far, r.size, seed=seed)) for name, fn in FAR_DRIFT.items()}
            results["far"] = _evaluate_sets(normal, sets)
            raw["far"] = {"drift": _pool(list(sets.values()))}
        if extra_drift is not None:
            images = _extra_images(extra_drift, r.size, r.spec.get("resize", "squash"))
            extra = r.score(scorer, images)
            results["extra"] = _evaluate_sets(normal, {str(extra_drift): extra})
            raw["extra"] = {"drift": _pool([extra])}
    work = r.path / "drift_eval_runs"
    if "heldout_class" in kinds:
        if len(r.classes) < 3:
            raise DriftError("holding out a class needs at least 3 classes (2 remain to train on)")
        parts, normals, drifts = {}, [], []
        for c in r.classes:
            log(f"held-out class {c!r}: retraining without it")
            others = r.table[r.table["label"] != c]
            parts[c], n_sc, d_sc = _heldout_experiment(r, others, others[others["split"] == "test"],
                                                       r.table[r.table["label"] == c], work / f"without_{c}",
                                                       heldout_epochs, log)
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
        log(f"held-out group: retraining on {group_column}={train_value!r} only")
        part, n_sc, d_sc = _heldout_experiment(r, inside, inside[inside["split"] == "test"], outside,
                                               work / f"only_{group_column}_{train_value}", heldout_epochs, log)
        results["group"] = _mean_over_parts({f"{group_column}!={train_value}": part}, part["n_normal"])
        raw["group"] = {"drift": _pool([d_sc]), "normal": _pool([n_sc])}

    mean_auroc = {}
    for s in SCORES:
        vals = [k["auroc"][s] for k in results.values() if k["auroc"][s] is not None]
        mean_auroc[s] = float(np.mean(vals)) if vals else None
    ranked = [s for s in SCORES if mean_auroc[s] is not None]
    best = max(ranked, key=lambda s: mean_auroc[s]) if ranked else None
    report = {
        "run": str(r.path), "model": r.spec.get("architecture", r.cfg.model.name), "image_size": r.size,
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
        log(f"{kind:>13}: " + ", ".join(f"{s} AUROC {_fmt(res['auroc'][s])} FPR@95 {_fmt(res['fpr95'][s])}"
                                        for s in SCORES))
    log(f"best drift score: {best} (mean AUROC {_fmt(mean_auroc.get(best))}); written: {path}, {scores_path}")
    return report


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = [
    "DRIFT_EVAL", "DRIFT_EVAL_SCORES", "KINDS", "auroc_fpr95", "calibrate_drift_threshold",
    "cost_aware_drift_threshold", "drift_eval", "features_and_logits", "fit_drift", "load_scores", "save_scores",
]
