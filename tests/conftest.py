"""Tiny synthetic inspection images, built once per session, so train -> evaluate runs in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
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


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the resize cache of test runs out of the user's home."""
    os.environ["DEFECTSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def folder_dataset(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("folder") / "data")


@pytest.fixture(scope="session")
def manifest_dataset(tmp_path_factory) -> Path:
    """The die-bridge layout: images in one folder, a CSV with an unnamed index column and metadata."""
    root = tmp_path_factory.mktemp("manifest")
    images = root / "input_train"
    images.mkdir()
    rng = np.random.default_rng(1)
    lines = [",filename,window,lib,Label"]
    n = 0
    for kind in CLASSES:
        for i in range(18):
            name = f"img_{n:04d}.png"
            Image.fromarray(make_image(kind, rng)).save(images / name)
            lines.append(f"{n},{name},{2003 if i % 2 else 2005},Die0{1 + i % 4},{kind}")
            n += 1
    csv = root / "Y_train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


FAST = {
    "model.name": "seed_cnn2",
    "model.image_size": 32,
    "train.epochs": 4,
    "train.batch_size": 16,
    "train.lr": 2e-3,
    "train.progress": False,
    "train.patience": 0,
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, folder_dataset) -> Path:
    """One small trained run shared by read-only tests (evaluate, load)."""
    from defectscope import train

    return train(folder_dataset, tmp_path_factory.mktemp("runs") / "run", log=lambda *a: None, **FAST)
