"""Decision-policy benchmark on ELPV: escape rate and overkill at a 5% and a 1% escape cap, beside argmax.

Each cap is a guarantee at a confidence level (one-sided Clopper-Pearson bound on the calibration half).

Uses a run made by bench/elpv.py (the default recipe unless --run is given). GOOD = defect probability 0
(`functional`). Calibration uses a stratified half of the test split; results are on the other half.

    python bench/decisions.py [--run bench/runs/default_...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from defectscope.decision.calibrate import calibrate
from defectscope.decision.thresholds import CalibrationError
from defectscope.evaluation.evaluate import evaluate
from defectscope.metrics import classification_metrics
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
GOOD = "functional"


def argmax_rates(pred: pd.DataFrame, classes: list[str]) -> dict:
    good = pred["label"] == GOOD
    passed = pred["predicted"] == GOOD
    index = {c: i for i, c in enumerate(classes)}
    m = classification_metrics(pred["label"].map(index).to_numpy(), pred["predicted"].map(index).to_numpy(), classes)
    return {"escape_rate": float((passed & ~good).sum() / (~good).sum()),
            "overkill_rate": float((~passed & good).sum() / good.sum()),
            "macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4), "n": int(len(pred))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished ELPV run (default: the default recipe in bench/results/elpv.json)")
    parser.add_argument("--results", default=str(HERE / "results" / "decisions.json"))
    args = parser.parse_args()
    source = Path(args.run) if args.run else Path(
        json.loads((HERE / "results" / "elpv.json").read_text())["recipes"]["default"]["run_dir"])
    out: dict = {"source_run": str(source), "good_class": GOOD, "caps": {}}
    # The 1% cap at 95% confidence needs 299 defective calibration images; half of ELPV's test split has
    # about 140, so that row is refused and the same cap is also shown at the confidence the data allows.
    for cap, confidence in ((0.05, 0.95), (0.01, 0.95), (0.01, 0.75)):
        key = f"{cap:g}@{confidence:g}"
        run = source.parent / f"{source.name}_cap{cap:g}_conf{confidence:g}"
        if run.exists():
            shutil.rmtree(run)
        shutil.copytree(source, run, ignore=shutil.ignore_patterns("evaluation*", "policy.json", "drift*"))
        try:
            calibrate(run, good_class=GOOD, max_escape=cap, confidence=confidence, drift_rate=None)
        except CalibrationError as exc:
            out["caps"][key] = {"refused": str(exc)}
            continue
        metrics = evaluate(run, report=False)
        pred = pd.read_csv(run / "evaluation" / "predictions.csv")
        p = metrics["policy"]
        policy = json.loads((run / "policy.json").read_text())
        out["caps"][key] = {
            "cap": cap,
            "confidence": confidence,
            "threshold_p_good": policy["escape_threshold"],
            "guarantee": policy["escape_guarantee"],
            "policy_on_held_out_half": {
                "escape_rate": p["escape"]["rate"], "escape_interval": p["escape"]["interval"],
                "overkill_rate": p["overkill"]["rate"], "overkill_interval": p["overkill"]["interval"],
                "macro_f1": round(p["auto"]["macro_f1"], 4), "accuracy": round(p["auto"]["accuracy"], 4),
                "n": p["n"],
            },
            "argmax_on_same_images": argmax_rates(pred, metrics["classes"]),
        }
    out.update({"machine": machine_info(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    Path(args.results).write_text(json.dumps(out, indent=2, default=lambda o: o.item() if isinstance(
        o, np.generic) else str(o)) + "\n")
    print(json.dumps(out["caps"], indent=2, default=str))


if __name__ == "__main__":
    main()
