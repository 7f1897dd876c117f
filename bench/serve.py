"""Inspection-station benchmark on loopback, the one serve bench: what the HTTP service costs on top of the
Predictor alone, whether dashboards and slow clients starve predictions, and whether big bodies stay out of
memory. One ``defectscope serve`` (the real CLI, a subprocess) on a SQLite store pre-filled with ``--rows``
decisions over 31 days; scenarios (``--scenarios``, default all), in this order:

``throughput`` (issue 22's service targets), interleaved (Predictor, service, Predictor, service) because the
machine is shared:
* the Predictor alone, in process, same model and runtime: one image per call, batches of 16 (the service's
  largest batch), and batches of 16 on the service's inference streams at once (one Predictor of
  threads/streams threads each, as the service runs them): the bound is the best of these;
* the service over HTTP on 127.0.0.1: single-image requests from 1, 4 and 8 concurrent clients (micro-batching
  merges the concurrent ones), and 16-image multipart requests from 2 clients;
* then an open-loop client at half the rate the service sustained (its best single-image rate): p50/p99, and
  where a request's time goes (decode and inference as the service reports them, the rest: HTTP, parsing,
  filing, the store's commit, the event loop).
Targets: the service with concurrent clients >= 80% of the Predictor's bound; p99 < 100 ms at half load.

``overload`` (issue 26): 4 prediction clients alone, while 4 dashboards refresh without pause (31 days / 15 min,
7 days / 5 min, 48 h / 1 min, 24 h / 1 min: the largest windows the station allows, so its cache is no help),
and while ``--slow`` clients hold connections (half idle, half trickling a request head, a header's value a byte
every 0.5 s);
interleaved, 2 rounds. Target: predictions keep >= 80% of their throughput alone. Also: each dashboard
window's answer time on the idle server, the query plans of its queries, and what the issue's hostile query
(``hours=744&bucket_minutes=1``) gets.

``bodies`` (issue 26): four concurrent 120 MB ``POST /v1/reviews`` bodies (with Content-Length), one 120 MB
chunked review body, and a 200 MB ``POST /v1/predict`` upload: each client must read a 413 (not a reset) while
the server's resident memory (``/proc/<pid>/status`` VmRSS sampled every 5 ms, and VmHWM after resetting it)
grows by less than ``--rss-bound-mb``.

``stacks`` (not in the default list): the same service on several HTTP parsers, event loops and inference
stream counts (``--stacks h11:asyncio:1,httptools:uvloop:1,httptools:uvloop:2``), one server each, interleaved
rounds; written to bench/results/serve_protocol.json by
``python bench/serve.py --model M --scenarios stacks --no-screenshot --out bench/results/serve_protocol.json``.

The clients (``--client``, default ``raw``): a minimal keep-alive HTTP/1.1 client on raw sockets (about 0.1 ms of
CPU a request against httpx's 1.3-1.6 ms on this machine), so that on 2 shared cores the clients neither take
the server's CPU nor hold their own GIL long enough to become the tail; ``--client httpx`` gives the figures made
before 2026-12-07. The open loop also reports how late each request left (``sent_late_ms``: every worker busy, or
the client slow) and the share of requests the server itself answered within each bound of its latency
histogram (``server_answered_within_ms``), so that a tail outside the server shows as such.

Every prediction is a real PNG upload that is decoded, classified, filed content-addressed and committed to the
store (WAL, synchronous=FULL) before its answer: the service numbers include all of that.

    python bench/serve.py [--model MODEL.onnx | --arch lite0] [--runtime auto] [--seconds 5] [--threads 2]
                          [--rows 100000] [--slow 40] [--scenarios throughput,overload,bodies]

Without --model it trains and exports the tests' tiny seed_cnn2 model (seconds), whose inference is almost
free: the numbers then show the service's own overhead (HTTP, decode, store), the worst case for the ratio.
``--arch lite0`` instead fits the demo's architecture on synthetic images. With ``--runtime auto`` (default)
both the Predictor and the service use what ``auto`` chose (its record beside the model; the first start on a
machine measures it, so run that once before timing).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("DEFECTSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def images(n: int, size: int = 300, seed: int = 0) -> list[bytes]:
    """Gray PNGs like an inspection camera's: texture, some with a bright scratch or spot."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.normal(90, 12, (size, size))
        # The tests' three classes (tests/conftest.py make_image) drawn to scale, so the tiny model sees them.
        w, m = max(3, size // 13), size // 10
        if i % 3 == 1:
            r = rng.integers(m, size - m)
            img[r:r + w, m:-m] = 230
        elif i % 3 == 2:
            cy, cx = rng.integers(size // 4, size - size // 4, 2)
            yy, xx = np.mgrid[:size, :size]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size / 8) ** 2] = 230
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def tiny_model(workdir: Path, arch: str = "tiny") -> Path:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import FAST, write_folder_dataset

    from defectscope import train
    from defectscope.decision.calibrate import calibrate
    from defectscope.onnx_export.exporter import export

    options = dict(FAST)
    if arch == "lite0":
        options.update({"model.name": "tf_efficientnet_lite0", "model.pretrained": "package",
                        "model.image_size": 160, "train.recipe": "frozen", "train.frozen_head": "rbf"})
    run = train(write_folder_dataset(workdir / "data"), workdir / "run", **options)
    calibrate(run, review_rate=0.2, drift_rate=None)
    export(run, workdir / "model.onnx")
    return workdir / "model.onnx"


def summary(latencies: list[float], n_images: int, seconds: float) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    return {"images_per_second": round(n_images / seconds, 1), "requests": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on one socket: a request is one ``sendall``, an answer is read by its
    Content-Length. About a tenth of httpx's CPU per request (bench/results/serve_protocol.json), which matters
    where the clients share the station's 2 cores: the clients' own cost and their GIL are then not what the
    latency tail measures. It sends what the bench sends (raw PNG bodies, multipart forms, GETs) and nothing
    more; an answer it cannot read (chunked, a status line it does not know) fails the run loudly."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        self.addr, self.timeout, self.host = (host, int(port)), timeout, f"{host}:{port}".encode()
        self.sock: socket.socket | None = None
        self.buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, method: str, path: str, body: bytes = b"", ctype: str | None = None,
                params: dict | None = None) -> tuple[int, bytes]:
        """(status, body) of one request; reconnects once when the server had closed an idle connection."""
        if params:
            from urllib.parse import urlencode
            path = f"{path}?{urlencode(params)}"
        head = [f"{method} {path} HTTP/1.1", "Host: " + self.host.decode(), f"Content-Length: {len(body)}"]
        if ctype:
            head.append(f"Content-Type: {ctype}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self.sock = socket.create_connection(self.addr, timeout=self.timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.buf = b""
            try:
                self.sock.sendall(data)
                return self._answer()
            except (ConnectionError, EOFError):
                self.close()
                if fresh or attempt:  # a new connection that failed, or the retry: a real error
                    raise
        raise AssertionError("unreachable")

    def _answer(self) -> tuple[int, bytes]:
        assert self.sock is not None
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:])}
        if b"content-length" not in fields:
            raise RuntimeError(f"answer without Content-Length (status {status}): RawClient reads no other")
        n = int(fields[b"content-length"])
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        if fields.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, body

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buf += chunk


class BenchClient:
    """One bench client, on :class:`RawClient` (default) or on httpx (``--client httpx``, the client of the
    figures before 2026-12-07): a raw PNG body, a multipart form of several images, a GET."""

    def __init__(self, url: str, kind: str) -> None:
        self.kind = kind
        self.c: Any = RawClient(url) if kind == "raw" else httpx.Client(base_url=url, timeout=60)

    def __enter__(self) -> BenchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.c.close()

    def get(self, path: str) -> None:
        status = self.c.request("GET", path)[0] if self.kind == "raw" else self.c.get(path).status_code
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")

    def predict(self, images: list[bytes], params: dict) -> list[dict]:
        """The results of one ``POST /v1/predict``: one image as a raw body, several as a multipart form."""
        if self.kind == "raw":
            if len(images) == 1:
                status, body = self.c.request("POST", "/v1/predict", images[0], "image/png", params)
            else:
                status, body = self.c.request("POST", "/v1/predict", *_multipart(images, params))
        elif len(images) == 1:
            r = self.c.post("/v1/predict", content=images[0], headers={"Content-Type": "image/png"}, params=params)
            status, body = r.status_code, r.content
        else:
            r = self.c.post("/v1/predict", files=[("file", (f"{j}.png", x, "image/png")) for j, x in enumerate(images)],
                            data=params)
            status, body = r.status_code, r.content
        if status != 200:
            raise RuntimeError(f"POST /v1/predict: {status} {body[:200]!r}")
        return json.loads(body)["results"]


def _multipart(images: list[bytes], fields: dict) -> tuple[bytes, str]:
    boundary = "benchboundary7d1f0c"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for j, x in enumerate(images):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{j}.png"\r\n'
                     "Content-Type: image/png\r\n\r\n".encode() + x + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (every thread) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU taken during a measurement by the server (``pid``) and by this bench process (the clients), in
    cores (CPU seconds per wall second) and in ms per unit of work: on 2 shared cores the clients' own cost is
    part of what the service competes with."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.server0 = proc_cpu_seconds(pid) if pid else 0.0
        self.client0, self.wall0 = time.process_time(), time.perf_counter()

    def read(self, units: int) -> dict:
        wall = time.perf_counter() - self.wall0
        client = time.process_time() - self.client0
        out = {"client_cpu_cores": round(client / wall, 3),
               "client_cpu_ms_per_unit": round(1000 * client / max(units, 1), 2), "load_average": os.getloadavg()[0]}
        if self.pid:
            server = proc_cpu_seconds(self.pid) - self.server0
            out.update({"server_cpu_cores": round(server / wall, 3),
                        "server_cpu_ms_per_unit": round(1000 * server / max(units, 1), 2)})
        return out


def trivial(url: str, seconds: float, clients: int, pid: int | None, kind: str = "raw") -> dict:
    """``clients`` closed-loop clients on ``GET /healthz`` (no body, no model, no store): what one HTTP round
    trip costs the clients and the server's framework (uvicorn, middlewares, FastAPI), the floor under every
    prediction."""
    count = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(_: int) -> None:
        with BenchClient(url, kind) as c:
            while time.perf_counter() < stop:
                c.get("/healthz")
                with lock:
                    count[0] += 1

    meter = CpuMeter(pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return {"requests_per_second": round(count[0] / (time.perf_counter() - start), 1), "requests": count[0],
            **{k.replace("unit", "request"): v for k, v in meter.read(count[0]).items()}}


def bench_predictor(p, data: list[bytes], seconds: float) -> dict:
    p.predict(data[0])
    lat, n, start, meter = [], 0, time.perf_counter(), CpuMeter(None)
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        p.predict(data[n % len(data)])
        lat.append(time.perf_counter() - t)
        n += 1
    single = {**summary(lat, n, time.perf_counter() - start), **_own_cpu(meter.read(n))}
    lat, n, start, meter = [], 0, time.perf_counter(), CpuMeter(None)
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        p.predict_batch(data[(n % 4) * 16:(n % 4) * 16 + 16], batch_size=16)
        lat.append(time.perf_counter() - t)
        n += 1
    batched = {**summary(lat, n * 16, time.perf_counter() - start), **_own_cpu(meter.read(n * 16))}
    return {"single": single, "batch16": batched}


def bench_streams(predictors: list, data: list[bytes], seconds: float) -> dict:
    """Batches of 16 on several Predictors at once, one thread each (the service's inference streams): the
    bound of the layout the service runs, next to one Predictor with every thread."""
    for p in predictors:
        p.predict(data[0])
    count, lock, stop = [0], threading.Lock(), time.perf_counter() + seconds

    def run(k: int) -> None:
        n = k
        while time.perf_counter() < stop:
            predictors[k].predict_batch(data[(n % 4) * 16:(n % 4) * 16 + 16], batch_size=16)
            n += 1
            with lock:
                count[0] += 16

    meter, start = CpuMeter(None), time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(predictors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"images_per_second": round(count[0] / (time.perf_counter() - start), 1), **_own_cpu(meter.read(count[0]))}


def _own_cpu(read: dict) -> dict:
    """The Predictor runs in this process: its CPU is the 'client' side of the meter."""
    return {"cpu_cores": read["client_cpu_cores"], "cpu_ms_per_image": read["client_cpu_ms_per_unit"],
            "load_average": read["load_average"]}


def load(url: str, data: list[bytes], seconds: float, clients: int, per_request: int,
         timings: list[dict] | None = None, pid: int | None = None, kind: str = "raw") -> dict:
    """``clients`` closed-loop clients sending ``per_request`` images a request (1: a raw PNG body, more: a
    multipart form); ``timings`` collects the service's own per-image timing of each answer."""
    lat: list[float] = []
    count = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        with BenchClient(url, kind) as c:
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                results = c.predict([data[(i + j) % len(data)] for j in range(per_request)], {"station": f"bench-{k}"})
                with lock:
                    lat.append(time.perf_counter() - t)
                    count[0] += per_request
                    if timings is not None:
                        timings.extend({**x["timing"], "client_ms": 1000 * lat[-1]} for x in results)
                i += clients

    meter, batches = CpuMeter(pid), batch_totals(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    cpu = {k.replace("unit", "image"): v for k, v in meter.read(count[0]).items()}
    calls, images = (after - before for after, before in zip(batch_totals(url), batches, strict=True))
    return {**summary(lat, count[0], time.perf_counter() - start), **(cpu if pid else {}),
            "mean_inference_batch": round(images / calls, 2) if calls else None}


def server_latency(url: str, since: dict | None = None) -> dict:
    """How many ``POST /v1/predict`` requests the server answered within each bound of its latency histogram
    (``defectscope_request_seconds``: from the request's arrival in the app to its answer's last byte), as
    counts, or with ``since`` as shares of the requests since then. The server's own view of the tail, beside
    the client's: what lies between them is parsing, the socket and the client itself."""
    counts = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("defectscope_request_seconds_bucket") and 'route="/v1/predict"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            counts[le] = float(line.split()[-1])
    if since is None:
        return counts
    delta = {le: counts[le] - since.get(le, 0.0) for le in counts}
    total = delta.get("+Inf", 0.0)
    return {f"{1000 * float(le):g}": round(n / total, 4) for le, n in delta.items() if le != "+Inf" and total} \
        | {"requests": total}


def batch_totals(url: str) -> tuple[float, float]:
    """(inference calls, images in them) so far, from the server's /metrics."""
    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    count = next((float(x.split()[-1]) for x in lines if x.startswith("defectscope_batch_size_count ")), 0.0)
    total = next((float(x.split()[-1]) for x in lines if x.startswith("defectscope_batch_size_sum ")), 0.0)
    return count, total


def paced(url: str, data: list[bytes], seconds: float, rate: float, workers: int = 8,
          timings: list[dict] | None = None, kind: str = "raw") -> dict:
    """Open loop, the way a camera line feeds a station: request i is due at ``i / rate`` whatever the answers
    do. Persistent clients on worker threads send them; latency counts from the due time, so a late send
    (every worker busy) counts against the service instead of hiding (no coordinated omission)."""
    lat: list[float] = []
    late: list[float] = []  # how long after its due time each request left (every worker busy, or the client slow)
    lock = threading.Lock()
    jobs: queue.Queue[tuple[int, float] | None] = queue.Queue()

    def worker() -> None:
        with BenchClient(url, kind) as c:
            while (job := jobs.get()) is not None:
                i, due = job
                sent = time.perf_counter()
                result = c.predict([data[i % len(data)]], {"station": "bench-paced"})[0]
                with lock:
                    lat.append(time.perf_counter() - due)
                    late.append(sent - due)
                    if timings is not None:
                        timings.append({**result["timing"], "client_ms": 1000 * lat[-1]})

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    for i in range(int(seconds * rate)):
        due = start + i / rate
        if (delay := due - time.perf_counter()) > 0:
            time.sleep(delay)
        jobs.put((i, due))
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join()
    out = summary(lat, len(lat), time.perf_counter() - start)
    late_ms = sorted(1000 * x for x in late)
    return {**out, "offered_per_second": round(rate, 1), "workers": workers, "client": kind,
            "sent_late_ms": {"p50": round(float(np.percentile(late_ms, 50)), 2),
                             "p99": round(float(np.percentile(late_ms, 99)), 2)} if late_ms else None}


def server_stack() -> dict:
    """The HTTP parser and event loop the server runs (it starts from this environment), with their versions."""
    from importlib.metadata import PackageNotFoundError, version

    from defectscope.station.serve.connections import http_implementation, loop_implementation

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    http, loop = http_implementation("auto"), loop_implementation("auto")
    return {"http": http, "loop": loop, "versions": {k: ver(k) for k in ("uvicorn", http, loop) if k != "asyncio"}}


def server_streams(model: Path, threads: int) -> int:
    """The inference streams the CLI's server runs with ``--threads threads`` (its default rule)."""
    from defectscope.station.serve.config import ServeConfig, inference_streams

    return inference_streams(ServeConfig(model=model, threads=threads))


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until /readyz answers 200; a server that exits or never gets ready stops the benchmark loudly."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"defectscope serve exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"defectscope serve was not ready after {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(url: str, out: Path) -> bool:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return False
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                              "--disable-background-networking", "--no-first-run"])
        # bypass_csp: the page's CSP (script-src 'self') refuses the string Playwright evaluates to wait.
        page = b.new_page(viewport={"width": 1400, "height": 1250}, bypass_csp=True)
        page.goto(url + "/?")
        page.select_option("#bucket", "1")
        page.select_option("#hours", "1")
        page.wait_for_function("document.getElementById('t-total').textContent !== '-'")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out), full_page=True)
        b.close()
    return True


# ------------------------------------------------------------------------------------------ the store

WINDOWS = ((744, 15), (168, 5), (48, 1), (24, 1))


VERDICT_OF = {"GOOD": "PASS", "REVIEW": "REVIEW", "Drift": "Drift"}  # scratch, spot: REJECT


def fill(db: Path, rows: int) -> None:
    """``rows`` finished decisions over the last 31 days, as the station would have stored them."""
    import random
    from datetime import datetime, timedelta, timezone

    import sqlalchemy as sa

    from defectscope.station.store import Store
    from defectscope.station.store.schema import decisions

    rng = random.Random(0)
    now = datetime.now(timezone.utc)
    with Store(str(db)) as store, store.engine.begin() as conn:
        for start in range(0, rows, 10_000):
            batch = []
            for i in range(start, min(rows, start + 10_000)):
                t = now - timedelta(seconds=rng.uniform(0, 31 * 86400))
                kind = rng.choices(["GOOD", "scratch", "spot", "REVIEW", "Drift"], [80, 8, 6, 5, 1])[0]
                batch.append({"time": t.isoformat(timespec="milliseconds"), "file_name": f"f{i}.png",
                              "source_path": "bench", "content_sha256": f"{i:064x}", "size_bytes": 1000,
                              "decision": kind, "top_class": "GOOD" if kind in ("REVIEW", "Drift") else kind,
                              "confidence": rng.random(), "probabilities": "{}", "destination": "bench",
                              "status": "done", "request_id": "", "source": "sort", "station": f"S{i % 4}",
                              "total_ms": rng.uniform(5, 50), "needs_review": kind in ("REVIEW", "Drift"),
                              # the dashboard counts a row by its verdict, not by the (other model's) class
                              "verdict": VERDICT_OF.get(kind, "REJECT")})
            conn.execute(sa.insert(decisions), batch)


def query_plans(db: Path) -> dict[str, str]:
    """SQLite's plan for the dashboard's queries (what index, if any, each one uses)."""
    import sqlite3

    since = "2000-01-01T00:00:00.000+00:00"
    queries = {
        "minute_counts": "SELECT substr(time, 1, 16), decision, count(*) FROM decisions WHERE time >= ? AND "
                         "status = 'done' GROUP BY 1, 2",
        "minute_counts_one_station": "SELECT substr(time, 1, 16), decision, count(*) FROM decisions WHERE "
                                     "time >= ? AND status = 'done' AND station = 'S1' GROUP BY 1, 2",
        "recent_decisions_one_station": "SELECT decision FROM decisions WHERE status = 'done' AND station = 'S1' "
                                        "AND time >= ? ORDER BY id DESC LIMIT 500",
    }
    with sqlite3.connect(db) as conn:
        return {k: "; ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + q, (since,)))
                for k, q in queries.items()}


# ----------------------------------------------------------------------------------- the scenarios

def throughput(url: str, model: Path, args: argparse.Namespace, data: list[bytes]) -> dict:
    from defectscope.runtime.predictor import Predictor

    predictor = Predictor(model, threads=args.threads, runtime=args.runtime, precision=args.precision)
    n_streams = server_streams(model, args.threads)
    # The service's own layout (inference streams of threads // streams each) measured as a bound too: the
    # bound is the best the Predictor does in any layout measured, never one the service beats by its layout.
    streamed = [Predictor(model, threads=max(1, args.threads // n_streams), runtime=args.runtime,
                          precision=args.precision) for _ in range(n_streams)] if n_streams > 1 else []
    rounds: dict = {"predictor": [], "service": [], "trivial_endpoint_8_clients": []}
    pid = args.server_pid
    kind = args.client
    for _ in range(2):  # interleaved: A, B, A, B
        rounds["predictor"].append(bench_predictor(predictor, data, args.seconds))
        if streamed:
            rounds["predictor"][-1][f"batch16_{n_streams}_streams"] = bench_streams(streamed, data, args.seconds)
        rounds["service"].append({
            "single_1_client": load(url, data, args.seconds, 1, 1, pid=pid, kind=kind),
            "single_4_clients": load(url, data, args.seconds, 4, 1, pid=pid, kind=kind),
            "single_8_clients": load(url, data, args.seconds, 8, 1, pid=pid, kind=kind),
            "multipart16_2_clients": load(url, data, args.seconds, 2, 16, pid=pid, kind=kind),
        })
        rounds["trivial_endpoint_8_clients"].append(trivial(url, min(args.seconds, 3.0), 8, pid, kind))
    chosen = {"runtime": predictor.runtime, "precision": predictor.precision, "layout": predictor.layout,
              "views": predictor.views}
    if streamed:
        chosen["streams"] = {"count": n_streams, "runtime": streamed[0].runtime, "precision": streamed[0].precision,
                             "threads_each": max(1, args.threads // n_streams)}
    del predictor, streamed
    service = {k: med(rounds["service"], k) for k in rounds["service"][0]}
    saturating = max(service[k]["images_per_second"] for k in ("single_4_clients", "single_8_clients"))
    timings: list[dict] = []
    before = server_latency(url)
    half = paced(url, data, max(args.seconds, 8.0), saturating / 2, timings=timings, kind=kind)
    half["server_answered_within_ms"] = server_latency(url, before)
    alone = {k: med(rounds["predictor"], k) for k in rounds["predictor"][0]}
    bound_from = max(alone, key=lambda k: alone[k]["images_per_second"])
    bound = alone[bound_from]["images_per_second"]
    best = max(v["images_per_second"] for k, v in service.items() if k != "single_1_client")
    return {
        "predictor_runtime": chosen,
        "predictor_alone": alone,
        "bound": {"images_per_second": bound, "from": bound_from},
        "service": service,
        "service_fraction_of_bound": {k: round(v["images_per_second"] / bound, 3) for k, v in service.items()},
        "half_load_single_images": half,
        "half_load_where_the_time_goes_ms": where_time_goes(timings),
        "trivial_endpoint_8_clients": med(rounds["trivial_endpoint_8_clients"]),
        "cpu_ms_per_image": cpu_split(rounds, service),
        "targets": {"best_concurrent_fraction_of_bound": round(best / bound, 3), "fraction_target": 0.80,
                    "p99_ms_at_half_load": half["p99_ms"], "p99_target_ms": 100},
        "rounds": rounds,
    }


def cpu_split(rounds: dict, service: dict) -> dict:
    """Where the CPU of an image goes at 8 single-image clients, against the Predictor's own batched cost: the
    server's whole process (inference, decode, HTTP, filing, heatmap, store), the clients' (this process), and
    the HTTP round trip alone (the trivial endpoint's server and client cost per request)."""
    eight = service["single_8_clients"]
    floor = med(rounds["trivial_endpoint_8_clients"])
    batch16 = med(rounds["predictor"], "batch16")["cpu_ms_per_image"]
    return {"predictor_batch16": batch16, "predictor_single": med(rounds["predictor"], "single")["cpu_ms_per_image"],
            "server_8_clients": eight.get("server_cpu_ms_per_image"),
            "server_8_clients_beyond_predictor_batch16": round(eight["server_cpu_ms_per_image"] - batch16, 2)
            if eight.get("server_cpu_ms_per_image") else None,
            "clients_8_clients": eight.get("client_cpu_ms_per_image"),
            "trivial_request_server": floor.get("server_cpu_ms_per_request"),
            "trivial_request_client": floor.get("client_cpu_ms_per_request")}


def where_time_goes(timings: list[dict]) -> dict:
    """Medians and p99 of the service's own timing of each image and of what the client saw: decode, the
    image's share of its batch's inference, the server's time to its rows (before the commit), the rest."""
    if not timings:
        return {}
    rows = {k: [t[k] for t in timings if t.get(k) is not None] for k in ("decode_ms", "infer_ms", "total_ms",
                                                                          "client_ms")}
    rows["client_minus_server_ms"] = [t["client_ms"] - t["total_ms"] for t in timings if t.get("total_ms")]
    return {k: {"p50": round(float(np.percentile(v, 50)), 2), "p99": round(float(np.percentile(v, 99)), 2)}
            for k, v in rows.items() if v}


def dashboards(url: str, stop: threading.Event, out: list[float]) -> list[threading.Thread]:
    def run(hours: int, bucket: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.get("/v1/dashboard", params={"hours": hours, "bucket_minutes": bucket}).raise_for_status()
                out.append(time.perf_counter() - t)

    return [threading.Thread(target=run, args=w, daemon=True) for w in WINDOWS]


def slow_clients(url: str, n: int, stop: threading.Event, lives: list[float]) -> list[threading.Thread]:
    host, port = url.removeprefix("http://").split(":")

    def run(k: int) -> None:
        while not stop.is_set():
            s, t, sent = socket.create_connection((host, int(port)), timeout=30), time.perf_counter(), 0
            try:
                while not stop.is_set():
                    if k % 2:  # a valid head trickling in, one header value growing (a parser cannot refuse it)
                        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " if sent == 0 else b"a")
                        sent += 1
                        time.sleep(0.5)
                    elif s.recv(1) == b"":  # idle: wait to be closed
                        break
            except OSError:
                pass
            finally:
                lives.append(time.perf_counter() - t)
                s.close()

    return [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]


def under(url: str, data: list[bytes], seconds: float, background: list[threading.Thread],
          stop: threading.Event) -> dict:
    for t in background:
        t.start()
    time.sleep(0.5)
    try:
        return load(url, data, seconds, 4, 1)
    finally:
        stop.set()
        for t in background:
            t.join(timeout=120)


def overload(url: str, args: argparse.Namespace, data: list[bytes], db: Path) -> dict:
    idle = {}
    for hours, bucket in WINDOWS:  # on the idle server, each window once (the 2 s cache then empty again)
        t = time.perf_counter()
        httpx.get(url + "/v1/dashboard", params={"hours": hours, "bucket_minutes": bucket}, timeout=120)
        idle[f"{hours}h_{bucket}min"] = round(1000 * (time.perf_counter() - t), 1)
        time.sleep(2.1)
    t = time.perf_counter()
    hostile = httpx.get(url + "/v1/dashboard", params={"hours": 744, "bucket_minutes": 1}, timeout=120)
    hostile_info = {"status": hostile.status_code, "seconds": round(time.perf_counter() - t, 3),
                    "bytes": len(hostile.content), "detail": hostile.json().get("detail")}
    load(url, data, 2.0, 4, 1)  # warm up
    rounds = []
    for _ in range(2):
        row: dict = {"alone": load(url, data, args.seconds, 4, 1)}
        stop, times = threading.Event(), []
        row["with_4_dashboards"] = under(url, data, args.seconds, dashboards(url, stop, times), stop)
        row["dashboard_answers"] = len(times)
        row["dashboard_p50_ms"] = round(1000 * statistics.median(times), 1) if times else None
        row["dashboard_max_ms"] = round(1000 * max(times), 1) if times else None
        stop, lives = threading.Event(), []
        row[f"with_{args.slow}_slow_clients"] = under(url, data, args.seconds,
                                                      slow_clients(url, args.slow, stop, lives), stop)
        row["slow_connection_max_life_s"] = round(max(lives), 2) if lives else None
        row["slow_connections_opened"] = len(lives)
        rounds.append(row)

    def ratio(key: str) -> float:
        return round(statistics.median(r[key]["images_per_second"] / r["alone"]["images_per_second"]
                                       for r in rounds), 3)

    return {"dashboard_windows": [{"hours": h, "bucket_minutes": b} for h, b in WINDOWS],
            "dashboard_ms_idle_server": idle, "dashboard_query_plans": query_plans(db),
            "hostile_dashboard_query": hostile_info,
            "throughput_ratio_with_4_dashboards": ratio("with_4_dashboards"),
            f"throughput_ratio_with_{args.slow}_slow_clients": ratio(f"with_{args.slow}_slow_clients"),
            "target_ratio": 0.80, "rounds": rounds}


# ------------------------------------------------------------------------------------------- stacks

STACKS = ("h11:asyncio:1", "httptools:uvloop:1", "httptools:uvloop:2")


def stack_server(model: Path, db: Path, port: int, args: argparse.Namespace, stack: str, log: Path
                 ) -> subprocess.Popen:
    """A server like :func:`start_server`'s, on the HTTP parser, event loop and inference streams of ``stack``
    (``http:loop:streams``): the CLI has no switch for them, so the same ServeConfig is built here."""
    http, loop, streams = stack.split(":")
    kw = {"model": str(model), "db": str(db), "port": port, "threads": args.threads, "runtime": args.runtime,
          "precision": args.precision, "pilot": True, "max_queue": 256, "http": http, "loop": loop,
          "inference_streams": int(streams)}
    code = ("import json, sys; from defectscope.station.serve import ServeConfig, serve; "
            "serve(ServeConfig(**json.loads(sys.argv[1])), log_level='warning')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(kw)], env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))  # noqa: SIM115 - the server's stderr for its whole life


def stacks(model: Path, args: argparse.Namespace, data: list[bytes], db: Path) -> dict:
    """The same service on each of :data:`STACKS` (``--stacks``), one live server each on its own copy of the
    store, measured in interleaved rounds: the trivial endpoint (the HTTP floor), 1 and 8 single-image clients,
    and the open loop at one fixed rate for all (``--stack-rate``, default half the first stack's 8-client rate).
    Each figure with the CPU per request of the server's whole process."""
    servers = []
    try:
        for k, stack in enumerate(args.stacks.split(",")):
            copy = db.parent / f"stack{k}.db"
            shutil.copy(db, copy)
            port = free_port()
            servers.append((stack, f"http://127.0.0.1:{port}",
                            stack_server(model, copy, port, args, stack, db.parent / f"stack{k}.log")))
        for _, url, proc in servers:
            wait_ready(url, proc)
            load(url, data, 2.0, 4, 1)  # warm up
        rate, rounds = args.stack_rate, {stack: [] for stack, *_ in servers}
        for _ in range(args.stack_rounds):
            for stack, url, proc in servers:
                row = {"load_average": os.getloadavg()[0],
                       "trivial_8_clients": trivial(url, min(args.seconds, 3.0), 8, proc.pid, args.client),
                       "single_1_client": load(url, data, args.seconds, 1, 1, pid=proc.pid, kind=args.client),
                       "single_8_clients": load(url, data, args.seconds, 8, 1, pid=proc.pid, kind=args.client)}
                rate = rate or round(row["single_8_clients"]["images_per_second"] / 2, 1)
                before = server_latency(url)
                row["paced"] = paced(url, data, max(args.seconds, 8.0), rate, kind=args.client)
                row["paced"]["server_answered_within_ms"] = server_latency(url, before)
                rounds[stack].append(row)
    finally:
        for _, _, proc in servers:
            proc.terminate()
        for _, _, proc in servers:
            proc.wait(timeout=30)
    keys = ("requests_per_second", "images_per_second", "p50_ms", "p99_ms", "server_cpu_ms_per_request",
            "server_cpu_ms_per_image", "client_cpu_ms_per_request", "client_cpu_ms_per_image", "mean_inference_batch")
    medians = {stack: {m: {k: statistics.median(r[m][k] for r in rows) for k in keys if k in rows[0][m]}
                       for m in ("trivial_8_clients", "single_1_client", "single_8_clients", "paced")}
               for stack, rows in rounds.items()}
    return {"stacks": list(rounds), "paced_rate": rate, "rounds_each": args.stack_rounds, "medians": medians,
            "rounds": rounds}


# -------------------------------------------------------------------------------------- big bodies

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def big_request(url: str, path: str, size: int, chunked: bool, headers: dict[str, str]) -> dict:
    """One ``size``-byte body sent to ``path``; what the client read back (a status, or the error it got)."""
    chunk = b"x" * (1 << 20)

    def body():
        for _ in range(size >> 20):
            yield chunk

    t = time.perf_counter()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post(path, content=body() if chunked else chunk * (size >> 20), headers=headers)
        got = {"status": r.status_code, "detail": r.json().get("detail")}
    except httpx.HTTPError as exc:  # a reset is what the issue saw; it fails the scenario
        got = {"status": None, "error": f"{type(exc).__name__}: {exc}"}
    return {**got, "mb": size >> 20, "chunked": chunked, "seconds": round(time.perf_counter() - t, 2)}


def bodies(url: str, pid: int, bound_mb: float) -> dict:
    """The big bodies of issue 26 at once, with the server's resident memory sampled throughout."""
    json_h, png_h = {"Content-Type": "application/json"}, {"Content-Type": "image/png"}
    jobs = [("/v1/reviews", 120 << 20, False, json_h)] * 4 + [("/v1/reviews", 120 << 20, True, json_h),
                                                             ("/v1/predict", 200 << 20, False, png_h)]
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak below is this scenario's
    before = proc_status(pid)
    peak, done = [before["VmRSS"]], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(proc_status(pid)["VmRSS"])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: big_request(url, *j), jobs))
    done.set()
    sampler.join()
    after = proc_status(pid)
    growth = {"sampled_peak_rss_minus_before_mb": round((max(peak) - before["VmRSS"]) / 1024, 1),
              "vmhwm_after_minus_rss_before_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1)}
    worst = max(growth.values())
    return {"requests": answers, "rss_before_mb": round(before["VmRSS"] / 1024, 1),
            "rss_after_mb": round(after["VmRSS"] / 1024, 1), "samples": len(peak), **growth,
            "bound_mb": bound_mb, "every_client_read_413": all(a["status"] == 413 for a in answers),
            "within_bound": worst < bound_mb}


# ------------------------------------------------------------------------------------------- main

def med(rows: list[dict], *path: str) -> dict:
    picked = list(rows)
    for p in path:
        picked = [r[p] for r in picked]
    return {k: statistics.median(r[k] for r in picked) for k in picked[0]}


def start_server(model: Path, db: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    log_file = log.open("w")  # noqa: SIM115 - the server's stderr for its whole life
    return subprocess.Popen([sys.executable, "-m", "defectscope.cli", "serve", str(model), "--db", str(db),
                             "--port", str(port), "--threads", str(args.threads), "--runtime", args.runtime,
                             "--precision", args.precision, "--pilot", "--queue", "256"], env=env,
                            stdout=subprocess.DEVNULL, stderr=log_file)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="exported .onnx (default: train the tests' tiny model)")
    ap.add_argument("--arch", choices=["tiny", "lite0"], default="tiny",
                    help="without --model: the tests' tiny CNN or the demo's EfficientNet-Lite0 at 160 px")
    ap.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "openvino"],
                    help="both the Predictor and the service (default auto: what its record beside the model says)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "bf16", "fp16"])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="inference threads, both sides (default 2)")
    ap.add_argument("--rows", type=int, default=100_000, help="decisions in the store before the run (default 100k)")
    ap.add_argument("--slow", type=int, default=40, help="slow clients in the overload scenario (default 40)")
    ap.add_argument("--rss-bound-mb", type=float, default=50.0, help="bodies: the memory growth allowed (50 MB)")
    ap.add_argument("--scenarios", default="throughput,overload,bodies",
                    help="any of throughput,overload,bodies,stacks")
    ap.add_argument("--stacks", default=",".join(STACKS),
                    help="stacks scenario: http:loop:streams servers compared (default %(default)s)")
    ap.add_argument("--stack-rounds", type=int, default=3, help="stacks scenario: interleaved rounds (default 3)")
    ap.add_argument("--stack-rate", type=float, default=0.0,
                    help="stacks scenario: the open loop's rate for every stack (default: half the first's 8-client)")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="the throughput scenario's clients: a raw-socket HTTP/1.1 client (default, light) or httpx")
    ap.add_argument("--no-screenshot", action="store_true", help="skip the dashboard screenshot")
    ap.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from defectscope.machine import machine_record

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = Path(args.model) if args.model else tiny_model(work, args.arch)
    db = work / "station" / "results.db"
    db.parent.mkdir(parents=True)
    started = time.perf_counter()
    fill(db, args.rows)
    fill_seconds = round(time.perf_counter() - started, 1)
    data = images(64)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model, db, port, args, work / "serve.log")
    report: dict = {
        "benchmark": "defectscope serve on loopback: the Predictor alone vs the service, dashboards and slow "
                     "clients against predictions, big bodies against memory (PNG 300x300 gray, 64 images)",
        "model": str(model), "arch": None if args.model else args.arch, "runtime_asked": args.runtime,
        "precision_asked": args.precision, "threads": args.threads, "seconds_per_measurement": args.seconds,
        "rows_in_store": args.rows, "fill_seconds": fill_seconds, "machine": machine_record(),
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "note": "loopback only; shared 2-core machine (other sessions running): noisy; medians of 2 interleaved "
                "rounds; the clients run on the same 2 cores as the server",
        "client": args.client, "server_http": server_stack(),
        "server_inference_streams": server_streams(model, args.threads),
    }
    try:
        t = time.perf_counter()
        wait_ready(url, server)
        args.server_pid = server.pid
        report["server_ready_seconds"] = round(time.perf_counter() - t, 1)
        report["server_runtime"] = httpx.get(url + "/readyz").json()
        for name, run in (("throughput", lambda: throughput(url, model, args, data)),
                          ("overload", lambda: overload(url, args, data, db)),
                          ("bodies", lambda: bodies(url, server.pid, args.rss_bound_mb)),
                          ("stacks", lambda: stacks(model, args, data, db))):
            if name in scenarios:
                report[name] = run()
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # what is done so far
        if not args.no_screenshot:
            report["screenshot"] = dashboard_shot(url, data)
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = metrics.splitlines()
    report["server_error_lines"] = [x for x in lines if x.startswith("defectscope_server_errors_total")]
    count = next((float(x.split()[-1]) for x in lines if x.startswith("defectscope_batch_size_count ")), 0.0)
    total = next((float(x.split()[-1]) for x in lines if x.startswith("defectscope_batch_size_sum ")), 0.0)
    report["service_mean_inference_batch"] = round(total / count, 2) if count else None
    report["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary_of(report), indent=2))


def dashboard_shot(url: str, data: list[bytes]) -> str | None:
    """A few people's reviews, so the pilot panel has numbers, then the dashboard under load."""
    with httpx.Client(base_url=url) as c:
        for item in c.get("/v1/review/queue", params={"limit": 40}).json()["items"]:
            label = item["top_class"] if item["id"] % 7 else "GOOD"
            c.post("/v1/reviews", json={"decision_id": item["id"], "label": label, "reviewer": "bench"})
    loader = threading.Thread(target=load, args=(url, data, 6.0, 2, 1))
    loader.start()
    try:
        shot = screenshot(url, HERE / "results" / "dashboard.png")
    finally:
        loader.join()  # before the server stops, or the loader's requests are refused
    return "bench/results/dashboard.png" if shot else None


def summary_of(report: dict) -> dict:
    out = {}
    if "throughput" in report:
        t = report["throughput"]
        out["throughput"] = {k: t[k] for k in ("predictor_runtime", "predictor_alone", "bound", "service",
                                               "half_load_single_images", "half_load_where_the_time_goes_ms",
                                               "trivial_endpoint_8_clients", "cpu_ms_per_image", "targets")}
    if "overload" in report:
        out["overload"] = {k: v for k, v in report["overload"].items() if k != "rounds"}
    if "bodies" in report:
        out["bodies"] = report["bodies"]
    if "stacks" in report:
        out["stacks"] = report["stacks"]["medians"]
    return out


if __name__ == "__main__":
    main()
