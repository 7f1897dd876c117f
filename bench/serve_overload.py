"""The station under dashboard load and slow clients (issue 26), on loopback, bounded in rows, clients and time.

A results database is filled with ``--rows`` decisions spread over 31 days, then ``defectscope serve`` (the real
CLI, a subprocess) is driven by 4 prediction clients (single PNG uploads) in three conditions, interleaved
(alone, dashboards, slow clients, alone, ...) because the machine is shared:

* alone;
* while 4 dashboard clients refresh without pause, each asking a different window (31 days / 15 min, 7 days /
  5 min, 48 h / 1 min, 24 h / 1 min: the largest the station allows, so its cache is no help);
* while ``--slow`` clients hold connections: half idle, half trickling a request head a byte every 0.5 s.

It records the throughput ratio against "alone" (target >= 0.80), what the hostile dashboard query of the
issue (``hours=744&bucket_minutes=1``) now gets, and how long the slow connections lived.

    python bench/serve_overload.py [--rows 100000] [--seconds 6] [--slow 40]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from serve import free_port, images, load, tiny_model, wait_ready

from defectscope.machine import speed_flags

HERE = Path(__file__).resolve().parent
WINDOWS = ((744, 15), (168, 5), (48, 1), (24, 1))


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
                              "total_ms": rng.uniform(5, 50), "needs_review": kind in ("REVIEW", "Drift")})
            conn.execute(sa.insert(decisions), batch)


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
            s, t = socket.create_connection((host, int(port)), timeout=30), time.perf_counter()
            try:
                while not stop.is_set():
                    if k % 2:
                        s.sendall(b"G")  # a head trickling in
                        time.sleep(0.5)
                    elif s.recv(1) == b"":  # idle: wait to be closed
                        break
            except OSError:
                pass
            finally:
                lives.append(time.perf_counter() - t)
                s.close()

    return [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]


def measure(url: str, data: list[bytes], seconds: float, background: list[threading.Thread],
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="decisions in the database (default 100k)")
    ap.add_argument("--seconds", type=float, default=6.0, help="per measurement (default 6)")
    ap.add_argument("--slow", type=int, default=40, help="slow clients (default 40)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_overload.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    model = tiny_model(work)
    db = work / "station" / "results.db"
    db.parent.mkdir(parents=True)
    started = time.perf_counter()
    fill(db, args.rows)
    fill_seconds = time.perf_counter() - started
    data = images(64)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    log_file = (work / "serve.log").open("w")  # noqa: SIM115 - the server's stderr for its whole life
    server = subprocess.Popen([sys.executable, "-m", "defectscope.cli", "serve", str(model), "--db", str(db),
                               "--port", str(port), "--threads", str(args.threads), "--queue", "256"], env=env,
                              stdout=subprocess.DEVNULL, stderr=log_file)
    rounds: list[dict] = []
    try:
        wait_ready(url, server)
        t = time.perf_counter()
        hostile = httpx.get(url + "/v1/dashboard", params={"hours": 744, "bucket_minutes": 1}, timeout=120)
        hostile_info = {"status": hostile.status_code, "seconds": round(time.perf_counter() - t, 3),
                        "bytes": len(hostile.content), "detail": hostile.json().get("detail")}
        load(url, data, 2.0, 4, 1)  # warm up
        for _ in range(2):
            row: dict = {"alone": load(url, data, args.seconds, 4, 1)}
            stop, times = threading.Event(), []
            row["with_4_dashboards"] = measure(url, data, args.seconds, dashboards(url, stop, times), stop)
            row["dashboard_answers"] = len(times)
            row["dashboard_p50_ms"] = round(1000 * statistics.median(times), 1) if times else None
            row["dashboard_max_ms"] = round(1000 * max(times), 1) if times else None
            stop, lives = threading.Event(), []
            row[f"with_{args.slow}_slow_clients"] = measure(url, data, args.seconds,
                                                            slow_clients(url, args.slow, stop, lives), stop)
            row["slow_connection_max_life_s"] = round(max(lives), 2) if lives else None
            row["slow_connections_opened"] = len(lives)
            rounds.append(row)
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)

    def ratio(key: str) -> float:
        return round(statistics.median(r[key]["images_per_second"] / r["alone"]["images_per_second"]
                                       for r in rounds), 3)

    errors = [x for x in metrics.splitlines() if x.startswith("defectscope_server_errors_total")]
    report = {
        "benchmark": "4 prediction clients (single 300x300 PNG) alone, with 4 dashboards refreshing, with slow "
                     "clients; tiny model, SQLite",
        "rows_in_database": args.rows, "fill_seconds": round(fill_seconds, 1), "seconds_per_measurement": args.seconds,
        "dashboard_windows": [{"hours": h, "bucket_minutes": b} for h, b in WINDOWS],
        "hostile_dashboard_query": hostile_info,
        "throughput_ratio_with_4_dashboards": ratio("with_4_dashboards"),
        f"throughput_ratio_with_{args.slow}_slow_clients": ratio(f"with_{args.slow}_slow_clients"),
        "target_ratio": 0.80, "server_error_lines": errors, "rounds": rounds,
        "cpu_count": os.cpu_count(), "cpu_flags": speed_flags(), "load_average_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python bench/serve_overload.py " + " ".join(sys.argv[1:]),
        "note": "loopback only; shared 2-core machine (other sessions running): noisy, medians of 2 rounds",
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("rounds", "cpu_flags")}, indent=2))


if __name__ == "__main__":
    main()
