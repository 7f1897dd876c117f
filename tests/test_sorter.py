"""The inbox sorter: filing, the write-ahead log, crash recovery (kill -9), hostile inboxes, watch mode."""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import CLASSES, make_image
from PIL import Image

from defectscope.onnx_export.exporter import export
from defectscope.runtime.predictor import UNREADABLE, Predictor
from defectscope.station import sorter
from defectscope.station.claims import ALIVE
from defectscope.station.sorter import safe_folder_name, sort
from defectscope.station.store import COLUMNS, Store, export_log

QUIET = {"settle_seconds": 0, "progress": False}
CHILD = Path(__file__).with_name("sorter_child.py")


@pytest.fixture(scope="module")
def model_path(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sorter") / "model.onnx"
    export(trained_run, out)
    return out


@pytest.fixture(scope="module")
def predictor(model_path) -> Predictor:
    return Predictor(model_path, threads=1, decode_threads=1)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_inbox(root: Path, n: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"{prefix}_{i:03d}.png"
        Image.fromarray(make_image(CLASSES[i % 3], rng)).save(p)
        paths.append(p)
    return paths


def filed(out: Path) -> dict[Path, str]:
    """Every file sorted into a decision folder of ``out`` -> its hash (the log and lock are not)."""
    return {p: sha(p) for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")
            for p in d.rglob("*") if p.is_file()}


def rows(db: Path) -> list[sqlite3.Row]:
    with Store(db) as log:
        return log.rows()


def inbox_files(inbox: Path) -> list[Path]:
    """Every file under the inbox not filed yet, claimed ones included (a running sorter's lock file is not)."""
    return [p for p in inbox.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != ALIVE]


def test_one_shot_files_every_image_and_logs_it(predictor, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    images = make_inbox(inbox, 9)
    (inbox / "broken.png").write_bytes(b"\x89PNG not really")
    expected = {p.name: (sha(p), predictor.predict(p).decision) for p in images}
    verdicts = {p.name: predictor.predict(p).verdict for p in images}
    expected["broken.png"] = (sha(inbox / "broken.png"), UNREADABLE)

    summary = sort(predictor, inbox, out, **QUIET)

    assert inbox_files(inbox) == []
    assert summary["processed"] == 10 and summary["errors"] == []
    assert summary["per_decision"] == dict(Counter(d for _, d in expected.values()))
    log = rows(out / "results.db")
    assert len(log) == 10 and {r["status"] for r in log} == {"done"}
    for r in log:
        want_sha, want_decision = expected[r["file_name"]]
        dest = Path(r["destination"])
        assert r["content_sha256"] == want_sha == sha(dest)
        assert r["decision"] == want_decision and dest.parent == out / want_decision and dest.name == r["file_name"]
        assert r["size_bytes"] == dest.stat().st_size and len(r["model_id"]) == 16
        assert r["time"].endswith("+00:00") and "model created" in r["model_version"]
        # the verdict as the sorter saw it, so a later model's dashboard counts this row right
        assert r["verdict"] == verdicts.get(r["file_name"], UNREADABLE) and r["verdict"] is not None
    broken = next(r for r in log if r["file_name"] == "broken.png")
    assert broken["top_class"] is None and "broken.png" in broken["error"]


def test_copy_mode_leaves_the_inbox_and_a_rerun_files_nothing_new(predictor, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    images = make_inbox(inbox, 6)
    before = {p: sha(p) for p in images}
    first = sort(predictor, inbox, out, mode="copy", **QUIET)
    second = sort(predictor, inbox, out, mode="copy", **QUIET)
    assert {p: sha(p) for p in images} == before
    assert first["processed"] == 6 and second["processed"] == 0 and second["skipped"]["already_done"] == 6
    assert sorted(filed(out).values()) == sorted(before.values())
    assert len(rows(out / "results.db")) == 6


def test_name_clash_gets_a_unique_name_and_nothing_is_overwritten(predictor, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    a = make_inbox(inbox / "a", 1, seed=1, prefix="x")[0]
    b = make_inbox(inbox / "b", 1, seed=2, prefix="x")[0]  # same name, other content
    assert a.name == b.name and sha(a) != sha(b)
    # A file of the same name already sorted by an earlier run must survive as well.
    earlier = out / predictor.predict(a).decision / a.name
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier image")
    shas = {sha(a), sha(b)}

    sort(predictor, inbox, out, **QUIET)

    assert earlier.read_bytes() == b"an earlier image"
    assert sorted(filed(out).values()) == sorted([*shas, sha(earlier)])
    names = {Path(r["destination"]).name for r in rows(out / "results.db")}
    assert names <= {"x_000.png", "x_000 (1).png", "x_000 (2).png"} and len(names) == 2


def test_duplicate_content_rule(predictor, tmp_path):
    """Same bytes under another name: filed and logged separately. Same bytes and same name: one image, and the
    removed copy gets a row saying so (never a silent deletion)."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    src = make_inbox(inbox / "a", 1)[0]
    (inbox / "a" / "renamed.png").write_bytes(src.read_bytes())
    (inbox / "b").mkdir()
    (inbox / "b" / src.name).write_bytes(src.read_bytes())

    summary = sort(predictor, inbox, out, **QUIET)

    assert inbox_files(inbox) == []
    assert summary["processed"] == 2 and summary["skipped"]["duplicate_removed"] == 1
    assert sorted(p.name for p in filed(out)) == sorted([src.name, "renamed.png"])
    log = rows(out / "results.db")
    assert sorted(r["file_name"] for r in log) == sorted([src.name, src.name, "renamed.png"])
    assert len({r["content_sha256"] for r in log}) == 1 and {r["status"] for r in log} == {"done"}
    (dup,) = [r for r in log if r["request_id"].startswith("duplicate:")]
    first = next(r for r in log if r["file_name"] == src.name and r["request_id"] == "")
    assert dup["destination"] == first["destination"] and dup["decision"] == first["decision"]
    assert dup["verdict"] == first["verdict"] is not None
    assert f"duplicate of row {first['id']}" in dup["error"] and "removed from the inbox" in dup["error"]
    assert dup["source_path"] != first["source_path"] and not dup["needs_review"]


def test_hostile_inbox_nothing_escapes_out(predictor, tmp_path):
    inbox, out, outside = tmp_path / "inbox", tmp_path / "out", tmp_path / "outside"
    make_inbox(inbox, 2)
    outside.mkdir()
    secret = outside / "secret.png"
    Image.fromarray(make_image("spot", np.random.default_rng(5))).save(secret)
    secret_sha = sha(secret)
    (inbox / "a.png").mkdir()  # a directory named like an image
    (inbox / "link.png").symlink_to(secret)  # a symlink pointing out of the inbox
    (inbox / "dirlink").symlink_to(outside, target_is_directory=True)
    (inbox / "empty.png").write_bytes(b"")
    (inbox / "notes.png").write_text("not an image at all\n")
    odd = inbox / "x..y odd #1 ü.png"
    odd.write_bytes((inbox / "img_000.png").read_bytes()[:-1] + b"!")  # odd name, damaged tail
    os.mkfifo(inbox / "pipe.png")  # would block a naive open()

    summary = sort(predictor, inbox, out, **QUIET)

    assert secret.exists() and sha(secret) == secret_sha and (inbox / "link.png").is_symlink()
    assert summary["skipped"]["symlink"] == 2 and summary["errors"] == []
    assert (inbox / "a.png").is_dir() and (inbox / "pipe.png").exists()
    assert {p.name for p in (out / UNREADABLE).iterdir()} >= {"empty.png", "notes.png"}
    root = out.resolve()
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(root)
    assert not any(p.name == secret.name for p in filed(out))
    assert odd.name in {p.name for p in filed(out)}
    assert {r["status"] for r in rows(out / "results.db")} == {"done"} and len(rows(out / "results.db")) == 5


def test_a_symlinked_class_folder_in_out_is_refused(predictor, tmp_path):
    inbox, out, elsewhere = tmp_path / "inbox", tmp_path / "out", tmp_path / "elsewhere"
    make_inbox(inbox, 3)
    elsewhere.mkdir()
    out.mkdir()
    for name in CLASSES:
        (out / name).symlink_to(elsewhere, target_is_directory=True)
    summary = sort(predictor, inbox, out, **QUIET)
    assert list(elsewhere.iterdir()) == []
    assert len(summary["errors"]) == 3 and all("outside" in e["error"] for e in summary["errors"])
    assert len(inbox_files(inbox)) == 3
    assert {r["status"] for r in rows(out / "results.db")} == {"error"}


def test_safe_folder_name():
    assert safe_folder_name("../../etc") == "__.._etc"
    assert safe_folder_name("..") == "_" and safe_folder_name("") == "_"
    assert safe_folder_name("a/b\\c") == "a_b_c"
    assert safe_folder_name("Short circuit MOS") == "Short circuit MOS"
    assert safe_folder_name(UNREADABLE) == UNREADABLE


def test_a_file_still_being_written_is_not_taken(predictor, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_inbox(inbox, 2)
    growing = inbox / "growing.png"
    growing.write_bytes(b"")
    done = threading.Event()

    def writer():
        with open(growing, "ab") as f:
            while not done.is_set():
                f.write(b"x" * 100)
                f.flush()
                time.sleep(0.02)

    t = threading.Thread(target=writer)
    t.start()
    try:
        summary = sort(predictor, inbox, out, **{**QUIET, "settle_seconds": 0.3})
    finally:
        done.set()
        t.join()
    assert growing.exists() and summary["processed"] == 2 and summary["skipped"]["unsettled"] == 1
    assert {r["file_name"] for r in rows(out / "results.db")} == {"img_000.png", "img_001.png"}


def test_watch_mode_files_new_images_until_stopped(predictor, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    stop = threading.Event()
    result = {}
    t = threading.Thread(target=lambda: result.update(sort(
        predictor, inbox, out, watch=True, poll_interval=0.1, settle_seconds=0.1, stop_event=stop,
        progress=False)))
    t.start()
    try:
        time.sleep(0.3)
        images = make_inbox(tmp_path / "staging", 4)
        for p in images:
            os.replace(p, inbox / p.name)
        deadline = time.monotonic() + 30
        while inbox_files(inbox) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert inbox_files(inbox) == []
    finally:
        stop.set()
        t.join(timeout=20)
    assert not t.is_alive()
    assert result["processed"] == 4 and len(filed(out)) == 4


def test_watch_mode_stops_cleanly_on_sigterm(model_path, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(CHILD), str(model_path), str(inbox), str(out), "0", "watch"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().startswith("watching")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0 and "SIGTERM: finishing the file in hand" in rest and "done 0" in rest


def test_a_failing_file_is_reported_and_the_rest_goes_on(predictor, tmp_path, monkeypatch):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_inbox(inbox, 4)
    real_place = sorter.place_file

    def full_disk(src, *args):
        if src.name == "img_002.png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
        real_place(src, *args)

    monkeypatch.setattr(sorter, "place_file", full_disk)
    summary = sort(predictor, inbox, out, **QUIET)
    assert summary["processed"] == 3 and len(summary["errors"]) == 1
    assert "No space left" in summary["errors"][0]["error"]
    bad = [r for r in rows(out / "results.db") if r["status"] != "done"]
    assert len(bad) == 1 and bad[0]["status"] == "error" and "No space left" in bad[0]["error"]
    assert [p.name for p in inbox_files(inbox)] == ["img_002.png"]

    monkeypatch.setattr(sorter, "place_file", real_place)  # disk freed: the next run files it, same row
    assert sort(predictor, inbox, out, **QUIET)["processed"] == 1
    log = rows(out / "results.db")
    assert len(log) == 4 and {r["status"] for r in log} == {"done"} and inbox_files(inbox) == []


def test_without_hard_links_it_copies_verifies_and_deletes(predictor, tmp_path, monkeypatch):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    shas = sorted(sha(p) for p in make_inbox(inbox, 3))

    def no_link(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    assert sort(predictor, inbox, out, **QUIET)["processed"] == 3
    assert inbox_files(inbox) == [] and sorted(filed(out).values()) == shas
    assert not [p for p in out.rglob("*.part")]


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so no handler in the sorter catches it."""


def _crash_after_link(src, dest, mode, sha256, part, *later):
    os.link(src, dest)
    raise Crash


def _crash_in_copy(src, dest, mode, sha256, part, *later):
    part.write_bytes(src.read_bytes()[:10])
    raise Crash


@pytest.mark.parametrize("point", ["after_link", "in_copy", "before_done"])
def test_restart_after_a_crash_at_each_step(predictor, tmp_path, monkeypatch, point):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    shas = sorted(sha(p) for p in make_inbox(inbox, 3))
    if point == "before_done":  # every file placed, the batch's outcome not committed
        monkeypatch.setattr(Store, "settle_many", lambda self, *a: (_ for _ in ()).throw(Crash()))
    else:  # the first file of the batch half placed
        monkeypatch.setattr(sorter, "place_file", _crash_after_link if point == "after_link" else _crash_in_copy)
    with pytest.raises(Crash):
        sort(predictor, inbox, out, **QUIET)
    # The batch's pending rows were committed before any file was touched: all three are there.
    assert [r["status"] for r in rows(out / "results.db")] == ["pending"] * 3
    monkeypatch.undo()

    summary = sort(predictor, inbox, out, **QUIET)
    assert summary["recovered"] == 3
    assert inbox_files(inbox) == [] and sorted(filed(out).values()) == shas
    log = rows(out / "results.db")
    assert len(log) == 3 and {r["status"] for r in log} == {"done"}
    assert not [p for p in out.rglob("*.part")]


def test_kill_9_at_random_points_loses_nothing_and_files_each_image_once(model_path, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    images = make_inbox(inbox, 30)
    expected = sorted(sha(p) for p in images)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(CHILD), str(model_path), str(inbox), str(out)]
    rng = random.Random(20240611)
    for _ in range(5):
        proc = subprocess.Popen([*cmd, "0.01"], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.02, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
    progress = len(filed(out))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr

    assert progress > 0, "the kills all landed before any work: the test proves nothing"
    assert inbox_files(inbox) == []
    assert sorted(filed(out).values()) == expected  # every input exactly once
    log = rows(out / "results.db")
    assert len(log) == 30 and {r["status"] for r in log} == {"done"}
    assert sorted(r["content_sha256"] for r in log) == expected
    for r in log:
        assert sha(Path(r["destination"])) == r["content_sha256"]


@pytest.mark.parametrize("step", ["begin_many", "settle_many"])
def test_kill_9_between_inference_and_commit_files_every_image_once(model_path, tmp_path, step):
    """The batched, threaded sorter killed (a real SIGKILL) in its second batch: after its inference, before its
    pending rows are committed (begin_many) or after its files are placed but before their outcome is committed
    (settle_many). A second run files every image exactly once and every row ends done."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    images = make_inbox(inbox, 14)
    expected = sorted(sha(p) for p in images)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(CHILD), str(model_path), str(inbox), str(out)]
    killed = subprocess.run([*cmd, "--kill-at", f"{step}:2"], capture_output=True, text=True, env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL and f"killed {step}" in killed.stdout, killed.stderr
    log = rows(out / "results.db")
    assert [r["status"] for r in log] == ["done"] * 4 + (["pending"] * 4 if step == "settle_many" else [])
    assert len(filed(out)) == (8 if step == "settle_many" else 4)  # batch 2's files placed before the kill, or not

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    # Filed now: the 14 but the first batch's 4, and but batch 2's 4 when recovery found them in place (done).
    assert done.returncode == 0, done.stderr
    assert f"done {6 if step == 'settle_many' else 10}" in done.stdout
    assert inbox_files(inbox) == []
    assert sorted(filed(out).values()) == expected  # every input, exactly once
    log = rows(out / "results.db")
    assert len(log) == 14 and {r["status"] for r in log} == {"done"}
    assert sorted(r["content_sha256"] for r in log) == expected
    for r in log:
        assert sha(Path(r["destination"])) == r["content_sha256"]
    assert not [p for p in out.rglob("*.part")]


def test_export_log_writes_every_row(predictor, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_inbox(inbox, 3)
    sort(predictor, inbox, out, **QUIET)
    assert export_log(out / "results.db", tmp_path / "log.csv") == 3
    with open(tmp_path / "log.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == 3 and {r["status"] for r in table} == {"done"}
    with pytest.raises(FileNotFoundError):
        export_log(tmp_path / "missing.db", tmp_path / "x.csv")


def test_sorter_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import defectscope.station.sorter, defectscope.station.store\n"
            "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
