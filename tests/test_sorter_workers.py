"""Several sorters on one inbox (tests/test_sorter.py covers one): claims, takeover after kill -9, one store on
SQLite and on a real PostgreSQL; refused hard links; copy mode alone per output folder."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import CLASSES, fresh_postgres_database, make_image
from PIL import Image

from defectscope.errors import DefectscopeError
from defectscope.runtime.predictor import Predictor
from defectscope.station.claims import ALIVE, CLAIMS_DIR
from defectscope.station.sorter import sort
from defectscope.station.store import Store

QUIET = {"settle_seconds": 0, "progress": False}
CHILD = Path(__file__).with_name("sorter_child.py")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_inbox(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = root / f"lot{i % 4}" / f"img_{i:04d}.png"  # a few folders, as tools deliver them
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_image(CLASSES[i % 3], rng, size=24)).save(p)
        paths.append(p)
    return paths


def filed(out: Path) -> list[str]:
    return [sha(p) for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")
            for p in d.rglob("*") if p.is_file()]


def left(inbox: Path) -> list[Path]:
    return [p for p in inbox.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != ALIVE]


def check_each_once(out: Path, inbox: Path, log: str | Path, expected: list[str]) -> None:
    assert left(inbox) == [], "a file was neither filed nor given back"
    assert sorted(filed(out)) == sorted(expected)  # every input exactly once
    with Store(log) as store:
        rows = store.rows()
    assert len(rows) == len(expected) and {r["status"] for r in rows} == {"done"}
    assert sorted(r["content_sha256"] for r in rows) == sorted(expected)
    for r in rows:
        assert sha(Path(r["destination"])) == r["content_sha256"]
        assert f"{os.sep}{CLAIMS_DIR}{os.sep}" not in r["source_path"]  # the inbox path, not the claim's


def test_two_sorters_in_threads_share_one_inbox(station_model, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    expected = [sha(p) for p in make_inbox(inbox, 60)]
    results: list[dict] = []

    def run() -> None:
        results.append(sort(Predictor(station_model, threads=1, decode_threads=1), inbox, out, batch_size=4,
                            **QUIET))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and all(r["errors"] == [] for r in results)
    assert sum(r["processed"] for r in results) == 60
    check_each_once(out, inbox, out / "results.db", expected)
    assert not (inbox / CLAIMS_DIR).exists()  # both stopped cleanly: nothing left claimed


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_sorters_killed_again_and_again_file_each_image_once(station_model, tmp_path, request, backend):
    """Two sorters at once; one of them killed with SIGKILL at random moments (up to six times, while work is
    left); then both run to the end. A dead worker's claims are taken over by the next one: nothing lost,
    nothing twice, one row each."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    expected = [sha(p) for p in make_inbox(inbox, 240)]
    log = (fresh_postgres_database(request.getfixturevalue("postgres_url")) if backend == "postgresql"
           else out / "results.db")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(CHILD), str(station_model), str(inbox), str(out), "0.01", "--log", str(log)]
    rng = random.Random(24)
    started = time.monotonic()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        return proc

    procs = [start(), start()]
    kills = 0
    try:
        while kills < 6 and left(inbox) and time.monotonic() - started < 60:
            time.sleep(rng.uniform(0.2, 0.8))
            i = rng.randrange(2)
            if procs[i].poll() is None:
                procs[i].send_signal(signal.SIGKILL)
                kills += 1
            procs[i].wait(timeout=30)
            procs[i].stdout.close()
            procs[i].stderr.close()
            procs[i] = start()
    finally:
        for p in procs:
            out_text, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
    assert kills >= 3, "the sorters finished before the kills: the test proves little"
    assert len(filed(out)) > 0
    check_each_once(out, inbox, log, expected)


def test_a_hard_link_into_the_inbox_is_refused(station_model, tmp_path, caplog):
    inbox, out, outside = tmp_path / "inbox", tmp_path / "out", tmp_path / "private"
    make_inbox(inbox, 2)
    outside.mkdir()
    secret = outside / "secret.png"
    Image.fromarray(make_image("spot", np.random.default_rng(3), size=24)).save(secret)
    os.link(secret, inbox / "looks_innocent.png")
    caplog.set_level("INFO", logger="defectscope")
    summary = sort(Predictor(station_model, threads=1), inbox, out, **QUIET)
    assert summary["processed"] == 2 and summary["skipped"]["hard_link"] == 1
    assert (inbox / "looks_innocent.png").exists() and secret.stat().st_nlink == 2  # left alone, not filed
    assert "has 2 hard links" in caplog.text and "not filed" in caplog.text
    with Store(out / "results.db") as store:
        assert "looks_innocent.png" not in {r["file_name"] for r in store.rows()}


def test_copy_mode_beside_another_sorter_is_a_one_line_error(station_model, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_inbox(inbox, 1)
    stop = threading.Event()
    t = threading.Thread(target=sort, args=(Predictor(station_model, threads=1), inbox, out),
                         kwargs={"watch": True, "poll_interval": 0.05, "stop_event": stop, **QUIET})
    t.start()
    try:
        time.sleep(1.0)
        with pytest.raises(DefectscopeError) as err:
            sort(Predictor(station_model, threads=1), inbox, out, mode="copy", **QUIET)
        message = str(err.value)
        assert "\n" not in message and "copy mode" in message and str(out) in message
    finally:
        stop.set()
        t.join(timeout=30)
