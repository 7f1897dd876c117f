"""Tiny synthetic inspection images, built once per session, so train -> evaluate runs in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import CLASSES, FAST, make_image, write_folder_dataset
from PIL import Image


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, folder_dataset) -> Path:
    """One small trained run shared by read-only tests (evaluate, load)."""
    from defectscope import train

    return train(folder_dataset, tmp_path_factory.mktemp("runs") / "run", **FAST)
