"""Two-stage cascade benchmark: a small screen passes the parts it is sure are good, the full classifier
decides the rest, one escape cap for the whole. Against the single large model calibrated to the same cap:
end-to-end accuracy, escape and overkill on held-out images, and inference images/s (the seed project's
claim is compute saved at the edge). Two datasets:

  elpv        the real solar cells. Classifier: the demo recipe (EfficientNet-Lite0, 160 px); screen: seed_cnn2
              at 64 px, same split (good = functional).
  diebridge   synthetic die-bridge-style images (six classes in the Valeo #157 proportions, see make_bridge);
              no real die-bridge data on this machine. Classifier: EfficientNet-Lite0 at 128 px; screen:
              seed_cnn1 at 48 px.

Calibration uses the classifier run's calibration images (a stratified half of the test split); every
number is on the other half. images/s: the ONNX graphs alone on decoded inputs (decoding excluded), in
interleaved rounds single / cascade (two files) / cascade (one graph), median of the rounds.

    python bench/cascade.py --datasets diebridge                      # trains both stages (small)
    python bench/cascade.py --datasets elpv --screen-run S --classifier-run C   # reuse trained runs
    python bench/cascade.py --datasets elpv                           # trains both (~30 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import defectscope
from defectscope.decision.calibrate import calibrate_from_logits, calibration_split
from defectscope.decision.cascade import cascade, cascade_decide
from defectscope.decision.policy import Policy, decide, softmax
from defectscope.decision.thresholds import CalibrationError, escape_threshold
from defectscope.demo import DEMO_RECIPE
from defectscope.models.inference import features_and_logits
from defectscope.models.screen import ScreenScore, screen_scores
from defectscope.onnx_export.cascade_graph import GRAPH, MANIFEST, export_cascade
from defectscope.onnx_export.exporter import export
from defectscope.rundir import Run
from defectscope.runtime.card import INPUT
from defectscope.runtime.cascade_runner import CascadeRunner
from defectscope.runtime.engines import ort_session as _session
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
ELPV_FRACTIONS = [0.75 * 0.85, 0.75 * 0.15, 0.25]

DATASETS = {
    "elpv": {
        "data": "elpv", "good": "functional",
        "classifier": {**DEMO_RECIPE, "data.fractions": ELPV_FRACTIONS, "data.stratify": ["type"], "seed": 0},
        "screen": {"model.name": "seed_cnn2", "model.pretrained": "none", "model.image_size": 64,
                   "train.epochs": 20, "train.batch_size": 32, "train.lr": 2e-3, "train.patience": 6,
                   "train.time_limit_minutes": 8, "data.fractions": ELPV_FRACTIONS, "data.stratify": ["type"],
                   "seed": 0},
    },
    "diebridge": {
        "data": None, "good": "GOOD",
        "classifier": {"model.name": "tf_efficientnet_lite0", "model.pretrained": "auto", "model.image_size": 128,
                       "train.epochs": 4, "train.batch_size": 32, "train.lr": 1e-3, "train.patience": 0,
                       "train.time_limit_minutes": 10, "data.fractions": [0.5, 0.1, 0.4], "seed": 0},
        "screen": {"model.name": "seed_cnn1", "model.pretrained": "none", "model.image_size": 48,
                   "train.epochs": 8, "train.batch_size": 32, "train.lr": 2e-3, "train.patience": 0,
                   "train.time_limit_minutes": 5, "data.fractions": [0.5, 0.1, 0.4], "seed": 0},
    },
}

# Valeo ChallengeData #157 training counts (DOMAIN.md); the synthetic set keeps the proportions.
VALEO_COUNTS = {"GOOD": 1235, "flat_loop": 71, "liftoff_white": 270, "liftoff_black": 104, "missing": 6472,
                "short_mos": 126}


def make_bridge(kind: str, rng: np.random.Generator, size: int = 160) -> np.ndarray:
    """A bond bridge seen from above: two pads joined by a wire; each defect changes the wire.

    Deliberately a little harder than tests/helpers.make_image: noise, jittered geometry and contrast, so
    that a small screen and a large classifier do not both reach 100%.
    """
    img = rng.normal(70, 14, (size, size))
    yy, xx = np.mgrid[:size, :size]
    pad = int(size * 0.18)
    y0 = int(size / 2 + rng.integers(-size // 10, size // 10))
    img[y0 - pad // 2:y0 + pad // 2, 4:4 + pad] += 90  # left pad
    img[y0 - pad // 2:y0 + pad // 2, -4 - pad:-4] += 90  # right pad
    width = max(2, int(size * rng.uniform(0.025, 0.04)))
    wire = (np.abs(yy - y0 - 3 * np.sin(xx / size * np.pi * rng.uniform(0.5, 1.5))) < width) & \
           (xx > 4 + pad) & (xx < size - 4 - pad)
    level = rng.uniform(60, 110)
    if kind == "missing":
        pass
    elif kind == "flat_loop":
        span = (xx > 4 + pad) & (xx < size - 4 - pad)
        img[(np.abs(yy - y0) < width * 2.2) & span] += level * 0.8  # a wide, flat wire
    else:
        img[wire] += level
        if kind == "liftoff_white":
            cx = size - 4 - pad - int(size * 0.08)
            img[(yy - y0) ** 2 + (xx - cx) ** 2 < (size * 0.06) ** 2] += 70
        elif kind == "liftoff_black":
            gap = int(rng.uniform(0.3, 0.6) * size)
            img[wire & (np.abs(xx - gap) < size * 0.05)] -= level + 30
        elif kind == "short_mos":
            y1 = y0 + int(rng.choice([-1, 1]) * size * rng.uniform(0.15, 0.3))
            img[(np.abs(yy - y1) < max(1, width // 2)) & (xx > size * 0.3) & (xx < size * 0.7)] += level * 0.7
    return np.clip(img, 0, 255).astype(np.uint8)


def write_diebridge(root: Path, total: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    scale = total / sum(VALEO_COUNTS.values())
    for kind, count in VALEO_COUNTS.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(max(12, round(count * scale))):
            Image.fromarray(make_bridge(kind, rng)).save(root / kind / f"{kind}_{i:04d}.png")
    return root


def rates(labels: np.ndarray, truth: np.ndarray, good: str) -> dict:
    defective, passed = truth != good, labels == good
    return {"accuracy": round(float((labels == truth).mean()), 4),
            "binary_accuracy": round(float((passed == ~defective).mean()), 4),
            "escape": round(float((passed & defective).sum() / defective.sum()), 4),
            "overkill": round(float((~passed & ~defective).sum() / (~defective).sum()), 4),
            "n": int(len(truth)), "n_defective": int(defective.sum())}


def throughput(sessions: dict, x: np.ndarray, rounds: int, batch: int = 32) -> dict:
    """Images/s of each callable on the same inputs, interleaved A, B, C, A, B, C... (the machine is shared)."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    sent: dict[str, int] = {}
    for _ in range(rounds):
        for name, fn in sessions.items():
            start = time.perf_counter()
            n_sent = 0
            for i in range(0, len(x), batch):
                n_sent += fn(x[i:i + batch])
            times[name].append(time.perf_counter() - start)
            sent[name] = n_sent
    out = {k: {"images_per_s": round(len(x) / statistics.median(v), 1), "rounds_s": [round(t, 3) for t in v],
               "classifier_images": sent[k]} for k, v in times.items()}
    base = out["single"]["images_per_s"]
    for v in out.values():
        v["speedup_vs_single"] = round(v["images_per_s"] / base, 3)
    return out


def bench_dataset(name: str, args, work: Path) -> dict:
    cfg = DATASETS[name]
    data = cfg["data"]
    if data is None:
        data = write_diebridge(work / "diebridge_data", args.diebridge_images)
    threads = {"train.threads": args.threads} if args.threads else {}
    clf_dir = Path(args.classifier_run) if args.classifier_run else work / f"{name}_classifier"
    screen_dir = Path(args.screen_run) if args.screen_run else work / f"{name}_screen"
    timing = {}
    for role, path in (("classifier", clf_dir), ("screen", screen_dir)):
        if not (path / "model.safetensors").is_file():
            start = time.perf_counter()
            defectscope.train(data, path, **cfg[role], **threads, **{"train.progress": False})
            timing[f"train_{role}_s"] = round(time.perf_counter() - start, 1)
    clf, screen = Run(clf_dir), Run(screen_dir)
    good = cfg["good"]
    classes = clf.classes
    g = classes.index(good)

    calib_mask, eval_mask = calibration_split(clf.table, clf.seed)
    rows_c, img_c = clf.images(clf.table[calib_mask])
    rows_e, img_e = clf.images(clf.table[eval_mask])
    y_c, y_e = clf.labels(rows_c), clf.labels(rows_e)
    truth_e = np.array(classes, dtype=object)[y_e]
    model = clf.model()
    _, logits_c = features_and_logits(model, img_c)
    _, logits_e = features_and_logits(model, img_e)
    module = ScreenScore(screen.model(), screen.image_size, screen.classes.index(good))
    p_screen_e = screen_scores(module, img_e)

    result = {"classifier_run": str(clf_dir), "screen_run": str(screen_dir),
              "classifier": clf.spec.get("architecture"), "classifier_px": clf.image_size,
              "screen": screen.spec.get("architecture"), "screen_px": screen.image_size,
              "n_calibration": int(len(y_c)), "n_calibration_defective": int((y_c != g).sum()), **timing,
              "argmax_single": rates(np.array(classes, dtype=object)[logits_e.argmax(1)], truth_e, good), "caps": {}}
    for cap, confidence in args.caps:
        key = f"{cap:g}@{confidence:g}"
        entry: dict = {}
        try:
            single, _ = calibrate_from_logits(logits_c, y_c, classes, good_class=good, max_escape=cap,
                                              confidence=confidence)
            entry["single"] = {**rates(decide(logits_e, single, inputs="logits").labels, truth_e, good),
                               "threshold": single.escape_threshold}
        except CalibrationError as exc:
            entry["single"] = {"refused": str(exc)}
        for method in ("split", "fixed"):
            try:
                extra = {}
                if method == "fixed":
                    # Fixed beforehand = on images the cascade does not calibrate on: the classifier's own
                    # threshold at half the cap, from the VALIDATION split (independent of the calibration half).
                    # P(good) at the temperature cascade() applies (the classifier policy's, else 1).
                    rows_v, img_v = clf.images(clf.rows("val"))
                    _, logits_v = features_and_logits(model, img_v)
                    temperature = Policy.from_dict(clf.policy).temperature if clf.policy else 1.0
                    p_val = softmax(logits_v, temperature)[:, g]
                    extra["classifier_threshold"] = escape_threshold(
                        p_val, clf.labels(rows_v) != g, max_escape=cap / 2, confidence=0.5).threshold
                # The good class by name: ELPV's "functional" is not one cascade() recognises by default.
                cp = cascade(screen, clf, out=work / f"{name}_cascade_{key}_{method}.json", max_escape=cap,
                             confidence=confidence, method=method, good_class=good, screen_good_class=good,
                             **extra)
            except CalibrationError as exc:
                entry[f"cascade_{method}"] = {"refused": str(exc)}
                continue
            labels = cascade_decide(p_screen_e, logits_e, cp, inputs="logits")
            passed = p_screen_e >= cp["screen"]["threshold"]
            entry[f"cascade_{method}"] = {
                **rates(labels, truth_e, good), "screen_threshold": cp["screen"]["threshold"],
                "classifier_threshold": cp["guarantee"]["classifier_threshold"],
                "escape_ucb_calibration": cp["guarantee"]["escape_ucb"],
                "screen_decides_alone": round(float(passed.mean()), 4),
                "screen_decides_alone_good": round(float(passed[truth_e == good].mean()), 4),
            }
            entry[f"cascade_{method}"]["policy_file"] = cp["path"]
        result["caps"][key] = entry

    # Throughput at the first cap whose split cascade was calibrated.
    usable = [k for k, v in result["caps"].items() if "refused" not in v.get("cascade_split", {"refused": 1})]
    if usable:
        key = usable[0]
        exp = work / f"{name}_export"
        export(clf, exp / "single.onnx")
        policy_file = result["caps"][key]["cascade_split"]["policy_file"]
        export_cascade(policy_file, exp / "files", form="files")
        export_cascade(policy_file, exp / GRAPH, form="graph")
        single = _session(exp / "single.onnx")
        runner = CascadeRunner(exp / "files" / MANIFEST, _session)
        graph = _session(exp / GRAPH)
        x = (img_e.astype(np.float32) / 255)[:, None]

        def run_single(b):
            single.run(None, {INPUT: b})
            return len(b)

        def run_files(b):
            runner.run(b)
            return runner.last_sent

        def run_graph(b):
            graph.run(None, {INPUT: b})
            return len(b)

        result["throughput"] = {"cap": key, "images": int(len(x)), "batch": 32,
                                **throughput({"single": run_single, "cascade_two_files": run_files,
                                              "cascade_one_graph": run_graph}, x, args.rounds)}
    return result


def stage_cost(rounds: int, threads: int = 2) -> dict:
    """Inference cost of each stage at the recipes' sizes, untrained weights (cost does not depend on them):
    what the two-file cascade saves as a function of the share p the screen passes, 1 / (screen + (1 - p))."""
    import warnings

    import onnxruntime as ort
    import torch

    from defectscope.models.factory import create_model

    def session(module, path: Path, size: int):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (torch.rand(2, 1, size, size),), str(path), input_names=[INPUT],
                              output_names=["out"], dynamic_axes={INPUT: {0: "b"}, "out": {0: "b"}},
                              opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = threads, 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in DATASETS.items():
            c, s = cfg["classifier"], cfg["screen"]
            big, small = c["model.image_size"], s["model.image_size"]
            clf = session(create_model(c["model.name"], 4, image_size=big), Path(tmp) / "c.onnx", big)
            scr = session(ScreenScore(create_model(s["model.name"], 4, image_size=small), small, 0),
                          Path(tmp) / "s.onnx", big)
            x = np.random.default_rng(0).random((64, 1, big, big), dtype=np.float32)
            times = throughput({"single": lambda b, m=clf: (m.run(None, {INPUT: b}), len(b))[1],
                                "screen": lambda b, m=scr: (m.run(None, {INPUT: b}), len(b))[1]}, x, rounds)
            share = times["single"]["images_per_s"] / times["screen"]["images_per_s"]
            out[name] = {"classifier": f"{c['model.name']}@{big}px", "screen": f"{small}px {s['model.name']}",
                         "classifier_images_per_s": times["single"]["images_per_s"],
                         "screen_images_per_s": times["screen"]["images_per_s"],
                         "screen_cost_relative_to_classifier": round(share, 4),
                         "cascade_speedup_if_screen_passes": {f"{p:.0%}": round(1 / (share + 1 - p), 2)
                                                              for p in (0.0, 0.15, 0.3, 0.5, 0.58)}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="diebridge,elpv")
    parser.add_argument("--screen-run", help="reuse a trained screen run (one dataset only)")
    parser.add_argument("--classifier-run", help="reuse a trained classifier run (one dataset only)")
    parser.add_argument("--caps", default="0.1@0.95,0.05@0.9", help="cap@confidence, comma-separated")
    parser.add_argument("--diebridge-images", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="training threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="short trainings (classifier: 2 epochs at 96 px, <= 4 min; screen <= 2 min)")
    parser.add_argument("--stage-cost-only", action="store_true",
                        help="only the inference cost of each stage (no training): what a screen pass share saves")
    parser.add_argument("--work", default=str(HERE / "runs" / "cascade"))
    parser.add_argument("--results", default=str(HERE / "results" / "cascade.json"))
    args = parser.parse_args()
    args.caps = [tuple(float(v) for v in item.split("@")) for item in args.caps.split(",")]
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if (args.screen_run or args.classifier_run) and len(names) != 1:
        parser.error("--screen-run/--classifier-run need exactly one dataset")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)
    out = json.loads(results_path.read_text()) if results_path.is_file() else {}
    out.setdefault("datasets", {})
    out["stage_cost"] = stage_cost(args.rounds)
    out["command_stage_cost"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["stage_cost"], indent=2))
    if args.stage_cost_only:
        return
    if args.quick:
        for cfg in DATASETS.values():
            cfg["classifier"].update({"model.image_size": 96, "train.epochs": 2, "train.time_limit_minutes": 4})
            cfg["screen"].update({"train.epochs": 6, "train.time_limit_minutes": 2})
    for name in names:
        out["datasets"][name] = {**bench_dataset(name, args, work), "quick": bool(args.quick)}
        out["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        out["machine"] = machine_info()
        out["note"] = ("images/s are ONNX Runtime on decoded inputs, medians of interleaved rounds on a shared "
                       "2-core machine (noisy); escape/overkill/accuracy on the half of the test split not used "
                       "for calibration")
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out["datasets"][name], indent=2))


if __name__ == "__main__":
    main()
