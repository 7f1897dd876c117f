"""Micro-batching of inference and group commit of the rows: one thread each, shared by every request."""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from defectscope.station.serve.model_holder import ModelHolder
from defectscope.station.store import Store

__all__ = ["Batcher", "GroupCommit", "QueueFull"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    data: bytes
    x: np.ndarray
    decode_ms: float
    future: Future
    metadata: dict[str, str] | None = None  # the request's metadata input values (models that take them)


class QueueFull(Exception):
    pass


class Batcher:
    """Micro-batching: request handlers submit decoded images; one thread runs them in batches.

    ``depth`` counts images accepted and not yet answered (queued or in inference); ``reserve`` refuses
    new ones beyond ``max_queue`` so a burst gets a fast 503 rather than an ever longer wait.
    """

    def __init__(self, models: ModelHolder, max_batch: int, wait_ms: float, max_queue: int,
                 on_batch: Callable[[int, float], None]) -> None:
        self.models, self.max_batch, self.wait, self.max_queue = models, max_batch, wait_ms / 1000, max_queue
        self.on_batch = on_batch
        self.depth = 0
        self.incoming = 0  # reserved, not yet submitted (being decoded)
        self._lock = threading.Lock()
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def reserve(self, n: int) -> None:
        with self._lock:
            if self.depth + n > self.max_queue:
                raise QueueFull
            self.depth += n
            self.incoming += n

    def release(self, n: int, unsubmitted: int = 0) -> None:
        """Give back ``n`` reserved places, ``unsubmitted`` of which never reached :meth:`submit`."""
        with self._lock:
            self.depth -= n
            self.incoming -= unsubmitted

    def submit(self, data: bytes, x: np.ndarray, decode_ms: float, metadata: dict[str, str] | None = None) -> Future:
        job = _Job(data, x, decode_ms, Future(), metadata)
        with self._lock:
            self.incoming -= 1
        self._q.put(job)
        return job.future

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.wait
            # Wait for companions only while more images are accepted than gathered (other requests are
            # still decoding theirs): a lone request goes straight to inference, a burst shares one call.
            while len(batch) < self.max_batch and (self.incoming > 0 or not self._q.empty()):
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            self._infer(batch)

    def _infer(self, batch: list[_Job]) -> None:
        model = self.models.current  # one model for the whole batch: each row names it
        p = model.predictor
        try:
            xs = []
            for job in batch:
                # Decoded for the previous model before a reload with another input size: decode again.
                if job.x.shape[-1] != p.image_size or job.x.shape[-2] != p.image_size:
                    job.x = p.preprocess(job.data)
                xs.append(job.x)
            # Encoded here, for the model that runs the batch (the handler checked them against the model then).
            meta = np.stack([p.encode_metadata(j.metadata) for j in batch]) if p.metadata_encoder else None
            start = time.perf_counter()
            preds = p.infer_arrays(np.stack(xs), decode_ms=[j.decode_ms for j in batch], metadata=meta)
            self.on_batch(len(batch), time.perf_counter() - start)
        except Exception as exc:  # answer every waiting request; the thread must survive any one batch
            log.exception("inference failed for a batch of %d", len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, pred in zip(batch, preds, strict=True):
            job.future.set_result((pred, model))


class GroupCommit:
    """One thread writes every request's rows: what gathered while the previous commit ran goes in one
    transaction, so concurrent requests share one fsync instead of queueing for one each. A failed group is
    retried request by request, so one bad request cannot fail the others."""

    def __init__(self, store: Store, max_requests: int = 64) -> None:
        self.store, self.max_requests = store, max_requests
        self._q: queue.Queue[tuple[list[dict[str, Any]], Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def submit(self, records: list[dict[str, Any]]) -> Future:
        future: Future = Future()
        self._q.put((records, future))
        return future

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            group = [item]
            while len(group) < self.max_requests:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                group.append(nxt)
            self._write(group)

    def _write(self, group: list[tuple[list[dict[str, Any]], Future]]) -> None:
        try:
            ids = self.store.add_decisions([r for records, _ in group for r in records])
        except Exception:
            if len(group) > 1:
                for one in group:
                    self._write([one])
                return
            group[0][1].set_exception(sys.exc_info()[1] or RuntimeError("store write failed"))
            return
        start = 0
        for records, future in group:
            future.set_result(ids[start:start + len(records)])
            start += len(records)
