"""Decision-policy benchmark on ELPV: how much the three-way policy (PASS / REJECT / REVIEW) decides without a
person while holding the escape and the overkill cap together, beside the single-threshold policy at the same
escape cap (the simple baseline: pass above one threshold, reject everything else) and plain argmax.

Each setting is ``escape cap / overkill cap @ confidence``: the three-way thresholds are certified on the run's
calibration images (its ``calib`` split, else a stratified half of the test split) by Learn-Then-Test with a
Bonferroni split of the confidence between the two caps (decision/three_way.py); every rate is then measured on
test cells that neither training nor calibration saw, with two-sided Clopper-Pearson intervals. Escape scores
(decision/escape_scores.py): ``p_good`` = calibrated P(functional), ``severity`` = 1 - expected defect
probability, ``auto`` = the one `defectscope calibrate` picks by binary AUROC on the validation split. The binary
AUROC (functional vs the rest) of each score is reported on val and test.

Default run: the demo's recipe and split (src/defectscope/demo.py), trained into bench/runs/ (about 6 minutes on
2 cores) unless ``--run`` names a finished ELPV run. The model's logits are computed once; every policy costs
milliseconds.

``--reject-purity 0.9`` (or ``CLASS=TARGET,...``) adds a row per setting: the ``auto`` three-way policy with that
per-class REJECT purity (decision/reject_purity.py), beside the same policy without it.

    python bench/decisions.py [--run RUN_DIR] [--reject-purity 0.9]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from defectscope.cli.options import per_class_numbers
from defectscope.decision.calibrate import calibrate_from_logits, calibration_split, split_info
from defectscope.decision.escape_scores import binary_auroc, class_ranks_from_order, goodness
from defectscope.decision.outcomes import apply_policy_metrics
from defectscope.decision.policy import softmax
from defectscope.decision.three_way import ThreeWay, verdict_lines
from defectscope.decision.thresholds import CalibrationError, fit_temperature
from defectscope.rundir import Run
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
GOOD = "functional"
ESCAPE_SCORES = ("p_good", "severity", "auto")
ELPV_ORDER = ["functional", "possibly_defective", "likely_defective", "defective"]
SETTINGS = ((0.05, 0.05, 0.95), (0.01, 0.05, 0.95), (0.10, 0.10, 0.95))


def logits_of(run: Run, rows) -> tuple[np.ndarray, np.ndarray]:
    from defectscope.models.inference import predict_logits

    rows, images = run.images(rows)
    return predict_logits(run.model(), images).numpy().astype(np.float64), run.labels(rows)


def demo_run() -> Path:
    from defectscope.demo import DEMO_RECIPE
    from defectscope.training.train import train

    out = HERE / "runs" / f"decisions_{time.strftime('%Y%m%d_%H%M%S')}"
    train("elpv", out, **DEMO_RECIPE)
    return out


def rates(m: dict) -> dict:
    keep = ("automation", "escape", "nuisance_escape", "overkill")
    out = {k: {"rate": m[k]["rate"], "interval": m[k]["interval"], "count": m[k]["count"], "of": m[k]["of"]}
           for k in keep if k in m}
    out["review_rate"] = m["review_rate"]
    if m.get("reject_purity"):
        out["reject_purity"] = m["reject_purity"]
    if m.get("auto"):
        out["class_accuracy_of_automatic_decisions"] = round(m["auto"]["accuracy"], 4)
    return out


def argmax_rates(y: np.ndarray, logits: np.ndarray, g: int) -> dict:
    pred = logits.argmax(1)
    good, passed = y == g, pred == g
    return {"escape_rate": float((passed & ~good).sum() / (~good).sum()),
            "overkill_rate": float((~passed & good).sum() / good.sum()), "automation_rate": 1.0}


def purity_row(calib_logits, calib_y, held_logits, held_y, classes, common: dict, setting: tuple, purity) -> dict:
    """The ``auto`` three-way policy of ``setting`` with a per-class REJECT purity, measured on the held-out cells."""
    max_escape, max_overkill, confidence = setting
    policy, _ = calibrate_from_logits(calib_logits, calib_y, classes, max_escape=max_escape, max_overkill=max_overkill,
                                      confidence=confidence, escape_score="auto", reject_purity=purity, **common)
    m = apply_policy_metrics(held_y, held_logits, policy, classes, inputs="logits")
    tw = policy.three_way
    return {"escape_score": policy.escape_score, "pass_threshold": tw["pass_threshold"],
            "reject_threshold": tw["reject_threshold"], "on_test": rates(m),
            "calibration": {"reject_purity": tw["reject_purity"]["classes"]},
            "verdict": verdict_lines(ThreeWay.from_dict(tw), m)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished ELPV run (default: train the demo's recipe into bench/runs/)")
    parser.add_argument("--results", default=str(HERE / "results" / "decisions.json"))
    parser.add_argument("--reject-purity", help="also a row with this per-class REJECT purity, e.g. 0.9")
    args = parser.parse_args()
    purity = None if args.reject_purity is None else per_class_numbers("--reject-purity", args.reject_purity)
    source = Path(args.run) if args.run else demo_run()
    run = Run(source)
    classes, table = run.classes, run.table
    g = classes.index(GOOD)
    ranks = class_ranks_from_order(classes, run.config.data.class_order or ELPV_ORDER)
    calib, held = calibration_split(table, run.seed)
    started = time.perf_counter()
    val_logits, val_y = logits_of(run, run.rows("val"))
    calib_logits, calib_y = logits_of(run, table[calib])
    held_logits, held_y = logits_of(run, table[held])
    seconds = time.perf_counter() - started
    t = fit_temperature(val_logits, val_y)
    auroc = {split: {s: round(binary_auroc(goodness(softmax(lg, t), s, g, ranks), y == g), 4)
                     for s in ("p_good", "severity")}
             for split, lg, y in (("val", val_logits, val_y), ("calib", calib_logits, calib_y),
                                  ("test", held_logits, held_y))}
    out: dict = {"source_run": str(source), "recipe": run.spec.get("recipe"), "good_class": GOOD,
                 "calibration": split_info(table, run.seed), "inference_seconds": round(seconds, 1),
                 "binary_auroc": auroc, "settings": {}}
    common = dict(good_class=GOOD, temperature_data=(val_logits, val_y), temperature_on="val", class_ranks=ranks)
    for max_escape, max_overkill, confidence in SETTINGS:
        key = f"escape {max_escape:g} / overkill {max_overkill:g} @ {confidence:g}"
        entry: dict = {"argmax": argmax_rates(held_y, held_logits, g)}
        for score in ESCAPE_SCORES:
            policy, _ = calibrate_from_logits(calib_logits, calib_y, classes, max_escape=max_escape,
                                              max_overkill=max_overkill, confidence=confidence,
                                              escape_score=score, **common)
            m = apply_policy_metrics(held_y, held_logits, policy, classes, inputs="logits")
            tw = policy.three_way
            entry[f"three_way_{score}"] = {
                "escape_score": policy.escape_score, "pass_threshold": tw["pass_threshold"],
                "reject_threshold": tw["reject_threshold"], "on_test": rates(m),
                "calibration": {side: tw[side] for side in ("escape", "overkill")},
                "verdict": verdict_lines(ThreeWay.from_dict(tw), m)}
        if purity is not None:
            entry[f"three_way_auto_reject_purity_{args.reject_purity}"] = purity_row(
                calib_logits, calib_y, held_logits, held_y, classes, common, (max_escape, max_overkill, confidence),
                purity)
        try:  # the baseline: today's single threshold at the same escape cap, everything else rejected
            base, _ = calibrate_from_logits(calib_logits, calib_y, classes, max_escape=max_escape,
                                            confidence=confidence, escape_score="auto", **common)
            entry["single_threshold"] = {"escape_score": base.escape_score, "threshold": base.escape_threshold,
                                         "on_test": rates(apply_policy_metrics(held_y, held_logits, base, classes,
                                                                               inputs="logits"))}
        except CalibrationError as exc:
            entry["single_threshold"] = {"refused": str(exc)}
        out["settings"][key] = entry
    out.update({"machine": machine_info(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    Path(args.results).write_text(json.dumps(out, indent=2, default=lambda o: o.item() if isinstance(
        o, np.generic) else str(o)) + "\n")
    print(f"binary AUROC: {auroc}")
    for key, entry in out["settings"].items():
        tw = entry["three_way_auto"]["on_test"]
        single = entry["single_threshold"].get("on_test")
        gated = next((v["on_test"] for k, v in entry.items() if k.startswith("three_way_auto_reject_purity")), None)
        if gated:
            print(f"{key}: with REJECT purity {args.reject_purity}: automation {gated['automation']['rate']:.3f}, "
                  f"purity " + ", ".join(f"{c} {v['rate'] if v['rate'] is None else round(v['rate'], 3)} of {v['of']}"
                                         for c, v in gated["reject_purity"].items()))
        print(f"{key}: three-way automation {tw['automation']['rate']:.3f}, escape {tw['escape']['rate']:.3f}, "
              f"overkill {tw['overkill']['rate']:.3f} | single threshold: "
              + (f"overkill {single['overkill']['rate']:.3f}, escape {single['escape']['rate']:.3f}" if single
                 else entry["single_threshold"]["refused"]))


if __name__ == "__main__":
    main()
