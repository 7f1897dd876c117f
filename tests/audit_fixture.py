"""A dataset with planted problems for the audit tests: each must be found, nothing else should be."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SIZE = 64


def _image(label: str, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    if label == "ring":
        r = np.hypot(x - 0.5 + rng.normal(0, 0.03), y - 0.5 + rng.normal(0, 0.03))
        base = 60 + 150 * (np.abs(r - rng.uniform(0.25, 0.32)) < 0.06)
    else:
        base = 200 - 140 * x * rng.uniform(0.8, 1.2)
    # Per-image structure (a few random blocks) so no two images share a perceptual hash by chance.
    for _ in range(6):
        cy, cx, h, w = rng.integers(0, SIZE - 12, 2).tolist() + rng.integers(6, 12, 2).tolist()
        base[cy:cy + h, cx:cx + w] += rng.choice([-45, 45])
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def make_audit_fixture(root: Path, n_per_class: int = 24, seed: int = 0) -> dict[str, str]:
    """Write ``root/imgs/*.png`` and ``root/manifest.csv``; returns the planted file names by kind."""
    rng = np.random.default_rng(seed)
    imgs = root / "imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, tool in (("ring", "T1"), ("ramp", "T2")):
        for i in range(n_per_class):
            name = f"{label}_{i:02d}.png"
            Image.fromarray(_image(label, rng)).save(imgs / name)
            split = "test" if i % 4 == 3 else "train"
            # The tool predicts the label in 90% of rows: a metadata shortcut the audit must see.
            rows.append({"filename": f"imgs/{name}", "label": label, "split": split,
                         "tool": tool if i % 10 else ("T2" if tool == "T1" else "T1"),
                         "lot": f"L{rng.integers(0, 4)}"})
    planted = {}
    # Exact duplicate within one split.
    shutil.copy(imgs / "ring_00.png", imgs / "ring_00_copy.png")
    rows.append({**rows[0], "filename": "imgs/ring_00_copy.png"})
    planted["exact"] = "ring_00_copy.png"
    # The same file in train and test: leakage.
    shutil.copy(imgs / "ramp_01.png", imgs / "ramp_01_again.png")
    rows.append({**rows[n_per_class + 1], "filename": "imgs/ramp_01_again.png", "split": "test"})
    planted["leak"] = "ramp_01_again.png"
    # A near duplicate: brighter, re-encoded as JPEG.
    near = np.clip(np.asarray(Image.open(imgs / "ring_02.png"), dtype=np.int16) + 6, 0, 255).astype(np.uint8)
    Image.fromarray(near).save(imgs / "ring_02_bright.jpg", quality=92)
    rows.append({**rows[2], "filename": "imgs/ring_02_bright.jpg"})
    planted["near"] = "ring_02_bright.jpg"
    # A ramp image labelled ring.
    Image.fromarray(_image("ramp", rng)).save(imgs / "odd_one.png")
    rows.append({"filename": "imgs/odd_one.png", "label": "ring", "split": "train", "tool": "T1", "lot": "L0"})
    planted["mislabel"] = "odd_one.png"
    # A truncated file.
    data = (imgs / "ramp_00.png").read_bytes()
    (imgs / "broken.png").write_bytes(data[: len(data) // 2])
    rows.append({"filename": "imgs/broken.png", "label": "ramp", "split": "train", "tool": "T2", "lot": "L1"})
    planted["unreadable"] = "broken.png"
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return planted
