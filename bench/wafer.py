"""Wafer-map benchmark on SYNTHETIC maps: the seed's recipe, ours and two classical baselines on one split.

The maps come from defectscope.data.wafer_synth (the 8 WM-811K patterns + none), with class shares shaped
like WM-811K's labelled set (none dominant, Near-full rarest) but scaled to a few thousand maps, so the
whole run takes a few minutes of CPU. Synthetic results show whether a recipe learns wafer patterns; they
are not a WM-811K result.

Recipes (same stratified 60/20/20 split, seed 0; 64 px, die states as 0/128/255, nearest-neighbour):
  seed     - the seed project's recipe: resnet18 from scratch, class-weighted cross-entropy, Adam, no augmentation
  ours     - defectscope's defaults for wafer data (the `wafer` preset: EfficientNet-Lite0 with ImageNet weights
             when installed, quarter turns and flips, class-weighted cross-entropy, AdamW + cosine)
  logreg   - logistic regression on the raw maps downscaled to 32 x 32 (class-balanced)
  svm_rbf  - RBF SVM on the same features (class-balanced)

    python bench/wafer.py                              # -> bench/results/wafer.json
    python bench/wafer.py --scale 0.5 --epochs 4       # quicker
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import defectscope
from defectscope.data.images import load_gray
from defectscope.data.split import assign_splits
from defectscope.data.wafer_synth import generate_dataset
from defectscope.metrics import classification_metrics
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
# WM-811K labelled counts: none 147431, Edge-Ring 9680, Edge-Loc 5189, Center 4294, Loc 3593, Scratch 1193,
# Random 866, Donut 555, Near-full 149. Scaled down with a floor, so every class can be scored.
COUNTS = {"none": 1200, "Edge-Ring": 300, "Edge-Loc": 200, "Center": 200, "Loc": 160, "Scratch": 80,
          "Random": 60, "Donut": 50, "Near-full": 40}

RECIPES = {
    "seed": {
        "model.name": "resnet18", "model.pretrained": "none", "train.loss": "ce", "train.class_weights": True,
        "train.optimizer": "adam", "train.lr": 1e-3, "train.weight_decay": 0.0, "train.schedule": "constant",
        "train.warmup_epochs": 0, "augment.photometric": False, "augment.hflip": False, "augment.vflip": False,
        "augment.rot90": False,
    },
    "ours": {},  # the wafer preset, applied automatically to wafer-map data
}


def make_data(root: Path, scale: float, seed: int) -> Path:
    counts = {k: max(20, round(v * scale)) for k, v in COUNTS.items()}
    manifest = generate_dataset(root / "synthetic", per_class=counts, seed=seed)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table["split"] = ""
    table = assign_splits(table, [0.6, 0.2, 0.2], seed=seed)
    out = manifest.parent / "bench_manifest.csv"
    table.to_csv(out, index=False)
    return out


def scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    m = classification_metrics(y_true, y_pred, classes)
    return {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4),
            "per_class_f1": {c: round(v["f1"], 4) for c, v in m["per_class"].items()}}


def run_recipe(name: str, manifest: Path, out_root: Path, args) -> dict:
    out = out_root / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
    overrides = {**RECIPES[name], "model.image_size": args.image_size, "train.epochs": args.epochs,
                 "train.batch_size": 64, "train.patience": 0, "train.progress": False, "seed": args.seed,
                 "data.split_column": "split", "train.time_limit_minutes": args.time_limit}
    started = time.perf_counter()
    defectscope.train(manifest, out, **overrides)
    seconds = time.perf_counter() - started
    metrics = defectscope.evaluate(out, report=False)
    spec = json.loads((out / "model.json").read_text())
    return {"recipe": overrides, "macro_f1": round(metrics["macro_f1"], 4), "accuracy": round(metrics["accuracy"], 4),
            "per_class_f1": {c: round(v["f1"], 4) for c, v in metrics["per_class"].items()},
            "train_wall_seconds": round(seconds, 1), "epochs_run": spec["epochs_run"],
            "pretrained": spec.get("pretrained"), "architecture": spec["architecture"], "run_dir": str(out)}


def run_baselines(manifest: Path) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    x = np.stack([load_gray(manifest.parent / p, 32) for p in table["path"]]).reshape(len(table), -1) / 255.0
    classes = sorted(table["label"].unique())
    y = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    tr, te = (table["split"] == "train").to_numpy(), (table["split"] == "test").to_numpy()
    out = {}
    for name, model in (("logreg", LogisticRegression(max_iter=3000, C=1.0, class_weight="balanced")),
                        ("svm_rbf", SVC(kernel="rbf", C=10.0, gamma="scale", class_weight="balanced"))):
        started = time.perf_counter()
        model.fit(x[tr], y[tr])
        out[name] = {**scores(y[te], model.predict(x[te]), classes), "features": "raw map, 32x32 nearest, 0/0.5/1",
                     "fit_seconds": round(time.perf_counter() - started, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the per-class counts (2290 maps at 1)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=2.0, help="training minutes per recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "runs" / "wafer"))
    parser.add_argument("--results", default=str(HERE / "results" / "wafer.json"))
    args = parser.parse_args()

    out_root = Path(args.out)
    manifest = make_data(out_root, args.scale, args.seed)
    table = pd.read_csv(manifest, dtype=str)
    results = {
        "benchmark": "SYNTHETIC wafer maps (defectscope.data.wafer_synth), 8 WM-811K patterns + none, "
                     "WM-811K-shaped class imbalance, stratified 60/20/20 split, test split scored",
        "synthetic": True,
        "maps": int(len(table)),
        "test_counts": table[table["split"] == "test"]["label"].value_counts().to_dict(),
        "baselines": run_baselines(manifest),
        "recipes": {},
    }
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        if name not in RECIPES:
            sys.exit(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
        results["recipes"][name] = run_recipe(name, manifest, out_root, args)
    results.update({"machine": machine_info(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "note": "2 shared CPU cores; wall times are noisy"})
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    for name, r in {**results["baselines"], **results["recipes"]}.items():
        print(f"[{name}] macro-F1 {r['macro_f1']:.4f}  accuracy {r['accuracy']:.4f}")


if __name__ == "__main__":
    main()
