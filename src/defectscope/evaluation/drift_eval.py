"""Measure how well each Drift score separates normal images from unlike ones: ``defectscope drift-eval``.

:func:`drift_eval` scores every candidate Drift score on corrupted, unrelated, held-out-class or
held-out-group images: each pooled score (msp, energy, mahalanobis, knn, vim with a linear head), the
``patch`` score of the feature maps, the ``photometric`` score of the grey levels, and the max of every pair of them
standardised on the validation split's images. It chooses the policy's score by its WORST-kind AUROC, and says
how that choice does on a kind it was not chosen on (leave-one-kind-out;
:func:`defectscope.decision.drift.fusion.select_score`). AUROC and FPR@95 of every candidate per kind and per
part -> ``RUN/drift_eval.json``; the raw per-image scores of each member and of the chosen score ->
``RUN/drift_eval_scores.npz`` (plain float arrays, for the report's histograms)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope.data.corruptions import CORRUPTIONS, FAR_DRIFT, corrupt
from defectscope.decision.costs import DRIFT
from defectscope.decision.drift import DriftError
from defectscope.decision.drift.fit import fit_scorer
from defectscope.decision.drift.fusion import Candidate, candidates, select_score
from defectscope.decision.drift.rule import PATCH, PHOTOMETRIC, member_scores
from defectscope.rundir import DRIFT_EVAL, DRIFT_EVAL_RUNS, SPEC, Run

log = logging.getLogger(__name__)

SEP = "__"  # npz keys: normal__<score>, <kind>__<score>, and <kind>__normal__<score> for retrained kinds
KINDS = ("heldout_class", "group", "corruptions", "far")
Scores = dict[str, np.ndarray]
Headline = dict[str, list[dict[str, Scores | None]]]  # per kind, the parts its headline metric averages over
Reported = dict[str, dict[str, dict[str, Scores | None]]]  # per kind, every part to report, by name


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


# ---------------------------------------------------------------- candidates per part and kind

def _candidates(members: Sequence[str], fuse: bool, max_members: int) -> list[Candidate]:
    """Every member alone, and (``fuse``) the max of every 2..max_members of them. No fitted weights: the
    exported graph computes a max of standardised scores, and a max has nothing to overfit."""
    return candidates(list(members), max_members=max_members if fuse else 1, weighted=False)


def _part_metrics(cands: Sequence[Candidate], part: Mapping[str, Scores]) -> dict[str, Any]:
    metrics = {c.name: auroc_fpr95(c.apply(part, "normal"), c.apply(part, "drift")) for c in cands}
    return {"auroc": {k: m[0] for k, m in metrics.items()}, "fpr95": {k: m[1] for k, m in metrics.items()},
            "n_normal": len(next(iter(part["normal"].values()))), "n_drift": len(next(iter(part["drift"].values())))}


def _kind_metrics(cands: Sequence[Candidate], headline: Sequence[Mapping[str, Scores]],
                  parts: Mapping[str, Mapping[str, Scores]]) -> dict[str, Any]:
    """A kind's AUROC and FPR@95 per candidate: the mean over its ``headline`` parts (held-out parts use a
    model each, so their scores are not pooled; a pooled kind has one headline part), with every part's own."""
    per = [_part_metrics(cands, p) for p in headline]
    out: dict[str, Any] = {}
    for metric in ("auroc", "fpr95"):
        out[metric] = {}
        for c in cands:
            vals = [m[metric][c.name] for m in per if m[metric][c.name] is not None]
            out[metric][c.name] = float(np.mean(vals)) if vals else None
    out["n_normal"] = per[0]["n_normal"] if len(per) == 1 else sum(m["n_normal"] for m in per)
    out["n_drift"] = sum(m["n_drift"] for m in per)
    out["parts"] = {name: _part_metrics(cands, p) for name, p in parts.items()}
    return out


class _Scoring:
    """A run with its model loaded once: scores images with the Drift statistics of its training split
    (pooled features, and the feature maps' patch Gaussians when the backbone gives maps)."""

    def __init__(self, run: Run, patch: bool = True):
        import torch

        from defectscope.decision.drift.patch import fit_patch_gaussian
        from defectscope.decision.drift.photometric import fit_photometric

        self.run = run
        self.model = run.model()
        torch.set_num_threads(run.config.train.threads or torch.get_num_threads())
        self.scorer = fit_scorer(run, self.model)
        self.patch = None
        if patch:
            try:
                self.patch = fit_patch_gaussian(run, self.model)
            except DriftError as exc:
                log.warning(f"no patch score for {run.path.name}: {exc}")
        self.photometric = fit_photometric(run)
        self.members = (*self.scorer.available, *([PATCH] if self.patch is not None else []), PHOTOMETRIC)

    def score(self, images: np.ndarray) -> Scores:
        from defectscope.decision.drift.rule import policy_forward

        stages = tuple(self.patch.stages) if self.patch is not None else None
        return member_scores(self.members, self.scorer, self.patch, *policy_forward(self.model, images, stages),
                             photometric=self.photometric, images=images)

    def split(self, split: str) -> Scores | None:
        rows = self.run.rows(split)
        return self.score(self.run.images(rows)[1]) if len(rows) else None


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


def _heldout_experiment(run: Run, train_rows: pd.DataFrame, drift_rows: pd.DataFrame, out: Path, epochs: int,
                        patch: bool) -> dict[str, Scores | None]:
    """The raw scores ``{"val", "normal", "drift"}`` of a model retrained on ``train_rows`` (its val and
    test images are the normal ones) and of ``drift_rows``."""
    classes = [c for c in run.classes if c in set(train_rows["label"])]
    sub = Run(_retrain(run, train_rows, classes, out, epochs))
    scoring = _Scoring(sub, patch)
    return {"val": scoring.split("val"), "normal": scoring.split("test"),
            "drift": scoring.score(sub.images(drift_rows)[1])}


def _pool(sets: Sequence[Scores]) -> Scores:
    names = [s for s in sets[0] if all(s in d for d in sets)]
    return {s: np.concatenate([np.asarray(d[s], dtype=np.float64).reshape(-1) for d in sets]) for s in names}


def save_scores(path: str | Path, normal: dict[str, np.ndarray] | None,
                kinds: dict[str, dict[str, Any]]) -> Path:
    """Write the raw scores as float64 arrays in a compressed npz (no pickled objects).

    ``normal``: score name -> scores of the normal images under the run's own model (None when only
    retrained kinds ran); ``kinds[kind] = {"drift": {score: array}, "normal": {score: array} or absent}``,
    ``normal`` given for kinds scored by a retrained model (their own normal images).
    """
    arrays: dict[str, np.ndarray] = {}
    if normal is not None:
        arrays.update({f"normal{SEP}{s}": np.asarray(v, dtype=np.float64).reshape(-1) for s, v in normal.items()})
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
    patch: bool = True,
    max_members: int = 2,
) -> dict[str, Any]:
    """Evaluate every candidate Drift score on a Drift protocol, choose the policy's, and write
    ``RUN/drift_eval.json`` (or ``out``). Normal images are the run's test split, scored by the run's own model,
    whose Drift statistics are fitted on its training split (nothing is calibrated, so the whole test split is
    used); fused candidates standardise each member on the validation split's images.

    Kinds: ``corruptions`` (each corruption of the test images, pooled and per corruption), ``far``
    (``n_far`` wafer maps and digit images each), ``heldout_class`` (one class at a time: the run's recipe
    retrained without it for ``heldout_epochs`` epochs; Drift = every image of that class; slow),
    ``group`` (retrained on rows whose ``group_column`` equals ``train_value``, e.g. ELPV ``type=mono``;
    Drift = all other rows; slow). ``extra_drift``: a folder of real Drift images, its own kind ``extra``.
    Retrained runs go to ``RUN/drift_eval_runs/`` and are reused when present.

    Candidates: every member score (``patch`` with ``patch=True`` and a backbone that gives feature maps)
    and the max of every 2..``max_members`` of them, z-scored. The chosen score (``best_score``) has the
    highest worst-kind AUROC; ``selection.loko`` holds, for each kind, the score chosen on the other kinds
    alone and its AUROC on the one left out (``loko_worst``: the smallest, the honest number). With one kind
    there is nothing to leave out: the best AUROC on it is chosen. The per-image scores go beside the JSON
    (``RUN/drift_eval_scores.npz``, see :func:`save_scores`; a kind's parts pooled).
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise DriftError(f"unknown drift kinds {sorted(unknown)}; valid: {', '.join(KINDS)}")
    if not kinds and extra_drift is None:
        raise DriftError("nothing to evaluate: give kinds or extra_drift")
    r = run if isinstance(run, Run) else Run(run)
    if r.rows("test").empty:
        raise DriftError(f"{run}: the test split is empty; drift evaluation needs normal test images")
    headline: Headline = {}
    reported: Reported = {}
    normal = val = None
    if {"corruptions", "far"} & set(kinds) or extra_drift is not None:
        normal, val = _own_model_kinds(r, kinds, extra_drift, headline, reported, n_far=n_far, seed=seed, patch=patch)
    _retrained_kinds(r, kinds, headline, reported, heldout_epochs=heldout_epochs, group_column=group_column,
                     train_value=train_value, patch=patch)

    every = [p for parts in headline.values() for p in parts]
    members = [s for s in every[0]["normal"] if all(s in p["normal"] for p in every)]
    # Fusion standardises on held-out normal images: every part needs >= 2 validation images.
    fuse = all(p["val"] is not None and len(next(iter(p["val"].values()))) >= 2 for p in every)
    if not fuse:
        log.warning("no validation images to standardise on: fused scores are not evaluated")
    cands = _candidates(members, fuse, max_members)
    results = {kind: _kind_metrics(cands, headline[kind], reported[kind]) for kind in headline}
    selection = _select(headline, results, cands)
    chosen = next(c for c in cands if c.name == selection["chosen"])
    protocol = _protocol(kinds, fuse, seed=seed, n_far=n_far, heldout_epochs=heldout_epochs, group_column=group_column,
                         train_value=train_value)
    report = _report(r, members, cands, results, selection, chosen, protocol)
    path = Path(out) if out is not None else r.path / DRIFT_EVAL
    path.write_text(json.dumps(report, indent=2) + "\n")
    # Beside the JSON: RUN/drift_eval_scores.npz by default, <out stem>_scores.npz otherwise.
    scores_path = save_scores(path.with_name(f"{path.stem}_scores.npz"), *_raw_scores(headline, normal, val, chosen))
    for kind, res in results.items():
        log.info(f"{kind:>13}: " + ", ".join(f"{s} AUROC {_fmt(res['auroc'][s])} FPR@95 {_fmt(res['fpr95'][s])}"
                                        for s in dict.fromkeys([*members, chosen.name])))
    log.info(f"chosen drift score: {chosen.name} (worst-kind AUROC {_fmt(selection['worst_in_sample'])}, "
             f"leave-one-kind-out {_fmt(selection.get('loko_worst'))}); written: {path}, {scores_path}")
    return report


def _own_model_kinds(r: Run, kinds: Sequence[str], extra_drift: str | Path | None, headline: Headline,
                     reported: Reported, *, n_far: int, seed: int, patch: bool) -> tuple[Scores, Scores | None]:
    """Score the kinds the run's own model judges (corruptions, far, extra) into ``headline`` and ``reported``;
    returns the (test split's, validation split's) normal scores they are all compared with."""
    scoring = _Scoring(r, patch)
    _, normal_images = r.images(r.rows("test"))
    normal, val = scoring.score(normal_images), scoring.split("val")

    def pooled_kind(kind: str, sets: dict[str, Scores]) -> None:
        whole = {"val": val, "normal": normal, "drift": _pool(list(sets.values()))}
        headline[kind] = [whole]
        reported[kind] = {n: {"val": val, "normal": normal, "drift": d} for n, d in sets.items()}

    if "corruptions" in kinds:
        pooled_kind("corruptions", {name: scoring.score(corrupt(normal_images, name, seed=seed))
                                    for name in CORRUPTIONS})
    if "far" in kinds:
        pooled_kind("far", {name: scoring.score(fn(n_far, r.image_size, seed=seed))
                            for name, fn in FAR_DRIFT.items()})
    if extra_drift is not None:
        images = _extra_images(extra_drift, r.image_size, r.spec.get("resize", "squash"))
        pooled_kind("extra", {str(extra_drift): scoring.score(images)})
    return normal, val


def _retrained_kinds(r: Run, kinds: Sequence[str], headline: Headline, reported: Reported, *, heldout_epochs: int,
                     group_column: str | None, train_value: str | None, patch: bool) -> None:
    """Score the kinds that need a model retrained without their Drift (heldout_class, group) into ``headline``
    and ``reported``."""
    work = r.path / DRIFT_EVAL_RUNS
    if "heldout_class" in kinds:
        if len(r.classes) < 3:
            raise DriftError("holding out a class needs at least 3 classes (2 remain to train on)")
        parts = {}
        for c in r.classes:
            log.info(f"held-out class {c!r}: retraining without it")
            parts[c] = _heldout_experiment(r, r.table[r.table["label"] != c], r.table[r.table["label"] == c],
                                           work / f"without_{c}", heldout_epochs, patch)
        headline["heldout_class"], reported["heldout_class"] = list(parts.values()), parts
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
        part = _heldout_experiment(r, inside, outside, work / f"only_{group_column}_{train_value}",
                                   heldout_epochs, patch)
        headline["group"], reported["group"] = [part], {f"{group_column}!={train_value}": part}


def _protocol(kinds: Sequence[str], fuse: bool, *, seed: int, n_far: int, heldout_epochs: int,
              group_column: str | None, train_value: str | None) -> dict[str, Any]:
    """drift_eval.json's ``protocol``: what was measured, how."""
    return {
        "normal": "the run's test split", "positive": DRIFT, "seed": seed, "n_far": n_far,
        "heldout_epochs": heldout_epochs if {"heldout_class", "group"} & set(kinds) else None,
        "group": {"column": group_column, "train_value": train_value} if "group" in kinds else None,
        "standardised_on": "each model's validation split" if fuse else None,
        "selection": "highest worst-kind AUROC; leave-one-kind-out: chosen on the other kinds, measured on "
                     "the one left out",
        "fpr95": "false-flag rate on normal images at the threshold flagging 95% of Drift",
    }


def _report(r: Run, members: list[str], cands: list[Candidate], results: dict[str, Any], selection: dict[str, Any],
            chosen: Candidate, protocol: dict[str, Any]) -> dict[str, Any]:
    """drift_eval.json's content."""
    names = [c.name for c in cands]
    mean_auroc = {n: _mean([k["auroc"][n] for k in results.values()]) for n in names}
    return {
        "run": str(r.path), "model": r.spec.get("architecture", r.config.model.name), "image_size": r.image_size,
        "members": members, "scores": names, "kinds": results, "mean_auroc": mean_auroc,
        "best_score": chosen.name,
        "chosen": {"score": chosen.name, "members": list(chosen.members), "rule": chosen.rule,
                   "per_kind": {k: {"auroc": v["auroc"][chosen.name], "fpr95": v["fpr95"][chosen.name]}
                                for k, v in results.items()}},
        "selection": selection,
        "protocol": protocol,
    }


def _select(headline: dict[str, list], results: dict[str, Any], cands: list[Candidate]) -> dict[str, Any]:
    """select_score over the kinds' headline parts; with one kind, its best AUROC (nothing to leave out)."""
    if len(headline) >= 2:
        sel = select_score(headline, cands, prepare=lambda c, _: c)
        return {k: v for k, v in sel.items() if k != "candidates"} | {
            "worst_kind_auroc": {n: v["worst"] for n, v in sel["candidates"].items()}}
    (kind, res), = results.items()
    best = max(cands, key=lambda c: -np.inf if res["auroc"][c.name] is None else res["auroc"][c.name])
    return {"chosen": best.name, "members": list(best.members), "rule": best.rule, "weights": None,
            "per_kind": {kind: res["auroc"][best.name]}, "worst_in_sample": res["auroc"][best.name],
            "loko": None, "loko_worst": None,
            "note": "one kind only: chosen by its AUROC on it, with no kind left out to check the choice on"}


def _raw_scores(headline: dict[str, list], normal: Scores | None, val: Scores | None, chosen: Candidate
                ) -> tuple[Scores | None, dict[str, dict[str, Any]]]:
    """(normal scores of the run's own model, per kind its pooled drift [and own normal] scores): every member,
    plus the chosen score when it is a fusion (each part standardised on its own validation images)."""
    def with_chosen(part: Mapping[str, Scores | None], which: str) -> Scores:
        out = dict(part[which])
        if chosen.rule != "single":
            out[chosen.name] = chosen.apply(part, which)
        return out

    base = None
    if normal is not None:
        base = with_chosen({"val": val, "normal": normal, "drift": normal}, "normal")
    kinds: dict[str, dict[str, Any]] = {}
    for kind, parts in headline.items():
        own = parts[0]["normal"] is normal and len(parts) == 1
        kinds[kind] = {"drift": _pool([with_chosen(p, "drift") for p in parts]),
                       "normal": None if own else _pool([with_chosen(p, "normal") for p in parts])}
    return base, kinds


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = ["KINDS", "auroc_fpr95", "drift_eval", "load_scores", "save_scores"]
