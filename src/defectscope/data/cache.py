"""Decode and resize every image once per run, not every epoch: on 2 cores decoding would dominate.

The resized images live in one uint8 array saved under the cache folder, keyed by the files' paths,
sizes and modification times and the resize settings, so a second run on the same data starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from defectscope.data.images import ImageDecodeError, load_gray
from defectscope.data.table import BadFile, DataError

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("DEFECTSCOPE_CACHE", Path.home() / ".cache" / "defectscope"))


def load_images(
    table: pd.DataFrame,
    size: int,
    *,
    resize: str = "squash",
    max_pixels: int = 200_000_000,
    skip_bad: bool = False,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[BadFile]]:
    """Return ``(images, bad)``: images is uint8 ``(N, size, size)`` in table order.

    An image that fails to decode raises :class:`DataError` naming its row, or with ``skip_bad`` is
    reported in ``bad`` and left as zeros (drop those rows with :func:`drop_bad`).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _cache_key(table["path"].tolist(), size, resize, max_pixels)
    array_file, bad_file = cache / f"{key}.npy", cache / f"{key}.bad.json"
    if array_file.is_file() and bad_file.is_file():
        bad = [BadFile(**b) for b in json.loads(bad_file.read_text())]
        if bad and not skip_bad:
            raise DataError(f"{bad[0].source}: {bad[0].path}: {bad[0].reason}")
        return np.load(array_file, mmap_mode=None), bad

    images = np.zeros((len(table), size, size), dtype=np.uint8)
    bad: list[BadFile] = []
    paths, sources = table["path"].tolist(), table["source"].tolist()

    def work(i: int) -> tuple[int, str | None]:
        try:
            images[i] = load_gray(paths[i], size, resize, max_pixels=max_pixels)
            return i, None
        except ImageDecodeError as exc:
            return i, exc.reason

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for i, reason in pool.map(work, range(len(paths))):
            if progress:
                progress(1)
            if reason is None:
                continue
            if not skip_bad:
                pool.shutdown(cancel_futures=True)
                raise DataError(f"{sources[i]}: {paths[i]}: {reason}")
            bad.append(BadFile(path=paths[i], source=sources[i], reason=reason))

    cache.mkdir(parents=True, exist_ok=True)
    # Write to temporary names then rename, so a killed run never leaves a half-written cache entry.
    tmp = array_file.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, images)
    os.replace(tmp, array_file)
    tmp_bad = bad_file.with_suffix(f".tmp{os.getpid()}")
    tmp_bad.write_text(json.dumps([b.__dict__ for b in bad]))
    os.replace(tmp_bad, bad_file)
    return images, bad


def drop_bad(table: pd.DataFrame, images: np.ndarray, bad: list[BadFile]) -> tuple[pd.DataFrame, np.ndarray]:
    if not bad:
        return table, images
    bad_paths = {b.path for b in bad}
    keep = ~table["path"].isin(bad_paths).to_numpy()
    return table[keep].reset_index(drop=True), images[keep]


def _cache_key(paths: list[str], size: int, resize: str, max_pixels: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{resize}|{max_pixels}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\n{p}|{stamp}".encode())
    return h.hexdigest()[:32]
