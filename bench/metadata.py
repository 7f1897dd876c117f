"""Metadata inputs benchmark: the same recipe, split and seed with and without metadata columns beside the image.

  elpv        the real solar cells, the demo's frozen-feature recipe (EfficientNet-Lite0 ImageNet features,
              160 px, 4 quarter-turn views, RBF head), ELPV protocol split (fractions [0.6375, 0.1125, 0.25],
              stratified by class and cell type, seed 0): image only vs image + ``type`` (mono / poly).
  diebridge   synthetic die-bridge-style images (bench/cascade.py's make_bridge, the six Valeo #157 classes in
              their proportions) with a ``lib`` (Die01-Die04) and a ``window`` (2003/2005) column. No real
              die-bridge data is on this machine. The challenge's ``lib`` nearly determines some labels
              (DOMAIN.md; the audit measures Cramér's V); the generator plants that: flat_loop is 90% Die04,
              short_mos 90% Die03, liftoff_white 60% Die01, liftoff_black 60% Die02, GOOD and missing uniform;
              ``window`` is drawn independently of everything (an uninformative input). Same frozen recipe at
              128 px, one view (die structures have a fixed orientation): image only, + lib, + lib + window.
              The gain on this set is by construction; it shows the plumbing works and what an informative
              column is worth, not that real lib values help.

Each variant trains its own run (features are extracted again: the recipe is what a user would run). Reported:
test accuracy, macro-F1, per-class F1, and a paired comparison against image only on the same test images
(images only one of the two gets right, with an exact two-sided binomial (McNemar) p-value).

    python bench/metadata.py                          # both -> bench/results/metadata.json (~20 min, 2 cores)
    python bench/metadata.py --datasets diebridge     # the synthetic set only (a few minutes)
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
from PIL import Image

import defectscope
from defectscope.demo import DEMO_RECIPE
from defectscope.training.train import machine_info

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cascade import VALEO_COUNTS, make_bridge  # noqa: E402 - bench/cascade.py's generator

FRACTIONS = [0.75 * 0.85, 0.75 * 0.15, 0.25]  # ELPV protocol (bench/elpv.py): train, val, test
ELPV_VARIANTS = {"image": [], "image+type": ["type"]}
BRIDGE_VARIANTS = {"image": [], "image+lib": ["lib"], "image+lib+window": ["lib", "window:categorical"]}
BRIDGE_RECIPE = {"model.name": "tf_efficientnet_lite0", "model.pretrained": "auto", "model.image_size": 128,
                 "train.recipe": "frozen", "train.frozen_head": "rbf",
                 "augment.hflip": False, "augment.vflip": False, "augment.rot90": False}
BRIDGE_TOTAL = 1600
LIBS = ("Die01", "Die02", "Die03", "Die04")
LIB_BIAS = {"flat_loop": ("Die04", 0.9), "short_mos": ("Die03", 0.9), "liftoff_white": ("Die01", 0.6),
            "liftoff_black": ("Die02", 0.6)}


def write_bridge_manifest(root: Path, total: int = BRIDGE_TOTAL, seed: int = 0) -> Path:
    """Images in one folder and a die-bridge-style CSV (``,filename,window,lib,Label``, unnamed index)."""
    csv_path = root / "Y_train.csv"
    if csv_path.is_file():
        return csv_path
    images = root / "input_train"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = total / sum(VALEO_COUNTS.values())
    rows = []
    for kind, count in VALEO_COUNTS.items():
        for _ in range(max(24, round(count * scale))):
            favoured, share = LIB_BIAS.get(kind, (None, 0.0))
            lib = favoured if favoured is not None and rng.random() < share else str(rng.choice(LIBS))
            window = int(rng.choice([2003, 2005]))
            name = f"img_{len(rows):05d}.png"
            Image.fromarray(make_bridge(kind, rng)).save(images / name)
            rows.append({"filename": name, "window": window, "lib": lib, "Label": kind})
    pd.DataFrame(rows).to_csv(csv_path)  # the challenge's CSV has pandas' unnamed index column
    return csv_path


def _binomial_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c discordant pairs under p = 1/2."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def run_variant(data: str, recipe: dict, inputs: list[str], out: Path, stratify: list[str]) -> dict:
    overrides = {**recipe, "data.fractions": FRACTIONS, "data.stratify": stratify, "seed": 0,
                 "train.progress": False, "model.metadata_inputs": inputs}
    started = time.perf_counter()
    defectscope.train(data, out, **overrides)
    train_seconds = time.perf_counter() - started
    metrics = defectscope.evaluate(out, report=False)
    spec = json.loads((out / "model.json").read_text())
    return {
        "metadata_inputs": inputs,
        "encoding": spec.get("metadata_inputs"),
        "test_images": metrics["n"],
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "per_class_f1": {c: round(v["f1"], 4) for c, v in metrics["per_class"].items()},
        "frozen_head": {k: spec["frozen_head"].get(k) for k in ("C", "cv_macro_f1", "landmarks")},
        "validation_macro_f1": round(spec["best_score"], 4),
        "train_wall_seconds": round(train_seconds, 1),
        "confusion_matrix": metrics["confusion_matrix"],
        "run_dir": str(out),
    }


def paired(base_dir: Path, other_dir: Path) -> dict:
    """Test images only one of the two runs gets right (same split: same rows, same order)."""
    a = pd.read_csv(base_dir / "evaluation" / "predictions.csv")
    b = pd.read_csv(other_dir / "evaluation" / "predictions.csv")
    assert (a["path"] == b["path"]).all(), "the variants must share the test split"
    ra, rb = a["label"] == a["predicted"], b["label"] == b["predicted"]
    only_b, only_a = int((rb & ~ra).sum()), int((ra & ~rb).sum())
    return {"only_with_metadata_right": only_b, "only_image_right": only_a,
            "mcnemar_exact_p": round(_binomial_p(only_b, only_a), 4)}


def run_dataset(name: str, out_root: Path) -> dict:
    stamp = time.strftime("%Y%m%d_%H%M%S")
    if name == "elpv":
        data, recipe, variants, stratify = "elpv", dict(DEMO_RECIPE), ELPV_VARIANTS, ["type"]
    else:
        manifest = write_bridge_manifest(out_root / "diebridge_meta_data")
        data, variants, stratify = str(manifest), BRIDGE_VARIANTS, ["lib"]
        recipe = {**BRIDGE_RECIPE, "data.image_root": str(manifest.parent / "input_train")}
    results: dict = {"recipe": {**recipe, "data.fractions": FRACTIONS, "data.stratify": stratify, "seed": 0},
                     "variants": {}}
    dirs = {}
    for variant, inputs in variants.items():
        dirs[variant] = out_root / f"metadata_{name}_{variant.replace('+', '_')}_{stamp}"
        r = run_variant(data, recipe, inputs, dirs[variant], stratify)
        if variant != "image":
            r["vs_image_only"] = {"accuracy": round(r["accuracy"] - results["variants"]["image"]["accuracy"], 4),
                                  "macro_f1": round(r["macro_f1"] - results["variants"]["image"]["macro_f1"], 4),
                                  **paired(dirs["image"], dirs[variant])}
        results["variants"][variant] = r
        print(f"[{name} {variant}] accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
              f"train {r['train_wall_seconds'] / 60:.1f} min", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="elpv,diebridge", help="comma-separated: elpv, diebridge")
    parser.add_argument("--out", default=str(HERE / "runs"), help="where the run directories go")
    parser.add_argument("--results", default=str(HERE / "results" / "metadata.json"))
    args = parser.parse_args()

    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"datasets": {}}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if name not in ("elpv", "diebridge"):
            sys.exit(f"unknown dataset {name!r}; valid: elpv, diebridge")
        results["datasets"][name] = run_dataset(name, Path(args.out))
        results["datasets"][name]["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        results.update({
            "benchmark": "metadata inputs: the same frozen-feature recipe, split and seed, with vs without "
                         "metadata columns beside the pooled image features",
            "machine": machine_info(),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        })
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
