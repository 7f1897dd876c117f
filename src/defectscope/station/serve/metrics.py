"""Prometheus-style metrics of the station, one registry per app, and the middleware that counts requests."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from defectscope.labels import DRIFT
from defectscope.station.serve.limits import BodyTooLarge

__all__ = ["Metrics", "observe_requests"]


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


def observe_requests(metrics: Metrics) -> Callable[[Request, Callable], Awaitable[Response]]:
    """The HTTP middleware counting and timing every request by its route template (``other`` when no route
    matched)."""

    async def observe(request: Request, call_next: Callable) -> Response:
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except BodyTooLarge:
            response = JSONResponse({"detail": "request body too large"}, status_code=413)
        route = request.scope.get("route")
        name = getattr(route, "path", "other")
        metrics.requests.labels(name, request.method, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    return observe
