"""Drift benchmark on ELPV with a from-scratch model: AUROC and FPR@95 per score and per Drift kind.

Kinds: corrupted normal images and far-drift images (no retraining), the other cell type held out
(train on mono, Drift = poly; retrains) and each class held out in turn (retrains).

    python bench/drift.py [--run bench/runs/scratch_...] [--kinds corruptions,far,group,heldout_class]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from defectscope.evaluation.drift_eval import drift_eval
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished ELPV run (default: the scratch recipe in bench/results/elpv.json)")
    parser.add_argument("--kinds", default="corruptions,far,group,heldout_class")
    parser.add_argument("--heldout-epochs", type=int, default=3)
    parser.add_argument("--results", default=str(HERE / "results" / "drift.json"))
    args = parser.parse_args()
    run = Path(args.run) if args.run else Path(
        json.loads((HERE / "results" / "elpv.json").read_text())["recipes"]["scratch"]["run_dir"])
    started = time.perf_counter()
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    result = drift_eval(run, kinds=kinds, group_column="type", train_value="mono",
                        heldout_epochs=args.heldout_epochs, out=run / "drift_eval.json")
    summary = {
        "run": str(run),
        "kinds": {k: {"auroc": v["auroc"], "fpr95": v["fpr95"], "n_normal": v.get("n_normal"),
                      "n_drift": v.get("n_drift"), "parts": v.get("parts")} for k, v in result["kinds"].items()},
        "mean_auroc": result["mean_auroc"], "best_score": result["best_score"],
        "targets": {"far and corruptions AUROC": ">= 0.99", "held-out cell type AUROC": ">= 0.95",
                    "held-out class": "as high as the data allows, above MSP"},
        "openood_reference_cifar10_resnet18_auroc": {"msp": [88.0, 90.7], "knn": [90.6, 93.0], "vim": [88.7, 93.5]},
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    Path(args.results).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    for kind, v in summary["kinds"].items():
        print(kind, {s: round(a, 4) for s, a in v["auroc"].items()})


if __name__ == "__main__":
    main()
