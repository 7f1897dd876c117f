"""Prometheus-style metrics of the station, one registry per app, and the middleware that counts requests."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from defectscope.labels import DRIFT
from defectscope.station.serve.limits import send_json

__all__ = ["Metrics", "ObserveRequests"]

log = logging.getLogger(__name__)


class Metrics:
    """What ``/metrics`` shows. The two depths are read when scraped, through the callables given."""

    def __init__(self, batcher_depth: Callable[[], int], review_depth: Callable[[], int]) -> None:
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
        Gauge("defectscope_queue_depth", "Images accepted and not yet answered", registry=r).set_function(
            batcher_depth)
        Gauge("defectscope_review_queue_depth", "Decisions waiting for a person", registry=r).set_function(
            review_depth)
        Gauge("defectscope_drift_rate", "Share of Drift decisions among the last 500", registry=r).set_function(
            lambda: (sum(self.recent) / len(self.recent)) if self.recent else 0.0)

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
