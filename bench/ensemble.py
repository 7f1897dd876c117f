"""Does an ensemble beat its best member on ELPV, and at what inference cost? (issue 10: "ensembles")

Members are trained on the published protocol's split (bench/elpv.py: 75/25 by class and cell type, seed 0,
15% of train for validation), each evaluated on the test split; then `defectscope ensemble` combines them into
one run (one model, one ONNX graph) that is evaluated the same way. Beside them, in the same run: the raw-pixel
RBF SVM baseline and every sub-ensemble of two members, scored from the members' saved test logits (an
ensemble's probabilities are the members' mean, to 1e-5: tests/test_ensemble.py).

Default members: the frozen-feature recipe (ImageNet features, 4 quarter turns averaged, RBF head) on the
three offline EfficientNet-Lite backbones at 224 px: different networks make different errors, which is what
an ensemble needs; fine-tunes of one network with other seeds (``train.init_seed``) are the other kind.

    python bench/ensemble.py                                   # -> bench/results/ensemble.json
    python bench/ensemble.py --members lite0_224,lite1_224     # a subset
    python bench/ensemble.py --reuse runs/lite0,runs/lite1     # members already trained on this split
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from elpv import evaluated, run_baseline, run_recipe, save_results, scores_of  # noqa: E402  (bench/ is scripts, not a package)


def _frozen(arch: str, size: int) -> dict:
    return {"model.name": arch, "model.pretrained": "auto", "model.image_size": size, "train.recipe": "frozen",
            "train.frozen_head": "rbf", "augment.hflip": False, "augment.vflip": False, "augment.rot90": True}


MEMBERS = {
    "lite0_224": _frozen("tf_efficientnet_lite0", 224),
    "lite1_224": _frozen("tf_efficientnet_lite1", 224),
    "lite2_224": _frozen("tf_efficientnet_lite2", 224),
}


def sub_ensembles(runs: dict[str, Path]) -> dict:
    """Every pair of members, from their evaluation's saved test logits (mean of softmax probabilities)."""
    import pandas as pd
    from scipy.special import softmax

    from defectscope.rundir import Run

    first = Run(next(iter(runs.values())))
    pred = pd.read_csv(first.path / "evaluation" / "predictions.csv", dtype=str, keep_default_na=False)
    y = first.labels(pred)
    probs = {name: softmax(np.load(Path(run) / "evaluation" / "logits.npy"), axis=1) for name, run in runs.items()}
    out = {}
    for a, b in itertools.combinations(runs, 2):
        out[f"{a}+{b}"] = scores_of(y, (probs[a] + probs[b]).argmax(1), first.classes)  # argmax of the mean probability
    return out


def main() -> None:
    import defectscope

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default=",".join(MEMBERS), help="comma-separated: " + ", ".join(MEMBERS))
    parser.add_argument("--reuse", help="comma-separated finished member runs on this split (instead of training)")
    parser.add_argument("--time-limit", type=float, default=15.0, help="training minutes per member (15)")
    parser.add_argument("--out", default=str(HERE / "runs"), help="where the run directories go")
    parser.add_argument("--results", default=str(HERE / "results" / "ensemble.json"))
    parser.add_argument("--note", default="", help="free text kept in the JSON (e.g. what else ran meanwhile)")
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict = {"members": {}}
    if args.reuse:
        paths = [Path(p) for p in args.reuse.split(",")]
        for p in paths:
            spec = json.loads((p / "model.json").read_text())
            results["members"][p.name] = {"recipe": spec.get("recipe"), "architecture": spec["architecture"],
                                          **evaluated(p, float(spec.get("train_seconds") or 0))}
        runs = {p.name: p for p in paths}
    else:
        for name in [m.strip() for m in args.members.split(",") if m.strip()]:
            if name not in MEMBERS:
                sys.exit(f"unknown member {name!r}; valid: {', '.join(MEMBERS)}")
            results["members"][name] = run_recipe(name, Path(args.out), args.time_limit, MEMBERS[name])
            print(f"[{name}] accuracy {results['members'][name]['accuracy']:.4f}  "
                  f"macro-F1 {results['members'][name]['macro_f1']:.4f}", flush=True)
        runs = {name: Path(r["run_dir"]) for name, r in results["members"].items()}

    out = Path(args.out) / f"ensemble_{time.strftime('%Y%m%d_%H%M%S')}"
    ens_started = time.perf_counter()
    defectscope.ensemble(list(runs.values()), out)
    combine_seconds = time.perf_counter() - ens_started
    ens = evaluated(out, combine_seconds)
    spec = json.loads((out / "model.json").read_text())
    ens["validation"] = spec["ensemble_val"]
    ens["combine_wall_seconds"] = round(combine_seconds, 1)
    results["ensemble"] = ens
    if len(runs) > 2:
        results["pairs_from_member_logits"] = sub_ensembles(runs)
    results["raw_svm"] = run_baseline("raw_svm")
    best = max(results["members"].values(), key=lambda r: r["macro_f1"])
    results["summary"] = {
        "best_member_macro_f1": best["macro_f1"], "best_member_accuracy": best["accuracy"],
        "ensemble_macro_f1": ens["macro_f1"], "ensemble_accuracy": ens["accuracy"],
        "ensemble_minus_best_member_macro_f1": round(ens["macro_f1"] - best["macro_f1"], 4),
        "raw_svm_macro_f1": results["raw_svm"]["macro_f1"],
        # Inference cost: the ensemble runs every member, so its evaluation time is about their sum.
        "evaluate_seconds": {"ensemble": ens["evaluate_wall_seconds"],
                             **{n: r["evaluate_wall_seconds"] for n, r in results["members"].items()}},
    }
    save_results(results, args.results, note=args.note, wall_seconds=round(time.perf_counter() - started, 1),
                 benchmark="ELPV 4-class on the published protocol's split: ensemble of frozen-feature members vs each")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
