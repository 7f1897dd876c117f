"""Synthetic wafer maps for the eight WM-811K failure patterns plus ``none``: for tests and benchmarks only.

These maps are SYNTHETIC. They follow the parametrisation of the published synthetic-map work on WM-811K
(a circular wafer of dies; each pattern drawn from a few parameters - position, radius or width, density of
failing dies inside the pattern - on top of random background failures, the noise): they teach a model
the shapes, not the statistics of a real fab. Results on them say whether a pipeline can learn wafer
patterns, never how it will do on real maps.

Die states follow WM-811K: 0 no die (outside the wafer), 1 pass, 2 fail.

>>> from defectscope.data.wafer_synth import generate_map
>>> import numpy as np
>>> states, params = generate_map("Edge-Ring", np.random.default_rng(0), size=32)
>>> states.shape, sorted(set(states.ravel().tolist()))
((32, 32), [0, 1, 2])
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.data.wafer import FAIL, NO_DIE, PASS

PATTERNS = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Random", "Scratch", "Near-full", "none")


def wafer_geometry(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inside, r, theta)`` for a ``size`` x ``size`` grid: the wafer disc mask, each die's radius as a
    fraction of the wafer radius (0 centre, 1 edge) and its angle."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(float)
    dy, dx = y - c, x - c
    radius = size / 2
    r = np.hypot(dx, dy) / radius
    return r <= 1.0, r, np.arctan2(dy, dx)


def generate_map(
    pattern: str, rng: np.random.Generator, *, size: int = 40, noise: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One die grid (uint8 ``(size, size)``) with ``pattern`` and the parameters drawn for it.

    ``noise`` is the probability that any die fails at random (default: drawn from 0.5%..4%).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; valid: {', '.join(PATTERNS)}")
    inside, r, theta = wafer_geometry(size)
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(float)
    noise = float(rng.uniform(0.005, 0.04)) if noise is None else float(noise)
    params: dict[str, Any] = {"pattern": pattern, "size": size, "noise": round(noise, 4)}
    region = np.zeros((size, size), dtype=bool)
    density = 0.0

    def blob(cr: float, ct: float, rad: float) -> np.ndarray:
        # A disc of radius `rad` (fraction of the wafer radius) centred at polar position (cr, ct).
        bx, by = c + cr * np.cos(ct) * size / 2, c + cr * np.sin(ct) * size / 2
        params.update(center_r=round(cr, 3), center_theta=round(ct, 3), radius=round(rad, 3))
        return np.hypot(x - bx, y - by) <= rad * size / 2

    if pattern == "Center":
        density = rng.uniform(0.6, 0.95)
        region = blob(rng.uniform(0.0, 0.1), rng.uniform(-np.pi, np.pi), rng.uniform(0.15, 0.35))
    elif pattern == "Donut":
        inner, width = rng.uniform(0.3, 0.45), rng.uniform(0.15, 0.3)
        density = rng.uniform(0.6, 0.95)
        region = (r >= inner) & (r <= inner + width)
        params.update(inner=round(inner, 3), width=round(width, 3))
    elif pattern == "Edge-Loc":
        density = rng.uniform(0.6, 0.95)
        region = blob(rng.uniform(0.85, 1.0), rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 0.35)) & (r >= 0.6)
    elif pattern == "Edge-Ring":
        width = rng.uniform(0.08, 0.18)
        density = rng.uniform(0.6, 0.95)
        region = r >= 1.0 - width
        params.update(width=round(width, 3))
    elif pattern == "Loc":
        density = rng.uniform(0.6, 0.95)
        region = blob(rng.uniform(0.25, 0.6), rng.uniform(-np.pi, np.pi), rng.uniform(0.12, 0.22))
    elif pattern == "Random":
        density = rng.uniform(0.15, 0.4)
        region = inside.copy()
    elif pattern == "Scratch":
        # A thin straight line through a random point, at a random angle, of a random length.
        density = rng.uniform(0.8, 1.0)
        px, py = rng.uniform(-0.4, 0.4, size=2) * size / 2 + c
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.6, 1.4) * size / 2
        ux, uy = np.cos(angle), np.sin(angle)
        along = (x - px) * ux + (y - py) * uy
        across = np.abs(-(x - px) * uy + (y - py) * ux)
        region = (np.abs(along) <= length / 2) & (across <= 0.6)
        params.update(angle=round(angle, 3), length=round(length / (size / 2), 3))
    elif pattern == "Near-full":
        density = rng.uniform(0.8, 0.98)
        region = inside.copy()
    params["density"] = round(float(density), 3)

    fail = (region & (rng.random((size, size)) < density)) | (rng.random((size, size)) < noise)
    states = np.where(inside, np.where(fail, FAIL, PASS), NO_DIE).astype(np.uint8)
    return states, params


def generate_dataset(
    out: str | os.PathLike, *, per_class: int | dict[str, int] = 100, seed: int = 0,
    sizes: tuple[int, int] = (26, 48), patterns: tuple[str, ...] = PATTERNS,
) -> Path:
    """Write ``per_class`` maps of each pattern (a number, or a count per pattern name) as
    ``out/maps/<pattern>/<n>.npy`` and ``out/manifest.csv``.

    Grid sizes vary per map in ``sizes`` (inclusive), as WM-811K's do. The manifest holds ``path``,
    ``label`` and every drawn parameter; the same seed writes the same files. Returns the manifest path.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for pattern in patterns:
        folder = out / "maps" / pattern.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class[pattern] if isinstance(per_class, dict) else per_class):
            size = int(rng.integers(sizes[0], sizes[1] + 1))
            states, params = generate_map(pattern, rng, size=size)
            rel = folder.relative_to(out) / f"{n:05d}.npy"
            np.save(out / rel, states)
            rows.append({"path": rel.as_posix(), "label": pattern, **{k: v for k, v in params.items()
                                                                        if k != "pattern"}})
    keys = ["path", "label", "size", "noise", "density", "center_r", "center_theta", "radius", "inner", "width",
            "angle", "length"]
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    (out / "README.txt").write_text(
        f"SYNTHETIC wafer maps written by defectscope.data.wafer_synth (seed {seed}).\n"
        "Die states: 0 no die, 1 pass, 2 fail. Not real fab data: use for tests and benchmarks only.\n")
    return manifest
