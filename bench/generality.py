"""Generality: does the default ``train`` beat what a sceptical engineer tries first, on more than one dataset?

On each dataset, one split from seed 0 (the run's own ``dataset.csv``), scored by test macro-F1:

  default     - ``defectscope train --budget B``: the ``auto`` recipe (frozen-feature model first, then a fine-tune
                in the budget left, the fine-tune kept only if it wins on validation resamples)
  frozen      - ``train.recipe: frozen`` alone (EfficientNet-Lite0 ImageNet features, RBF head)
  raw_logreg  - logistic regression on raw pixels downscaled to 32x32, standardised, C by 5-fold CV on train
  raw_svm     - RBF SVM on the same pixels, C by 5-fold CV on train

Datasets (nothing here is downloaded):
  diebridge   - SYNTHETIC die-bridge-style images (bench/cascade.py make_bridge, six classes in the Valeo #157
                proportions), written as the challenge's CSV (``,filename,window,lib,Label``); < 1,000 images
  wafer       - SYNTHETIC wafer maps (the eight WM-811K patterns plus none), .npy die grids
  elpv        - the real ELPV cells (PyPI ``elpv-dataset``), the published 75/25 protocol of bench/elpv.py

    python bench/generality.py                                  # diebridge and wafer, budget 5 minutes
    python bench/generality.py --datasets elpv --budget 15      # the real cells (about 20 minutes)

Results are merged per dataset into bench/results/generality.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import defectscope
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RAW_SIZE = 32
ELPV_FRACTIONS = [0.75 * 0.85, 0.75 * 0.15, 0.25]
FROZEN = {"train.recipe": "frozen", "train.frozen_head": "rbf", "model.name": "tf_efficientnet_lite0",
          "model.pretrained": "auto"}


def write_diebridge_csv(root: Path, total: int) -> Path:
    """The challenge's layout: images in one folder, ``Y.csv`` with an unnamed index and metadata columns."""
    from cascade import write_diebridge

    folders = write_diebridge(root / "by_class", total)
    images = root / "input"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, path in enumerate(sorted(folders.glob("*/*.png"))):
        name = f"img_{i:05d}.png"
        (images / name).write_bytes(path.read_bytes())
        rows.append({"filename": name, "window": i % 4, "lib": f"lib{i % 3}", "Label": path.parent.name})
    pd.DataFrame(rows).to_csv(root / "Y.csv")
    return root / "Y.csv"


def dataset(name: str, work: Path) -> tuple[str, dict]:
    """(data argument for train, extra options) of one benchmark dataset."""
    if name == "diebridge":
        return str(write_diebridge_csv(work / "diebridge", 800)), {"data.image_root": str(work / "diebridge" / "input"),
                                                                    "model.image_size": 128}
    if name == "wafer":
        from defectscope.data.wafer_synth import generate_dataset

        generate_dataset(work / "wafer", per_class=60, seed=0)
        return str(work / "wafer" / "manifest.csv"), {}
    if name == "elpv":
        return "elpv", {"data.fractions": ELPV_FRACTIONS, "data.stratify": ["type"], "model.image_size": 160,
                        "augment.hflip": False, "augment.vflip": False, "augment.rot90": True}
    raise SystemExit(f"unknown dataset {name!r}; use diebridge, wafer or elpv")


def scored(run: Path, seconds: float) -> dict:
    metrics = defectscope.evaluate(run)
    spec = json.loads((run / "model.json").read_text())
    return {"macro_f1": round(metrics["macro_f1"], 4), "accuracy": round(metrics["accuracy"], 4),
            "worst_class": metrics["worst_class"], "test_images": metrics["n"], "train_wall_seconds": round(seconds, 1),
            "recipe_chosen": (spec.get("auto") or {}).get("chosen") or spec.get("recipe"), "auto": spec.get("auto")}


def baselines(run: Path) -> dict:
    """LR and RBF-SVM on raw downscaled pixels, on the run's own split (its dataset.csv)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from defectscope.data.cache import load_images
    from defectscope.metrics import classification_metrics
    from defectscope.rundir import Run

    r = Run(run)
    table = r.table
    images, _ = load_images(table, RAW_SIZE, resize="squash", cache_dir=r.config.data.cache_dir)
    classes = r.classes
    y = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    split = table["split"].to_numpy()
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    tr = np.isin(split, ["train", "val"])  # the baselines choose C by CV, so validation images train them too
    te = split == "test"
    z = StandardScaler().fit(x[tr]).transform(x)
    folds = StratifiedKFold(min(5, int(np.bincount(y[tr]).min())), shuffle=True, random_state=0)
    out = {}
    for name, grid, make in (
        ("raw_logreg", [0.001, 0.01, 0.1, 1.0], lambda c: LogisticRegression(C=c, max_iter=3000)),
        ("raw_svm", [1.0, 3.0, 10.0, 30.0], lambda c: SVC(C=c, gamma="scale")),
    ):
        started = time.perf_counter()
        cv = {c: f1_score(y[tr], cross_val_predict(make(c), z[tr], y[tr], cv=folds), average="macro") for c in grid}
        best = max(grid, key=lambda c: cv[c])
        pred = make(best).fit(z[tr], y[tr]).predict(z[te])
        m = classification_metrics(y[te], pred, classes)
        out[name] = {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4),
                     "worst_class": m["worst_class"], "test_images": m["n"], "C": best,
                     "cv_macro_f1": {f"{c:g}": round(v, 4) for c, v in cv.items()},
                     "train_wall_seconds": round(time.perf_counter() - started, 1)}
    return out


def bench_dataset(name: str, work: Path, budget: float) -> dict:
    data, extra = dataset(name, work)
    common = {"seed": 0, "train.progress": False, **extra}
    results = {}
    for recipe, options in (("frozen", FROZEN), ("default", {"train.recipe": "auto",
                                                             "train.time_limit_minutes": budget})):
        out = work / "runs" / f"{name}_{recipe}"
        started = time.perf_counter()
        defectscope.train(data, out, **{**common, **options})
        results[recipe] = scored(out, time.perf_counter() - started)
        print(f"{name} {recipe}: macro-F1 {results[recipe]['macro_f1']:.4f}", flush=True)
    results.update(baselines(work / "runs" / f"{name}_default"))
    best_classical = max(results["raw_logreg"]["macro_f1"], results["raw_svm"]["macro_f1"])
    classes = defectscope.Run(work / "runs" / f"{name}_default").classes
    return {"images": int(len(defectscope.Run(work / "runs" / f"{name}_default").table)), "classes": classes,
            "results": results,
            "default_ge_best_classical": results["default"]["macro_f1"] >= best_classical,
            "default_ge_frozen": results["default"]["macro_f1"] >= results["frozen"]["macro_f1"],
            "default_minus_best_classical": round(results["default"]["macro_f1"] - best_classical, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="diebridge,wafer", help="comma-separated: diebridge, wafer, elpv")
    ap.add_argument("--budget", type=float, default=5.0, help="minutes for the default recipe (default 5)")
    ap.add_argument("--out", default=str(HERE / "results" / "generality.json"))
    ap.add_argument("--workdir", help="where data and runs go (default: a temp folder)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generality-"))
    path = Path(args.out)
    report = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    for name in args.datasets.split(","):
        started = time.perf_counter()
        row = bench_dataset(name.strip(), work, args.budget)
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        row["budget_minutes"] = args.budget
        row["command"] = "python bench/generality.py " + shlex.join(sys.argv[1:])
        row["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        report["datasets"][name.strip()] = row
        report.update({"benchmark": __doc__.split("\n")[0], "metric": "test macro-F1, one seed-0 split per dataset",
                       "machine": machine_info()})
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {r: v["results"][r]["macro_f1"] for r in v["results"]}
                      for k, v in report["datasets"].items()}, indent=2))


if __name__ == "__main__":
    main()
