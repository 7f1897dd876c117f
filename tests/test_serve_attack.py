"""The station under attack and overload (issue 26): each finding's exact request and the 4xx, the bound or
the visible conflict it now gets. A real uvicorn on 127.0.0.1; SQLite and a real PostgreSQL where the finding
depends on the backend."""

from __future__ import annotations

import csv
import socket
import sqlite3
import struct
import time
import zlib
from pathlib import Path

import httpx
import pytest
from test_serve import HTTP_IMPLEMENTATIONS, KEY, config_for, png, running

from defectscope.data.table import DataError, load_table
from defectscope.station.corrections import export_report
from defectscope.station.serve.config import load_api_keys
from defectscope.station.store import Store

READ_KEY = "r-0123456789abcdef0123"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request, station_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attack")
    db = str(tmp / "results.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    config = config_for(tmp, station_model, db=db, data=tmp / "data", max_request_bytes=2 << 20,
                        max_upload_bytes=1 << 20, max_pixels=1_000_000)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, config


def _predict(client: httpx.Client, data: bytes, **kw) -> dict:
    r = client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"}, **kw)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def test_unencodable_review_bodies_are_422_and_keep_the_connection(backend):
    client, _ = backend
    did = _predict(client, png("GOOD", 901))["id"]
    for body in (b'{"decision_id": NaN, "label": "GOOD"}', b'{"decision_id": Infinity, "label": "GOOD"}',
                 b'{"decision_id": %d, "label": "GOOD", "comment": "\\ud800"}' % did,
                 b'{"decision_id": %d, "label": "GOOD", "reviewer": "\\udfff"}' % did):
        r = client.post("/v1/reviews", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert "input" not in r.text and r.headers.get("connection") != "close"
    assert client.get("/healthz").status_code == 200


def test_the_same_image_twice_in_one_request_is_422(backend):
    client, _ = backend
    data = png("spot", 902)
    for names in (("a.png", "a.png"), ("a.png", "../a.png")):
        r = client.post("/v1/predict", files=[("file", (n, data, "image/png")) for n in names])
        assert r.status_code == 422 and "twice" in r.json()["detail"], r.text
    ok = client.post("/v1/predict", files=[("file", (n, data, "image/png")) for n in ("a.png", "b.png")])
    assert ok.status_code == 200


def test_nul_in_a_query_string_is_422_on_every_backend(backend):
    client, _ = backend
    for path in ("/v1/dashboard?station=%00", "/v1/results?station=a%00b", "/v1/review/queue?x=%00"):
        r = client.get(path)
        assert r.status_code == 422 and "NUL" in r.json()["detail"], (path, r.text)


def test_dashboard_queries_are_bounded(backend):
    client, _ = backend
    r = client.get("/v1/dashboard", params={"hours": 744, "bucket_minutes": 1})
    assert r.status_code == 422 and "bucket of at least" in r.json()["detail"]
    assert client.get("/v1/dashboard", params={"hours": 168, "bucket_minutes": 5}).status_code == 200


def test_a_server_error_is_a_counted_json_500(station_model, tmp_path):
    config = config_for(tmp_path, station_model)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        with sqlite3.connect(config.db) as db:  # a real fault: the reviews table is gone
            db.execute("DROP TABLE reviews")
        r = client.get("/v1/review/queue")
        assert r.status_code == 500 and r.json() == {"detail": "internal error: the station's log has the details"}
        text = client.get("/metrics").text
        assert 'defectscope_requests_total{method="GET",route="/v1/review/queue",status="500"} 1.0' in text
        assert 'defectscope_server_errors_total{route="/v1/review/queue",status="500"} 1.0' in text


def _raw(url: str, request: bytes, timeout: float = 10) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"content-length" in b"".join(chunks).lower():
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                n = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")).split(b":")[1])
                if len(body) >= n:
                    break
        return b"".join(chunks)


def test_keys_are_strict_checked_before_the_body_and_read_only_keys_only_read(station_model, tmp_path):
    config = config_for(tmp_path, station_model, api_keys=frozenset({KEY}), read_keys=frozenset({READ_KEY}))
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        # The key before the body: a malformed body without a key is 401, not 422.
        r = client.post("/v1/reviews", content=b'{"decision_id": NaN', headers={"Content-Type": "application/json"})
        assert r.status_code == 401
        for value in (f"Bearer {KEY}\xa0", f"Bearer  {KEY}", f"Bearer \xa0{KEY}", f"Bearer {KEY}x", f"Basic {KEY}",
                      KEY):
            head = f"GET /v1/results HTTP/1.1\r\nHost: x\r\nAuthorization: {value}\r\n\r\n".encode("latin-1")
            assert _raw(url, head).startswith(b"HTTP/1.1 401"), value
        head = f"GET /v1/results HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\xa0\r\n\r\n".encode("latin-1")
        assert _raw(url, head).startswith(b"HTTP/1.1 401")
        two = {"Authorization": f"Bearer {KEY}", "X-API-Key": "y" * 20}
        assert client.get("/v1/results", headers=two).status_code == 401  # ambiguous
        assert client.get("/v1/results", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        read = {"X-API-Key": READ_KEY}
        assert client.get("/v1/results", headers=read).status_code == 200
        assert client.get("/metrics", headers=read).status_code == 200
        r = client.post("/v1/predict", content=png(), headers={**read, "Content-Type": "image/png"})
        assert r.status_code == 403 and "read-only" in r.json()["detail"]
        assert client.post("/v1/reviews", json={"decision_id": 1, "label": "GOOD"}, headers=read).status_code == 403
    for bad in (f"{KEY}\xa0", f"\xa0{KEY}", "k" * 10 + " " + "k" * 10, f"{KEY}\u00e9"):
        with pytest.raises(ValueError, match="characters"):
            load_api_keys(env={"DEFECTSCOPE_API_KEYS": bad})


def test_open_reads_is_an_explicit_flag(station_model, tmp_path):
    config = config_for(tmp_path, station_model, api_keys=frozenset({KEY}), open_reads=True)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/results").status_code == 200 and client.get("/v1/dashboard").status_code == 200
        assert client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png"}).status_code == 401


def test_every_route_has_a_body_limit_answered_413(station_model, tmp_path):
    config = config_for(tmp_path, station_model, max_request_bytes=2 << 20)
    with running(config) as url, httpx.Client(base_url=url, timeout=60) as client:
        big = b'{"decision_id": 1, "label": "' + b"x" * (1 << 20) + b'"}'
        r = client.post("/v1/reviews", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "too large" in r.json()["detail"] and "x" * 100 not in r.text

        def chunks():
            for _ in range(16):
                yield b"x" * (64 << 10)

        r = client.post("/v1/reviews", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413  # streamed, no length announced
        assert client.request("GET", "/v1/results", content=b"x" * (100 << 10)).status_code == 413
        # An upload ten times the limit: the client reads the 413 (the body is drained), not a reset.
        r = client.post("/v1/predict", content=b"\0" * (20 << 20), headers={"Content-Type": "image/png"})
        assert r.status_code == 413
        assert 'defectscope_rejected_total{reason="too_large"} 4.0' in client.get("/metrics").text


def _vm(field: str) -> int:
    """This process's VmRSS / VmHWM in kB (the server runs in it, on a thread)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


@pytest.mark.slow
def test_big_bodies_stay_out_of_memory_and_each_client_reads_413(station_model, tmp_path):
    """The finding: one 120 MB review body raised memory by 556 MB, four at once by 2.1 GB, and a 200 MB upload
    was a reset. Now four 120 MB reviews and a 200 MB upload at once: every client reads a 413 and the process
    (server and clients: the clients send one 1 MB buffer again and again) grows by less than 50 MB."""
    from concurrent.futures import ThreadPoolExecutor

    config = config_for(tmp_path, station_model)  # the default limits: 128 MB streamed, 64 KB elsewhere
    chunk = b"x" * (1 << 20)

    def send(job: tuple[str, int, str]) -> int:
        path, mb, ctype = job

        def body():
            for _ in range(mb):
                yield chunk

        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post(path, content=body(), headers={"Content-Type": ctype, "Content-Length": str(mb << 20)})
            assert "too large" in r.json()["detail"]
            return r.status_code

    with running(config) as url:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak below is this test's
        before = _vm("VmRSS")
        jobs = [("/v1/reviews", 120, "application/json")] * 4 + [("/v1/predict", 200, "image/png")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            assert list(pool.map(send, jobs)) == [413] * 5
        grown_mb = (_vm("VmHWM") - before) / 1024
    assert grown_mb < 50, f"memory grew by {grown_mb:.0f} MB"


# A valid request head that never ends (a header value growing a byte at a time): a parser cannot refuse it early.
_TRICKLED_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
def test_idle_and_slow_clients_are_timed_out_and_connections_capped(station_model, tmp_path, http):
    config = config_for(tmp_path, station_model, header_timeout=1.0, body_timeout=1.0, max_connections=4, http=http)
    with running(config) as url:
        host, port = url.removeprefix("http://").split(":")
        idle = socket.create_connection((host, int(port)), timeout=5)
        trickle = socket.create_connection((host, int(port)), timeout=5)
        started = time.monotonic()
        with pytest.raises(OSError):  # a head sent a byte every 0.1 s: cut after the 1 s header deadline
            for byte in _TRICKLED_HEAD:
                trickle.sendall(bytes([byte]))
                time.sleep(0.1)
        assert 0.9 < time.monotonic() - started < 4
        assert idle.recv(10) == b"" and time.monotonic() - started < 4  # an idle socket: closed, not kept
        idle.close()
        trickle.close()
        slow_body = (b"POST /v1/reviews HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        assert _raw(url, slow_body).startswith(b"HTTP/1.1 408")
        held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
        time.sleep(0.2)
        busy = _raw(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert busy.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in busy
        for s in held:
            s.close()
        time.sleep(0.3)
        assert _raw(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")


def _png_header(w: int, h: int) -> bytes:
    """A PNG that only claims a size: Pillow refuses it from the header, before any pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_what_the_station_says_and_stores(station_model, tmp_path):
    config = config_for(tmp_path, station_model, max_pixels=1_000_000)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/predict", content=_png_header(20000, 20000), headers={"Content-Type": "image/png"})
        assert r.status_code == 422 and "--max-pixels 1000000" in r.json()["detail"], r.text
        assert "178956970" not in r.text
        assert str(station_model) not in client.get("/readyz").text
        assert str(station_model) not in client.get("/v1/dashboard").text
        page = client.get("/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 200
        # The same bytes as a .png upload and as a raw body: one stored file.
        data = png("scratch", 903)
        a = client.post("/v1/predict", files=[("file", ("a.png", data, "image/png"))]).json()["results"][0]
        b = _predict(client, data)
        with Store(config.db) as store:
            assert store.get(a["id"])["image_path"] == store.get(b["id"])["image_path"]
            assert store.get(a["id"])["image_path"].endswith(".png")


def test_review_requests_conflicts_and_the_queue_gauge(station_model, tmp_path):
    config = config_for(tmp_path, station_model)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        data = png("spot", 904)
        first, second = _predict(client, data), _predict(client, data)  # one image, two decisions
        for d in (first, second):
            if not d["needs_review"]:
                assert client.post(f"/v1/decisions/{d['id']}/review-request").status_code == 200
        r = client.post("/v1/reviews", json={"decision_id": first["id"], "label": "spot", "reviewer": "ann"})
        assert r.status_code == 201 and r.json()["conflict"] is False
        # Asking review of a reviewed decision: a clear 409, not a "needs_review: true" that never queues.
        again = client.post(f"/v1/decisions/{first['id']}/review-request")
        assert again.status_code == 409 and "already reviewed" in again.json()["detail"]
        r = client.post("/v1/reviews", json={"decision_id": first["id"], "label": "GOOD", "reviewer": "bob"})
        assert r.status_code == 201 and r.json()["conflict"] is True
        assert sorted(x["label"] for x in r.json()["labels"]) == ["GOOD", "spot"]
        conflicts = client.get("/v1/review/conflicts").json()
        assert conflicts["total"] == 1 and conflicts["items"][0]["decision_id"] == first["id"]
        client.post("/v1/reviews", json={"decision_id": second["id"], "label": "scratch", "reviewer": "cy"})
        with Store(config.db) as store:
            truth = store.review_queue(0)[1]
        gauge = next(float(x.split()[-1]) for x in client.get("/metrics").text.splitlines()
                     if x.startswith("defectscope_review_queue_depth "))
        assert gauge == truth
    out = tmp_path / "corrections.csv"
    counts = export_report(config.db, out)
    assert counts["conflicting"] == 1 and counts["conflict_rows"] == 3 and counts["rows"] == 0
    marked = tmp_path / "marked.csv"
    export_report(config.db, marked, conflicts="mark")
    with open(marked, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["conflict"] for r in rows} == {"1"} and len({r["filename"] for r in rows}) == 1
    with pytest.raises(DataError, match="two or more labels"):
        load_table(marked)
    table, _ = load_table(marked, label_conflicts="last")
    assert len(table) == 1 and table["label"].iloc[0] == rows[-1]["label"]
