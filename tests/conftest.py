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


@pytest.fixture(scope="session")
def station_model(trained_run, tmp_path_factory) -> Path:
    """The tiny run with a review band, exported: a model whose policy decides classes and REVIEW."""
    import shutil

    from defectscope.decision.calibrate import calibrate
    from defectscope.onnx_export.exporter import export

    root = tmp_path_factory.mktemp("station_model")
    run = shutil.copytree(trained_run, root / "run")
    calibrate(run, review_rate=0.3, drift_rate=None)
    out = root / "model.onnx"
    export(run, out)
    return out


def _postgres_bin(name: str) -> str | None:
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for this test session: initdb into a tmp folder, unix socket only.

    As root it runs as the ``postgres`` user (the server refuses to run as root). Skipped only when no
    PostgreSQL binaries are installed (``apt-get install postgresql``).
    """
    import shutil
    import socket
    import subprocess

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or under /usr/lib/postgresql)")
    import tempfile

    # Not under pytest's tmp tree: that is private to root, and the server runs as another user.
    root = Path(tempfile.mkdtemp(prefix="defectscope-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        runuser = shutil.which("runuser")
        prefix = [runuser, "-u", user, "--"] if runuser else ["su", user, "-s", "/bin/sh", "-c"]
        shutil.chown(root, user)
        shutil.chown(sock, user)

    def run(args: list[str]) -> None:
        cmd = [*prefix, *args] if prefix[:1] != ["su"] else [*prefix, " ".join(args)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}\n{done.stderr}")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run([initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
    run([pg_ctl, "-D", str(data), "-l", str(root / "log.txt"), "-w", "-t", "60", "start",
         "-o", f"-p {port} -k {sock} -c listen_addresses='' -c fsync=off"])
    try:
        yield f"postgresql://postgres@/postgres?host={sock}&port={port}"
    finally:
        run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)
