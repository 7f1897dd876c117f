"""The inspection station end to end: a real uvicorn server on 127.0.0.1, real HTTP, the real store."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from defectscope.station.serve import ServeConfig, create_app, load_api_keys, serve
from defectscope.station.serve.uploads import safe_name
from defectscope.station.store import Store

KEY = "k-0123456789abcdef0123"
# The HTTP parsers the station can run on: the guards' tests run on each one installed.
HTTP_IMPLEMENTATIONS = ["h11", pytest.param("httptools", marks=pytest.mark.skipif(
    importlib.util.find_spec("httptools") is None, reason="httptools is not installed"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(config: ServeConfig):
    """The station's app under a real uvicorn server in a thread; yields its base URL."""
    import uvicorn

    from defectscope.station.serve.connections import uvicorn_config

    server = uvicorn.Server(uvicorn_config(create_app(config), config, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def png(kind: str = "GOOD", seed: int = 0, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_image(kind, np.random.default_rng(seed), size)).save(buf, format="PNG")
    return buf.getvalue()


def config_for(tmp: Path, model: Path, **kw) -> ServeConfig:
    kw = {"db": str(tmp / "results.db"), "port": free_port(), "reload_poll_seconds": 0, "threads": 1, **kw}
    return ServeConfig(model=model, **kw)


@pytest.fixture(scope="module")
def station(station_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("station")
    config = config_for(tmp, station_model, max_queue=8, max_files=6, batch_wait_ms=30,
                        max_request_bytes=2 << 20, max_upload_bytes=1 << 20, max_pixels=1_000_000)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, config


def test_probes_openapi_and_metrics(station):
    from prometheus_client.parser import text_string_to_metric_families

    client, _ = station
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["model"]["classes"] == ["GOOD", "scratch", "spot"]
    assert len(ready["model"]["id"]) == 16
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/results", "/v1/reviews", "/v1/dashboard", "/metrics"} <= set(spec["paths"])
    client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png"}).raise_for_status()
    text = client.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"defectscope_requests", "defectscope_request_seconds", "defectscope_decisions", "defectscope_queue_depth",
            "defectscope_drift_rate", "defectscope_review_queue_depth", "defectscope_batch_size"} <= names
    assert 'defectscope_requests_total{method="POST",route="/v1/predict",status="200"}' in text


def test_predict_stores_each_decision_before_answering(station):
    client, config = station
    files = [("file", (f"{k}.png", png(k, i), "image/png")) for i, k in enumerate(["GOOD", "scratch", "spot"])]
    r = client.post("/v1/predict", files=files, data={"station": "S1", "lot": "L7", "part_id": "P-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 3 and len(body["request_id"]) == 32
    with Store(config.db) as store:
        for res, (_, (name, data, _)) in zip(body["results"], files, strict=True):
            row = store.get(res["id"])
            assert row["file_name"] == name and row["source"] == "api" and row["status"] == "done"
            assert row["decision"] == res["decision"] and row["model_id"] == res["model"]["id"]
            assert (row["station"], row["lot"], row["part_id"]) == ("S1", "L7", "P-1")
            assert abs(sum(res["probabilities"].values()) - 1) < 1e-4 and res["class"] in res["probabilities"]
            assert res["decision"] in [*res["probabilities"], "REVIEW", "Drift"]
            assert Path(row["image_path"]).read_bytes() == data  # the upload, content-addressed
            assert Path(row["image_path"]).parent.parent == config.data / "images"
            assert row["needs_review"] == (res["decision"] in ("REVIEW", "Drift"))
            assert row["total_ms"] > 0 and row["infer_ms"] >= 0
            # the writer's verdict: a later model's dashboard counts the row by it, not by class names
            assert row["verdict"] in ("PASS", "REJECT", "REVIEW", "Drift")
            assert (row["verdict"] in ("REVIEW", "Drift")) == (res["decision"] in ("REVIEW", "Drift"))


def test_raw_body_names_are_labels_never_paths(station):
    client, config = station
    params = {"name": "../../etc/passwd\x07.png", "station": "A'; DROP TABLE decisions;--"}
    r = client.post("/v1/predict", params=params, content=png("spot", 5),
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    # NUL is refused in any query string (PostgreSQL text cannot hold it), before anything reads it.
    nul = client.post("/v1/predict", params={"name": "a\x00.png"}, content=png("spot", 5),
                      headers={"Content-Type": "application/octet-stream"})
    assert nul.status_code == 422 and "NUL" in nul.json()["detail"]
    res = r.json()["results"][0]
    assert res["file_name"] == "passwd.png" and res["station"] == "A'; DROP TABLE decisions;--"
    assert not (config.data.parent / "etc").exists()
    assert client.get("/v1/results", params={"station": "A'; DROP TABLE decisions;--"}).json()["total"] == 1
    assert safe_name("..\\..\\x.png") == "x.png" and safe_name("...") == "upload" and safe_name(None) == "upload"


def test_results_filters_and_pages(station):
    client, _ = station
    before = client.get("/v1/results", params={"limit": 1}).json()["total"]
    files = [("file", (f"f{i}.png", png("GOOD", 100 + i), "image/png")) for i in range(4)]
    ids = [x["id"] for x in client.post("/v1/predict", files=files, params={"station": "PAGE"}).json()["results"]]
    page = client.get("/v1/results", params={"station": "PAGE", "limit": 3, "offset": 1}).json()
    assert page["total"] == 4 and [x["id"] for x in page["items"]] == sorted(ids, reverse=True)[1:]
    assert client.get("/v1/results").json()["total"] == before + 4
    item = page["items"][0]
    assert "image_path" not in item and "destination" not in item and item["image_url"].endswith("/image")
    model = item["model_id"]
    assert client.get("/v1/results", params={"model": model, "station": "PAGE"}).json()["total"] == 4
    assert client.get("/v1/results", params={"model": "nope"}).json()["total"] == 0
    assert client.get("/v1/results", params={"since": "2999-01-01T00:00:00Z"}).json()["total"] == 0
    assert client.get("/v1/results", params={"until": "2000-01-01"}).json()["total"] == 0
    assert client.get("/v1/results", params={"since": "yesterday"}).status_code == 422
    assert client.get("/v1/results", params={"limit": 0}).status_code == 422
    img = client.get(item["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert client.get("/v1/decisions/999999/image").status_code == 404


def test_review_loop_and_export(station, tmp_path):
    from defectscope.data.table import load_table

    client, config = station
    r = client.post("/v1/predict", files=[("file", ("pick.png", png("scratch", 77), "image/png"))])
    res = r.json()["results"][0]
    did = res["id"]
    assert client.post(f"/v1/decisions/{did}/review-request").json()["needs_review"]
    queue = client.get("/v1/review/queue", params={"limit": 500}).json()
    assert did in [x["id"] for x in queue["items"]] and queue["labels"] == ["GOOD", "scratch", "spot", "Drift"]
    assert client.post("/v1/reviews", json={"decision_id": did, "label": "nonsense"}).status_code == 422
    assert client.post("/v1/reviews", json={"decision_id": 10**8, "label": "GOOD"}).status_code == 404
    r = client.post("/v1/reviews", json={"decision_id": did, "label": "spot", "reviewer": "ann", "comment": "a blob"})
    assert r.status_code == 201 and r.json()["reviewer"] == "ann"
    assert did not in [x["id"] for x in client.get("/v1/review/queue", params={"limit": 500}).json()["items"]]
    reviews = client.get(f"/v1/decisions/{did}").json()["reviews"]
    assert [(x["label"], x["reviewer"], x["comment"]) for x in reviews] == [("spot", "ann", "a blob")]
    out = tmp_path / "corrections.csv"
    done = subprocess.run([sys.executable, "-m", "defectscope.cli", "review", "export", config.db, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": _pythonpath()})
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as f:
        rows = {int(r["decision_id"]): r for r in csv.DictReader(f)}
    assert rows[did]["label"] == "spot" and Path(rows[did]["filename"]).read_bytes() == png("scratch", 77)
    table, _ = load_table(out)
    assert "spot" in set(table["label"])


def test_dashboard_json(station):
    client, _ = station
    d = client.get("/v1/dashboard", params={"hours": 1, "bucket_minutes": 5}).json()
    assert len(d["buckets"]) == 12 and d["total"] >= 1
    assert sum(map(sum, d["decisions_by_kind"].values())) + sum(d["other_decisions"].values()) == d["total"]
    assert set(d["p_chart"]) >= {"pbar", "ucl", "lcl", "violations"} and "pilot" in d and "review_queue" in d
    assert client.get("/").status_code == 200 and "dashboard.js" in client.get("/").text
    assert client.get("/static/dashboard.js").status_code == 200


def bomb_png(side: int = 2000) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_hostile_input_gets_a_clear_4xx(station):
    client, _ = station
    good = png()
    cases = {
        "truncated": (dict(content=good[: len(good) // 2], headers={"Content-Type": "image/png"}), 422, "truncated"),
        "not an image": (dict(content=b"GIF89a not really", headers={"Content-Type": "image/gif"}), 422, "image"),
        "bomb": (dict(content=bomb_png(), headers={"Content-Type": "image/png"}), 422, "bomb"),
        "content type": (dict(content=good, headers={"Content-Type": "text/plain"}), 415, "content type"),
        "no content type": (dict(content=good, headers={"Content-Type": ""}), 415, "content type"),
        "empty": (dict(content=b"", headers={"Content-Type": "image/png"}), 422, "empty"),
        "huge body": (dict(content=b"\0" * (3 << 20), headers={"Content-Type": "image/png"}), 413, "too large"),
        "too many files": (dict(files=[("file", (f"{i}.png", good, "image/png")) for i in range(7)]), 400, "files"),
        "no file": (dict(data={"station": "A"}, files=[("other", ("a.png", good, "image/png"))]), 422, "field 'file'"),
        "text as file": (dict(data={"file": "hello"}, files=[("x", ("x", b"1"))]), 422, "must be a file"),
        "urlencoded": (dict(data={"file": "hello"}), 415, "content type"),
        "control chars": (dict(content=good, params={"lot": "a\x1bb"}, headers={"Content-Type": "image/png"}), 422,
                          "lot"),
        "long meta": (dict(content=good, params={"lot": "x" * 500}, headers={"Content-Type": "image/png"}), 422, None),
        "bad multipart": (dict(content=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data; boundary=x"}),
                          (400, 422), None),
    }
    for name, (kw, status, words) in cases.items():
        r = client.post("/v1/predict", **kw)
        expected = status if isinstance(status, tuple) else (status,)
        assert r.status_code in expected, (name, r.status_code, r.text)
        if words:
            assert words in str(r.json()["detail"]).lower(), (name, r.text)
    assert client.get("/healthz").status_code == 200  # still serving


def test_a_full_queue_answers_503_with_retry_after(station_model, tmp_path):
    config = config_for(tmp_path, station_model, max_queue=2, max_files=8)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        files = [("file", (f"{i}.png", png("GOOD", i), "image/png")) for i in range(3)]
        r = client.post("/v1/predict", files=files)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "queue" in r.json()["detail"]
        assert client.post("/v1/predict", files=files[:2]).status_code == 200
        assert 'defectscope_rejected_total{reason="queue_full"} 1.0' in client.get("/metrics").text


def test_concurrent_requests_are_micro_batched(station_model, tmp_path):
    config = config_for(tmp_path, station_model, batch_wait_ms=100, max_batch=8, max_queue=64)
    with running(config) as url, httpx.Client(base_url=url, timeout=60) as client:
        images = [png("spot", i) for i in range(12)]

        def post(data: bytes) -> int:
            with httpx.Client(base_url=url, timeout=60) as c:
                return c.post("/v1/predict", content=data, headers={"Content-Type": "image/png"}).status_code

        with ThreadPoolExecutor(12) as pool:
            assert list(pool.map(post, images)) == [200] * 12
        metrics = client.get("/metrics").text
        count = _metric(metrics, "defectscope_batch_size_count")
        total = _metric(metrics, "defectscope_batch_size_sum")
        assert total == 12 and count < 12, metrics  # fewer inference calls than images
        assert Store(config.db).query()[1] == 12


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_api_keys_guard_every_endpoint_but_the_probes(station_model, tmp_path):
    """With keys set, nothing but /healthz and /readyz (and the page's own code) answers without one."""
    config = config_for(tmp_path, station_model, api_keys=frozenset({KEY}))
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        raw = {"content": png(), "headers": {"Content-Type": "image/png"}}
        assert client.post("/v1/predict", **raw).status_code == 401
        bad = client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png", "X-API-Key": "x" * 20})
        assert bad.status_code == 401 and "API key" in bad.json()["detail"]
        ok = client.post("/v1/predict", content=png(),
                         headers={"Content-Type": "image/png", "Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        did = ok.json()["results"][0]["id"]
        other = client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png", "X-API-Key": KEY})
        assert other.status_code == 200
        for path in ("/v1/results", "/v1/dashboard", f"/v1/decisions/{did}", f"/v1/decisions/{did}/image",
                     f"/v1/decisions/{did}/heatmap", "/v1/review/queue", "/v1/review/conflicts", "/metrics",
                     "/openapi.json", "/nowhere"):
            r = client.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.status_code)
            assert client.get(path, headers={"X-API-Key": KEY}).status_code in (200, 404), path
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/").status_code == 200 and client.get("/static/dashboard.js").status_code == 200
        assert client.post("/v1/reviews", json={"decision_id": did, "label": "GOOD"}).status_code == 401
        assert client.post(f"/v1/decisions/{did}/review-request").status_code == 401
        r = client.post("/v1/reviews", json={"decision_id": did, "label": "GOOD"}, headers={"X-API-Key": KEY})
        assert r.status_code == 201 and r.json()["reviewer"].startswith("key:")


def test_keys_and_binding_rules(station_model, tmp_path):
    with pytest.raises(ValueError, match="without API keys"):
        serve(config_for(tmp_path, station_model, host="0.0.0.0"))
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# station keys\n{KEY}\n\n")
    assert load_api_keys(keyfile, env={"DEFECTSCOPE_API_KEYS": "a" * 16 + ", " + "b" * 16}) == {KEY, "a" * 16, "b" * 16}
    with pytest.raises(ValueError, match="shorter than 16"):
        load_api_keys(env={"DEFECTSCOPE_API_KEYS": "short"})


def test_hot_reload_checks_a_new_model_before_using_it(station_model, tmp_path):
    import onnx

    model = tmp_path / "live" / "model.onnx"
    model.parent.mkdir()
    shutil.copy(station_model, model)
    config = config_for(tmp_path, model, reload_poll_seconds=0.2)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        first = client.get("/readyz").json()["model"]["id"]

        def replace(data: bytes) -> None:
            tmp = model.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, model)

        def wait_for(check, what: str) -> dict:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ready = client.get("/readyz").json()
                if check(ready):
                    return ready
                time.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}: {ready}")

        replace(b"not an onnx model")
        ready = wait_for(lambda r: r["last_reload_error"], "the broken model to be rejected")
        assert ready["model"]["id"] == first
        r = client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png"}).json()["results"][0]
        assert r["model"]["id"] == first
        # A different, valid model: the same graph with one more metadata entry (other bytes, other id).
        proto = onnx.load(str(station_model))
        proto.metadata_props.add(key="station.test", value="v2")
        replace(proto.SerializeToString())
        ready = wait_for(lambda r: r["model"]["id"] != first, "the new model")
        assert ready["last_reload_error"] is None
        r2 = client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png"}).json()["results"][0]
        assert r2["model"]["id"] == ready["model"]["id"] != first
        with Store(config.db) as store:
            assert store.get(r["id"])["model_id"] == first and store.get(r2["id"])["model_id"] == r2["model"]["id"]
        assert 'defectscope_model_reloads_total{result="rejected"} 1.0' in client.get("/metrics").text


def _pythonpath() -> str:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.mark.slow
def test_kill_9_mid_stream_keeps_every_acknowledged_row(station_model, tmp_path):
    """Acknowledged means committed: kill -9 the server while clients stream images; every request that got
    a 200 has its rows and its stored image after the crash, and the store opens cleanly again."""
    port = free_port()
    db = tmp_path / "results.db"
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "defectscope.cli", "serve", str(station_model), "--db", str(db),
                             "--port", str(port), "--threads", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    acked: list[dict] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                i = 0
                while not stop.is_set():
                    data = png("scratch", 1000 * k + i)
                    try:
                        r = c.post("/v1/predict", content=data, headers={"Content-Type": "image/png"},
                                   params={"part_id": f"{k}-{i}"})
                    except httpx.HTTPError:
                        return  # the server died mid-request: not acknowledged
                    if r.status_code == 200:
                        acked.append({**r.json()["results"][0], "data": data})
                    i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        while len(acked) < 15 and time.monotonic() < deadline + 60:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert len(acked) >= 15
    with Store(db) as store:
        for a in acked:
            row = store.get(a["id"])
            assert row is not None, f"acknowledged decision {a['id']} lost"
            assert row["decision"] == a["decision"] and row["part_id"] == a["part_id"]
            assert Path(row["image_path"]).read_bytes() == a["data"]


def test_the_station_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import defectscope.station.serve, defectscope.station.corrections, defectscope.station.spc\n"
            "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": _pythonpath()})
    assert done.returncode == 0, done.stderr


def test_group_commit_isolates_a_bad_request(tmp_path):
    from concurrent.futures import Future

    from defectscope.station.serve.batching import GroupCommit
    from defectscope.station.store import StoreError

    def rec(i: int, request_id: str) -> dict:
        return {"request_id": request_id, "file_name": f"{i}.png", "source_path": "api", "content_sha256": f"{i:064x}",
                "size_bytes": 1, "decision": "GOOD", "destination": "d"}

    with Store(tmp_path / "r.db") as store:
        store.add_decisions([rec(0, "taken")])
        writer = GroupCommit(store)
        good, bad, good2 = Future(), Future(), Future()
        writer._write([([rec(1, "a"), rec(2, "a")], good), ([rec(0, "taken")], bad), ([rec(3, "b")], good2)])
        assert len(good.result()) == 2 and len(good2.result()) == 1
        with pytest.raises(StoreError):
            bad.result()
        assert store.counts() == {"done": 4}


def _pipeline(station_model: Path, store: Store):
    from defectscope.station.serve.batching import Batcher, GroupCommit
    from defectscope.station.serve.model_holder import ModelHolder

    models = ModelHolder(station_model, 1, 10_000_000, 0, lambda result: None)
    writer = GroupCommit(store)
    batcher = Batcher(models, 8, 200, 64, lambda n, seconds: None, deliver=writer.gate)
    return models, writer, batcher


def test_one_inference_batch_is_one_transaction_and_its_places_come_back(station_model, tmp_path):
    """Four single-image requests in one inference batch: their rows go to the store together, each request gets
    its own ids, and the queue's places are given back once the rows are durable."""
    from defectscope.station.serve.batching import PendingRequest

    with Store(tmp_path / "r.db") as store:
        transactions: list[int] = []
        add = store.add_decisions
        store.add_decisions = lambda records: transactions.append(len(records)) or add(records)
        models, writer, batcher = _pipeline(station_model, store)
        writer.start()  # running first: without the batch's gate it could commit the first request alone
        pending = []
        for i in range(4):
            data = png("spot", i)
            batcher.reserve(1)

            def build(paths, results, i=i, data=data):
                return [{"request_id": f"r{i}", "file_name": f"{i}.png", "source_path": "api", "size_bytes": len(data),
                         "content_sha256": f"{i:064x}", "decision": results[0][0].decision, "destination": "d"}]

            p = PendingRequest(1, batcher, writer, build)
            p.submit(data, models.current.predictor.preprocess(data), 1.0, None)
            p.filed([("sha", tmp_path / "d")])
            pending.append(p)
        batcher.start()
        answers = [p.done.result(timeout=60) for p in pending]
        batcher.stop()
        writer.stop()
        assert transactions == [4]
        assert sorted(ids[0] for _, _, ids in answers) == [1, 2, 3, 4]
        assert (batcher.depth, batcher.incoming) == (0, 0)
        assert store.counts() == {"done": 4}


def test_a_request_that_fails_before_inference_gives_its_places_back(station_model, tmp_path):
    from defectscope.station.serve.batching import PendingRequest

    with Store(tmp_path / "r.db") as store:
        models, writer, batcher = _pipeline(station_model, store)
        batcher.reserve(3)
        p = PendingRequest(3, batcher, writer, lambda paths, results: [])
        p.failed(ValueError("3.png: not an image"))  # decoding refused the request: nothing was submitted
        with pytest.raises(ValueError, match="not an image"):
            p.done.result(timeout=5)
        assert (batcher.depth, batcher.incoming) == (0, 0) and store.counts() == {}


def test_two_inference_streams_run_batches_side_by_side_with_the_same_answers(station_model, tmp_path):
    """``inference_streams=2``: two Predictors of one model, one thread each; a batch that arrives while the
    other stream is busy runs at once, and both streams answer alike."""
    import threading as th

    from defectscope.station.serve.batching import Batcher
    from defectscope.station.serve.model_holder import ModelHolder

    models = ModelHolder(station_model, 2, 10_000_000, 0, lambda result: None, streams=2)
    first, second = models.current.streams
    assert first is models.current.predictor and second is not first
    running, overlapped, used = [0], [False], set()
    lock = th.Lock()

    def slow(p):
        infer = p.infer_arrays

        def run(*a, **kw):
            with lock:
                running[0] += 1
                overlapped[0] |= running[0] > 1
                used.add(id(p))
            time.sleep(0.3)  # long enough that the second image arrives while the first is in inference
            try:
                return infer(*a, **kw)
            finally:
                with lock:
                    running[0] -= 1
        p.infer_arrays = run

    for p in (first, second):
        slow(p)
    batcher = Batcher(models, 8, 0, 64, lambda n, seconds: None, streams=2)
    batcher.start()
    data = [png("spot", 7), png("spot", 7)]
    futures = []
    for d in data:
        batcher.reserve(1)
        futures.append(batcher.submit(d, first.preprocess(d), 1.0))
        time.sleep(0.05)
    answers = [f.result(timeout=60)[0] for f in futures]
    batcher.stop()
    assert overlapped[0] and used == {id(first), id(second)}
    assert answers[0].probabilities == pytest.approx(answers[1].probabilities, abs=1e-5)


def test_the_default_inference_streams(tmp_path):
    from defectscope.station.serve.config import inference_streams

    def streams(**kw) -> int:
        return inference_streams(ServeConfig(model=tmp_path / "m.onnx", **kw))

    assert streams(threads=2) == 2 and streams(threads=4) == 2 and streams(threads=1) == 1
    assert streams(threads=2, device="gpu") == 1
    assert streams(threads=2, inference_streams=1) == 1 and streams(threads=1, inference_streams=2) == 1
    with pytest.raises(ValueError, match="inference_streams must be >= 1"):
        streams(inference_streams=0)
