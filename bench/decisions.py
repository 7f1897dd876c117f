"""Decision-policy benchmark on ELPV: escape rate and overkill at a 5% and a 1% escape cap, beside argmax,
for each score the cap can threshold.

Each cap is a guarantee at a confidence level (one-sided Clopper-Pearson bound on the calibration half).
Escape scores (decision/escape_scores.py): ``p_good`` = calibrated P(functional), what the cap always used;
``severity`` = 1 - expected defect probability over the classes (functional 0, possibly 1/3, likely 2/3,
defective 1); ``auto`` = the one `defectscope calibrate` picks by binary AUROC on the validation split.
The top-level numbers of each cap are ``p_good`` (comparable with earlier results); ``by_escape_score`` has
all three, with which classes escape on the held-out half.

Uses a finished ELPV run (default: the default recipe of bench/results/elpv.json). GOOD = defect probability 0
(`functional`). Calibration uses a stratified half of the test split; results are on the other half. The
model's logits are computed once (the same calibration split, temperature on val and policy functions as
`defectscope calibrate` + `evaluate`), so every cap and score costs milliseconds.

    python bench/decisions.py [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from defectscope.decision.calibrate import calibrate_from_logits, calibration_split, split_info
from defectscope.decision.escape_scores import class_ranks_from_order
from defectscope.decision.outcomes import apply_policy_metrics
from defectscope.decision.policy import decide
from defectscope.decision.thresholds import CalibrationError
from defectscope.metrics import classification_metrics
from defectscope.rundir import Run
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
GOOD = "functional"
ESCAPE_SCORES = ("p_good", "severity", "auto")
ELPV_ORDER = ["functional", "possibly_defective", "likely_defective", "defective"]


def argmax_rates(y: np.ndarray, logits: np.ndarray, classes: list[str]) -> dict:
    g = classes.index(GOOD)
    pred = logits.argmax(1)
    good, passed = y == g, pred == g
    m = classification_metrics(y, pred, classes)
    return {"escape_rate": float((passed & ~good).sum() / (~good).sum()),
            "overkill_rate": float((~passed & good).sum() / good.sum()),
            "macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4), "n": int(len(y))}


def logits_of(run: Run, rows) -> tuple[np.ndarray, np.ndarray]:
    from defectscope.models.inference import predict_logits

    rows, images = run.images(rows)
    return predict_logits(run.model(), images).numpy().astype(np.float64), run.labels(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished ELPV run (default: the default recipe in bench/results/elpv.json)")
    parser.add_argument("--results", default=str(HERE / "results" / "decisions.json"))
    args = parser.parse_args()
    source = Path(args.run) if args.run else Path(
        json.loads((HERE / "results" / "elpv.json").read_text())["recipes"]["default"]["run_dir"])
    run = Run(source)
    classes, table = run.classes, run.table
    g = classes.index(GOOD)
    # Runs made before data.class_order existed: ELPV's order is its defect probability.
    ranks = class_ranks_from_order(classes, run.config.data.class_order or ELPV_ORDER)
    calib, held = calibration_split(table, run.seed)
    started = time.perf_counter()
    val_logits, val_y = logits_of(run, run.rows("val"))
    calib_logits, calib_y = logits_of(run, table[calib])
    held_logits, held_y = logits_of(run, table[held])
    seconds = time.perf_counter() - started
    spec = run.spec
    out: dict = {"source_run": str(source), "recipe": spec.get("recipe"), "frozen_head": spec.get("frozen_head"),
                 "good_class": GOOD, "class_ranks": dict(zip(classes, ranks, strict=True)),
                 "calibration": split_info(table, run.seed), "inference_seconds": round(seconds, 1), "caps": {}}
    # The 1% cap at 95% confidence needs 299 defective calibration images; half of ELPV's test split has
    # about 140, so that row is refused and the same cap is also shown at the confidence the data allows.
    for cap, confidence in ((0.05, 0.95), (0.01, 0.95), (0.01, 0.75)):
        key = f"{cap:g}@{confidence:g}"
        by_score = {}
        for score in ESCAPE_SCORES:
            try:
                policy, _ = calibrate_from_logits(
                    calib_logits, calib_y, classes, good_class=GOOD, max_escape=cap, confidence=confidence,
                    temperature_data=(val_logits, val_y), temperature_on="val", escape_score=score,
                    class_ranks=ranks)
            except CalibrationError as exc:
                by_score = {"refused": str(exc)}
                break
            p = apply_policy_metrics(held_y, held_logits, policy, classes, inputs="logits")
            labels = decide(held_logits, policy, inputs="logits").labels
            escaped = (labels == GOOD) & (held_y != g)
            by_score[score] = {
                "escape_score": policy.escape_score, "threshold": policy.escape_threshold,
                "guarantee": policy.escape_guarantee,
                "policy_on_held_out_half": {
                    "escape_rate": p["escape"]["rate"], "escape_interval": p["escape"]["interval"],
                    "overkill_rate": p["overkill"]["rate"], "overkill_interval": p["overkill"]["interval"],
                    "macro_f1": round(p["auto"]["macro_f1"], 4), "accuracy": round(p["auto"]["accuracy"], 4),
                    "n": p["n"],
                    "escapes_by_class": {c: f"{int((escaped & (held_y == i)).sum())}/{int((held_y == i).sum())}"
                                         for i, c in enumerate(classes) if i != g},
                },
            }
        if "refused" in by_score:
            out["caps"][key] = by_score
            continue
        base = by_score["p_good"]
        out["caps"][key] = {
            "cap": cap, "confidence": confidence, "threshold_p_good": base["threshold"],
            "guarantee": base["guarantee"], "policy_on_held_out_half": base["policy_on_held_out_half"],
            "argmax_on_same_images": argmax_rates(held_y, held_logits, classes),
            "by_escape_score": by_score,
        }
    out.update({"machine": machine_info(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    Path(args.results).write_text(json.dumps(out, indent=2, default=lambda o: o.item() if isinstance(
        o, np.generic) else str(o)) + "\n")
    summary = {k: {s: (v["policy_on_held_out_half"]["overkill_rate"], v["policy_on_held_out_half"]["escape_rate"])
                   for s, v in c.get("by_escape_score", {}).items()} for k, c in out["caps"].items()}
    print("(overkill, escape) on the held-out half:", json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
