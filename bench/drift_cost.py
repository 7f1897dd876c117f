"""What each Drift score costs on the line: batched images/s of the exported graph, per score.

The run is copied, calibrated with each ``--scores`` entry as its Drift score and exported (fp32); every
export is then run by the Predictor's ONNX Runtime engine on the same preloaded ELPV images, batch 32, the
candidates interleaved ``--repeats`` times and the medians kept. The first score is the reference; the
issue's budget is at most 20% fewer images/s than it.

    python bench/drift_cost.py --run RUN                     # -> bench/results/drift_cost.json
    python bench/drift_cost.py --run RUN --scores "mahalanobis,max(knn,photometric)"
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from elpv import save_results  # noqa: E402
from throughput import elpv_files, measure_batched  # noqa: E402  (bench/ is scripts, not a package)

DEFAULT_SCORES = "mahalanobis;max(mahalanobis,photometric);max(knn,photometric);max(knn,patch,photometric)"
BUDGET = 0.20  # at most 20% fewer images/s than the reference score


def main() -> None:
    from defectscope.data.images import load_gray
    from defectscope.decision.calibrate import calibrate
    from defectscope.onnx_export.exporter import export
    from defectscope.rundir import Run
    from defectscope.runtime.predictor import Predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained (and calibrated) run directory; it is not changed")
    parser.add_argument("--scores", default=DEFAULT_SCORES, help=f"';'-separated Drift scores ({DEFAULT_SCORES})")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(HERE / "results" / "drift_cost.json"))
    args = parser.parse_args()
    scores = [s.strip() for s in args.scores.split(";") if s.strip()]
    run = Run(Path(args.run).resolve())
    files = elpv_files(args.images)
    x = np.stack([(load_gray(f, run.image_size, run.spec.get("resize", "squash")).astype(np.float32)
                   / np.float32(255))[None] for f in files])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="drift_cost_") as tmp:
        engines, entries = {}, {}
        for i, score in enumerate(scores):
            copy = Path(tmp) / f"run{i}"
            shutil.copytree(run.path, copy, ignore=shutil.ignore_patterns("export", "evaluation", "drift_eval_runs"))
            policy = calibrate(copy, drift_score=score)["policy"]
            report = export(copy, copy / "m.onnx", int8=False, select=False)
            engines[score] = Predictor(copy / "m.onnx", runtime="onnxruntime", precision="fp32", threads=args.threads)
            entries[score] = {"drift_threshold": policy["drift_threshold"],
                              "onnx_bytes": (copy / "m.onnx").stat().st_size,
                              "parity_drift": report["parity"].get("max_rel_diff_drift_score")}
        rates: dict[str, list[float]] = {s: [] for s in scores}
        for _ in range(args.repeats):
            for score in scores:  # interleaved, so a slow moment of the machine hits every score alike
                rates[score].append(measure_batched(engines[score].engine, x))
    reference = statistics.median(rates[scores[0]])
    for score in scores:
        med = statistics.median(rates[score])
        entries[score] |= {"images_per_second": round(med, 1), "runs": [round(r, 1) for r in rates[score]],
                           "vs_reference": round(med / reference, 3), "within_budget": med >= (1 - BUDGET) * reference}
    result = {
        "benchmark": "exported graph images/s (ONNX Runtime fp32, batch 32, preloaded ELPV images) per Drift score",
        "run": str(run.path), "architecture": run.spec.get("architecture"), "views": run.spec.get("views"),
        "image_size": run.image_size,
        "reference": scores[0], "budget": f"<= {BUDGET:.0%} fewer images/s than the reference", "scores": entries,
        "images": len(files), "repeats": args.repeats, "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_results(result, args.results)
    for score, e in entries.items():
        print(f"{score:40s} {e['images_per_second']:7.1f} images/s  x{e['vs_reference']:.3f}")


if __name__ == "__main__":
    main()
