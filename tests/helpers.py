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


def train_interrupted_after(epoch: int, data: Path, out: Path, **options) -> None:
    """Start ``train`` and stop it like Ctrl-C right after epoch ``epoch``'s checkpoint is written (the epoch's
    log line follows the checkpoint), leaving ``out`` ready for ``train(out=out, resume=True)``."""
    import logging

    import pytest

    from defectscope import train

    class StopAfterEpoch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(f"epoch {epoch:>3}"):
                raise KeyboardInterrupt

    handler, logger = StopAfterEpoch(), logging.getLogger("defectscope.training")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(data, out, **options)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def fresh_postgres_database(server_url: str) -> str:
    """A new, empty database on the tests' PostgreSQL server (``postgres_url``): no state shared between
    tests, and none with the store's schema (Optuna and the store both keep an ``alembic_version`` table)."""
    import uuid

    import sqlalchemy as sa

    from defectscope.station.store import database_url

    name = "t" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(database_url(server_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server_url.replace("/postgres?", f"/{name}?")
