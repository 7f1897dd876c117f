"""Prometheus-style metrics of the station, one registry per app, and the middleware that counts requests.

Several ``serve`` processes on one machine (replicas behind one proxy) share one metrics folder: start each with
the same ``PROMETHEUS_MULTIPROC_DIR`` (an existing folder, emptied before the first replica starts), and
prometheus-client's multiprocess mode keeps each process's values in files there. Then ``/metrics`` of any
replica answers for all of them: counters and histograms summed over every process that ever wrote (a killed one
included, so counts never go back), the queue depth summed over the live processes, the review-queue depth (the
store's one number) the largest any live process saw, and the Drift rate per process (label ``pid``). Replicas on
other machines are scraped one by one; Prometheus sums them (``sum by (...)``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from defectscope.labels import DRIFT
from defectscope.station.serve.limits import send_json

__all__ = ["Metrics", "ObserveRequests", "shared_dir"]

log = logging.getLogger(__name__)


def shared_dir() -> str | None:
    """The metrics folder shared by the processes of this machine (``PROMETHEUS_MULTIPROC_DIR``), or None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """What ``/metrics`` shows. The two depths are read when scraped, through the callables given (in
    multiprocess mode also every :data:`REFRESH_SECONDS`, so that another replica's scrape sees them)."""

    REFRESH_SECONDS = 1.0

    def __init__(self, batcher_depth: Callable[[], int], review_depth: Callable[[], int]) -> None:
        self.shared = shared_dir()
        if self.shared is not None and not os.path.isdir(self.shared):
            raise ValueError(f"PROMETHEUS_MULTIPROC_DIR={self.shared}: no such folder; create it (empty) before "
                             "starting the first replica")
        self.registry = r = CollectorRegistry()
        self.requests = Counter("defectscope_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("defectscope_request_seconds", "HTTP request latency", ["route"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.decisions = Counter("defectscope_decisions", "Decisions by kind (class, REVIEW, Drift)",
                                 ["decision"], registry=r)
        self.images = Counter("defectscope_images", "Images classified", registry=r)
        self.server_errors = Counter("defectscope_server_errors", "Answers of 5xx (500: a bug, 503: overload)",
                                     ["route", "status"], registry=r)
        self.rejected = Counter("defectscope_rejected", "Requests refused", ["reason"], registry=r)
        self.batch = Histogram("defectscope_batch_size", "Images per inference call", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.infer = Histogram("defectscope_inference_seconds", "Inference time per batch", registry=r)
        self.reloads = Counter("defectscope_model_reloads", "Model reload attempts", ["result"], registry=r)
        self.recent: deque[bool] = deque(maxlen=500)
        self._gauges = [
            (Gauge("defectscope_queue_depth", "Images accepted and not yet answered", registry=r,
                   multiprocess_mode="livesum"), batcher_depth),
            (Gauge("defectscope_review_queue_depth", "Decisions waiting for a person", registry=r,
                   multiprocess_mode="livemax"), review_depth),
            (Gauge("defectscope_drift_rate", "Share of Drift decisions among the last 500", registry=r,
                   multiprocess_mode="liveall"), self._drift_rate)]
        self._stop = threading.Event()
        if self.shared is None:
            for gauge, read in self._gauges:
                gauge.set_function(read)
        else:
            # A function gauge is read in the process that is scraped only: write the values to the shared
            # files instead, often enough for a scrape of any replica.
            threading.Thread(target=self._refresh_loop, name="metrics-refresh", daemon=True).start()

    def _drift_rate(self) -> float:
        return (sum(self.recent) / len(self.recent)) if self.recent else 0.0

    def _refresh(self) -> None:
        for gauge, read in self._gauges:
            try:
                gauge.set(read())
            except Exception:  # a depth read before startup or during shutdown: keep the last value
                log.debug("metrics refresh of %s failed", gauge, exc_info=True)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.REFRESH_SECONDS):
            self._refresh()

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or in multiprocess mode of every process sharing the folder."""
        if self.shared is None:
            return generate_latest(self.registry)
        self._refresh()
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.shared)
        return generate_latest(merged)

    def close(self) -> None:
        """Stop refreshing; in multiprocess mode drop this process's live gauges (its counters stay summed)."""
        self._stop.set()
        if self.shared is not None:
            multiprocess.mark_process_dead(os.getpid(), self.shared)

    def on_reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def on_batch(self, n: int, seconds: float) -> None:
        self.batch.observe(n)
        self.infer.observe(seconds)

    def count_decision(self, decision: str) -> None:
        self.decisions.labels(decision).inc()
        self.images.inc()
        self.recent.append(decision == DRIFT)


class ObserveRequests:
    """Pure ASGI middleware counting and timing every request by its route template (``other`` when no route
    matched). An exception no handler caught is logged, answered 500 (a fixed message: nothing of the request is
    echoed) and counted, in ``defectscope_requests`` by status and in ``defectscope_server_errors``."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0  # 0: the client left before any answer

        async def observed(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        except Exception:
            log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
            started, status = status != 0, 500
            if started:
                raise  # the answer is under way: nothing to send but a broken connection
            await send_json(send, 500, "internal error: the station's log has the details")
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            if status >= 500:
                self.metrics.server_errors.labels(route, str(status)).inc()
