"""Mahalanobis Drift score with the fixed shrinkage of drift statistics version 1 (1e-3) against Ledoit-Wolf.

On one run (default: the demo's ELPV run): the statistics are fitted on the training split's features, as
``calibrate`` does; normal = the test split, Drift = the far kinds (wafer maps, glyphs) and the 8 corruptions
of the test images. Reports AUROC / FPR@95 per kind, the threshold flagging 1% of the normal images and the
range of normal scores on both scales (raw, and relative to the threshold as predict prints it).
Written to bench/results/drift_shrinkage.json.

    python bench/drift_shrinkage.py [--run /work/runs/demo1/run]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from defectscope.machine import speed_flags

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    import torch

    from defectscope.data.corruptions import CORRUPTIONS, FAR_DRIFT, corrupt
    from defectscope.decision.drift.scorer import fit_mahalanobis, mahalanobis_score
    from defectscope.decision.policy import relative_drift
    from defectscope.evaluation.drift_eval import auroc_fpr95
    from defectscope.models.inference import features_and_logits
    from defectscope.rundir import Run
    from defectscope.training.train import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="/work/runs/demo1/run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-images", type=int, default=400,
                   help="at most this many training, normal and per-Drift-kind images (seeded sample; 0: all)")
    p.add_argument("--out", default=str(HERE / "results" / "drift_shrinkage.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(args.run)
    model = run.model()
    started = time.perf_counter()
    rows, train_images = run.images(_sample(run.rows("train"), args.max_images))
    f_train, _ = features_and_logits(model, train_images, metadata=run.metadata(rows))
    y = run.labels(rows)
    _, test_images = run.images(_sample(run.rows("test"), args.max_images))
    f_test, _ = features_and_logits(model, test_images)
    size = run.spec["image_size"]
    per_kind = min(100, len(test_images))
    drift = {f"far:{n}": fn(per_kind, size, seed=0) for n, fn in FAR_DRIFT.items()}
    drift |= {f"corruption:{n}": corrupt(test_images[:per_kind], n, seed=0) for n in CORRUPTIONS}
    f_drift = {k: features_and_logits(model, v)[0] for k, v in drift.items()}
    seconds = time.perf_counter() - started
    result: dict = {"run": str(args.run), "max_images": args.max_images, "n_train": len(f_train),
                    "n_normal": len(f_test),
                    "feature_dim": int(f_train.shape[1]), "estimates": {}}
    for name, shrinkage in (("fixed_1e-3 (version 1)", 1e-3), ("ledoit-wolf (version 2)", "ledoit-wolf")):
        means, precision, s = fit_mahalanobis(f_train.numpy() if hasattr(f_train, "numpy") else f_train, y,
                                              shrinkage=shrinkage)
        normal = mahalanobis_score(np.asarray(f_test), means, precision)
        threshold = float(np.quantile(normal, 0.99))
        scores = {k: mahalanobis_score(np.asarray(v), means, precision) for k, v in f_drift.items()}
        kinds = {"far": np.concatenate([v for k, v in scores.items() if k.startswith("far:")]),
                 "corruptions": np.concatenate([v for k, v in scores.items() if k.startswith("corruption:")]),
                 **{k.split(":", 1)[1]: v for k, v in scores.items() if k.startswith("corruption:")}}
        rel = relative_drift(normal, threshold)
        result["estimates"][name] = {
            "shrinkage": s, "condition_number": float(np.linalg.cond(precision)),
            "threshold_at_1pct": threshold,
            "normal_raw": [float(normal.min()), float(np.median(normal)), float(normal.max())],
            "normal_relative": [float(rel.min()), float(np.median(rel)), float(rel.max())],
            "auroc": {k: auroc_fpr95(normal, v)[0] for k, v in kinds.items()},
            "fpr95": {k: auroc_fpr95(normal, v)[1] for k, v in kinds.items()},
        }
        print(name, json.dumps({k: result["estimates"][name][k] for k in ("shrinkage", "threshold_at_1pct",
                                                                             "normal_raw", "auroc")}), flush=True)
    result |= {"feature_seconds": round(seconds, 1), "machine": machine_info(),
               "cpu_flags": speed_flags(), "command": shlex.join([sys.executable, *sys.argv]),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _sample(rows, n: int):
    return rows if not n or len(rows) <= n else rows.sample(n=n, random_state=0).sort_index()


if __name__ == "__main__":
    main()
