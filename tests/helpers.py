"""Tiny synthetic inspection images and the fast training recipe shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("GOOD", "scratch", "spot")


def make_image(kind: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """Three classes a small CNN separates easily: plain texture, a bright line, a bright blob."""
    img = rng.normal(90, 12, (size, size))
    if kind == "scratch":
        row = rng.integers(6, size - 6)
        img[row:row + 3, 4:-4] = 230
    elif kind == "spot":
        cy, cx = rng.integers(10, size - 10, 2)
        yy, xx = np.mgrid[:size, :size]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 230
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder_dataset(root: Path, per_class: int = 24, seed: int = 0, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(make_image(kind, rng, size)).save(root / kind / f"{kind}_{i:03d}.png")
    return root


FAST = {
    "model.name": "seed_cnn2",
    "model.image_size": 32,
    "train.epochs": 4,
    "train.batch_size": 16,
    "train.lr": 2e-3,
    "train.progress": False,
    "train.patience": 0,
}
