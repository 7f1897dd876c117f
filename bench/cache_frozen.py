"""What does caching a phase's frozen early blocks save on ELPV, and what does it cost in accuracy? (issue 10)

The same phased fine-tune of ImageNet EfficientNet-Lite0 at 160 px on the published protocol's split (bench/elpv.py),
run twice: with ``train.cache_frozen`` (the stem and the frozen stages computed once per image and symmetry
view at each phase's start) and without. Phases: the head alone, then the last two groups, then everything:
the first two are cached, the third cannot be. Reported per phase: epoch seconds, the cache's build time, and
the validation / test scores of each run. The cached phases train without photometric augmentation (it cannot
apply to a cached map); the uncached run keeps it, as a user would have it.

    python bench/cache_frozen.py                       # -> bench/results/cache_frozen.json
    python bench/cache_frozen.py --epochs 3,4,2 --views rot90
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from elpv import run_recipe, save_results  # noqa: E402  (bench/ is scripts, not a package)

VIEWS = {"rot90": {"augment.hflip": False, "augment.vflip": False, "augment.rot90": True},
         "dihedral": {"augment.hflip": True, "augment.vflip": True, "augment.rot90": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="3,4,2", help="epochs of the head, last:2 and all phases (3,4,2)")
    parser.add_argument("--views", default="rot90", choices=sorted(VIEWS), help="the symmetries trained with")
    parser.add_argument("--out", default=str(HERE / "runs"), help="where the run directories go")
    parser.add_argument("--results", default=str(HERE / "results" / "cache_frozen.json"))
    parser.add_argument("--note", default="", help="free text kept in the JSON (e.g. what else ran meanwhile)")
    args = parser.parse_args()
    epochs = [int(e) for e in args.epochs.split(",")]
    phases = [{"unfreeze": u, "epochs": e, "lr": lr}
              for u, e, lr in zip(("head", "last:2", "all"), epochs, (3e-3, 1e-3, 3e-4), strict=True)]
    base = {"model.name": "tf_efficientnet_lite0", "model.pretrained": "auto", "model.image_size": 160,
            "train.phases": phases, "train.batch_size": 32, "train.patience": 0, **VIEWS[args.views]}
    results: dict = {"runs": {}}
    for name, cached in (("uncached", False), ("cached", True)):
        r = run_recipe(f"phased_{name}", Path(args.out), 60.0, {**base, "train.cache_frozen": cached})
        history = pd.read_csv(Path(r["run_dir"]) / "history.csv")
        per_phase = {}
        for phase, rows in history.groupby("phase"):
            per_phase[str(phase)] = {
                "unfreeze": rows["unfreeze"].iloc[0], "epochs": int(len(rows)),
                "cached_blocks": int(rows["cached_blocks"].iloc[0]),
                "cache_build_seconds": float(rows["cache_seconds"].sum()),
                "mean_epoch_seconds": round(float(rows["seconds"].mean()), 1),
                "phase_seconds_with_build": round(float(rows["seconds"].sum() + rows["cache_seconds"].sum()), 1),
                "last_val_macro_f1": round(float(rows["val_macro_f1"].iloc[-1]), 4),
            }
        r["phases"] = per_phase
        results["runs"][name] = r
        print(f"[{name}] {json.dumps(per_phase)}  test accuracy {r['accuracy']:.4f}  "
              f"macro-F1 {r['macro_f1']:.4f}", flush=True)
    u, c = results["runs"]["uncached"]["phases"], results["runs"]["cached"]["phases"]
    results["summary"] = {p: {
        "epoch_seconds_ratio_cached_over_uncached": round(c[p]["mean_epoch_seconds"] / u[p]["mean_epoch_seconds"], 3),
        "phase_seconds_ratio_with_build": round(c[p]["phase_seconds_with_build"] / u[p]["phase_seconds_with_build"], 3),
    } for p in u}
    results["summary"]["test"] = {n: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
                                  for n, r in results["runs"].items()}
    results["summary"]["train_wall_seconds"] = {n: r["train_wall_seconds"] for n, r in results["runs"].items()}
    save_results(results, args.results, note=args.note,
                 benchmark="ELPV, phased fine-tune of EfficientNet-Lite0 160 px with and without train.cache_frozen")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
