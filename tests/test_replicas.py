"""Two real ``serve`` processes on one PostgreSQL (started by the tests): kill -9 of one under load, two reviewers
racing across the replicas, /metrics summed over processes sharing a metrics folder, a reload reaching both."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import fresh_postgres_database
from test_serve import _pythonpath, free_port, png

from defectscope.station.store import Store

pytestmark = pytest.mark.slow


def start(model: Path, db: str, tmp: Path, name: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full = {**os.environ, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "defectscope.cli", "serve", str(model), "--db", db, "--port",
                             str(port), "--threads", "1", "--data", str(tmp / "data"), "--replica", name],
                            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the replica exited"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        assert time.monotonic() < deadline, "the replica did not start"
        time.sleep(0.2)


@contextlib.contextmanager
def replicas(model: Path, db: str, tmp: Path, env: dict | None = None):
    procs = [start(model, db, tmp, f"r{i}", env) for i in range(2)]
    try:
        for p, u in procs:
            wait_up(p, u)
        yield procs
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
            if p.poll() is None:
                p.kill()
                p.wait()


def test_kill_9_of_one_replica_loses_no_acknowledged_row(station_model, postgres_url, tmp_path):
    db = fresh_postgres_database(postgres_url)
    acked: list[dict] = []
    after_kill: list[str] = []
    killed = threading.Event()
    with replicas(station_model, db, tmp_path) as procs:
        urls = [u for _, u in procs]

        def client(k: int) -> None:
            for i in range(60):  # bounded: 4 clients x 60 requests, spread over both replicas
                url = urls[(k + i) % 2]
                try:
                    r = httpx.post(url + "/v1/predict", content=png("scratch", 1000 * k + i), timeout=10,
                                   headers={"Content-Type": "image/png"}, params={"part_id": f"{k}-{i}"})
                except httpx.HTTPError:
                    continue  # the killed replica: not acknowledged
                if r.status_code == 200:
                    acked.append(r.json()["results"][0])
                    if killed.is_set() and url == urls[1]:
                        after_kill.append(r.json()["results"][0]["part_id"])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 30:
            time.sleep(0.05)
        procs[0][0].send_signal(signal.SIGKILL)
        procs[0][0].wait(timeout=30)
        killed.set()
        for t in threads:
            t.join(timeout=300)
    assert len(acked) >= 60 and after_kill, "the surviving replica kept answering"
    with Store(db) as store:
        rows = store.rows()
        by_id = {r["id"]: r for r in rows}
        for a in acked:
            assert by_id[a["id"]]["part_id"] == a["part_id"], f"acknowledged decision {a['id']} lost"
        parts = [r["part_id"] for r in rows]
        assert len(parts) == len(set(parts)), "a request stored twice"
        assert {r["replica"] for r in rows} == {"r0", "r1"}
        assert all(r["model_id"] for r in rows)


def test_two_reviewers_on_two_replicas_never_hold_one_item(station_model, postgres_url, tmp_path):
    db = fresh_postgres_database(postgres_url)
    with replicas(station_model, db, tmp_path) as procs:
        (_, a), (_, b) = procs
        ids = [httpx.post(a + "/v1/predict", content=png("GOOD", i), headers={"Content-Type": "image/png"},
                          timeout=30).json()["results"][0]["id"] for i in range(6)]
        for i in ids:
            httpx.post(f"{a}/v1/decisions/{i}/review-request", timeout=10)
        got: dict[str, int] = {}

        def claim(url: str, who: str) -> None:
            got[who] = httpx.post(url + "/v1/review/next", json={"reviewer": who, "lease_seconds": 2},
                                  timeout=30).json()["item"]["id"]

        threads = [threading.Thread(target=claim, args=(u, w)) for u, w in ((a, "ann"), (b, "bob"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got["ann"] != got["bob"]
        again = httpx.post(b + "/v1/review/next", json={"reviewer": "ann"}, timeout=30).json()
        assert again["item"]["id"] == got["ann"]  # asking again on the other replica: the same item
        time.sleep(2.5)  # bob's lease ends: his item goes to the next person
        carl = httpx.post(a + "/v1/review/next", json={"reviewer": "carl"}, timeout=30).json()
        assert carl["item"]["id"] == got["bob"]
        # A relabel by two people at once, one on each replica: both kept, shown as a conflict.
        item = got["ann"]
        answers = []

        def relabel(url: str, who: str, label: str) -> None:
            answers.append(httpx.post(url + "/v1/reviews", json={"decision_id": item, "label": label,
                                                                 "reviewer": who}, timeout=30).json())

        threads = [threading.Thread(target=relabel, args=x) for x in ((a, "ann", "scratch"), (b, "bob", "spot"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conflicts = httpx.get(a + "/v1/review/conflicts", timeout=30).json()
        assert [c["decision_id"] for c in conflicts["items"]] == [item]
        assert any(x["conflict"] for x in answers)
    with Store(db) as store:
        assert sorted((r["reviewer"], r["label"]) for r in store.reviews(item)) == [("ann", "scratch"),
                                                                                   ("bob", "spot")]


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def test_metrics_are_summed_over_replicas_sharing_a_folder(station_model, tmp_path):
    shared = tmp_path / "metrics"
    shared.mkdir()
    db = str(tmp_path / "results.db")
    with replicas(station_model, db, tmp_path, env={"PROMETHEUS_MULTIPROC_DIR": str(shared)}) as procs:
        (_, a), (_, b) = procs
        for i in range(3):
            httpx.post(a + "/v1/predict", content=png("GOOD", i), headers={"Content-Type": "image/png"}, timeout=30)
        for i in range(5):
            httpx.post(b + "/v1/predict", content=png("spot", i), headers={"Content-Type": "image/png"}, timeout=30)
        for url in (a, b):
            assert _metric(httpx.get(url + "/metrics", timeout=30).text, "defectscope_images_total") == 8
        dash = httpx.get(a + "/v1/dashboard", timeout=30).json()
        assert {r["replica"]: r["total"] for r in dash["replicas"]} == {"r0": 3, "r1": 5}
        assert httpx.get(a + "/v1/dashboard", params={"replica": "r1"}, timeout=30).json()["replica_filter"] == "r1"


def test_a_reload_asked_of_one_replica_reaches_the_other(station_model, tmp_path):
    """Two replicas with their own model files (two machines): the new model is copied to both, the reload asked
    of one; the other follows the station's model generation. A replica whose file holds another model is 503."""
    import shutil

    db = str(tmp_path / "results.db")
    paths = []
    for i in range(2):
        (tmp_path / f"m{i}").mkdir()
        for f in station_model.parent.glob(station_model.stem + ".*"):
            shutil.copy(f, tmp_path / f"m{i}" / f.name)
        paths.append(tmp_path / f"m{i}" / station_model.name)
    procs = []
    try:
        for i, p in enumerate(paths):
            proc, url = start(p, db, tmp_path, f"r{i}")
            wait_up(proc, url)
            procs.append((proc, url))
        (_, a), (_, b) = procs
        first = httpx.get(b + "/readyz", timeout=30).json()["model"]["id"]
        good = paths[0].read_bytes()
        paths[0].write_bytes(good + b"\0")  # not a model: refused, the running one keeps serving
        assert httpx.post(a + "/v1/model/reload", timeout=60).status_code == 422
        # A "new" model: the same graph with another doc string is another file, another id.
        import onnx

        graph = onnx.load_from_string(good)
        graph.doc_string = "generation 2"
        for p in paths:
            onnx.save(graph, str(p))
        out = httpx.post(a + "/v1/model/reload", timeout=60)
        assert out.status_code == 200, out.text
        new = out.json()["model"]["id"]
        assert new != first
        deadline = time.monotonic() + 30
        while httpx.get(b + "/readyz", timeout=30).json()["model"]["id"] != new:
            assert time.monotonic() < deadline, "the reload did not reach the other replica"
            time.sleep(0.3)
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()
