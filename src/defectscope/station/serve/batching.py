"""Micro-batching of inference and group commit of the rows: one thread each, shared by every request.

A request's images go from the thread that decoded them to its committed rows without a hop through the event
loop in between (:class:`PendingRequest`): the inference thread hands each batch's results on, the store-writer
thread builds the rows (and their heatmaps) and commits every request that is ready in one transaction; the
event loop only sees the request again when its rows are durable.
"""

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

__all__ = ["Batcher", "GroupCommit", "PendingRequest", "QueueFull"]

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
                 on_batch: Callable[[int, float], None], deliver: threading.Lock | None = None,
                 streams: int = 1) -> None:
        self.models, self.max_batch, self.wait, self.max_queue = models, max_batch, wait_ms / 1000, max_queue
        self.on_batch = on_batch
        # Held while a batch's results are handed out (GroupCommit.gate): the writer then sees the whole batch
        # at once and commits its rows in one transaction instead of the first request's alone.
        self._deliver = deliver or threading.Lock()
        self.depth = 0
        self.incoming = 0  # reserved, not yet submitted (being decoded)
        self._lock = threading.Lock()
        self._q: queue.Queue[_Job | None] = queue.Queue()
        # One thread per inference stream, each running its own Predictor of the model (LoadedModel.streams):
        # a request that arrives while one stream is busy starts at once on another.
        self._threads = [threading.Thread(target=self._run, args=(k,), name=f"inference-{k}" if k else "inference",
                                          daemon=True) for k in range(streams)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=10)

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

    def _run(self, stream: int = 0) -> None:
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
            self._infer(batch, stream)

    def _infer(self, batch: list[_Job], stream: int = 0) -> None:
        model = self.models.current  # one model for the whole batch: each row names it
        p = model.streams[stream % len(model.streams)]
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
        with self._deliver:
            for job, pred in zip(batch, preds, strict=True):
                job.future.set_result((pred, model))


Rows = list[dict[str, Any]]


class GroupCommit:
    """One thread writes every request's rows: what gathered while the previous commit ran goes in one
    transaction, so concurrent requests share one fsync instead of queueing for one each. A failed group is
    retried request by request, so one bad request cannot fail the others. A request may hand over a function
    that builds its rows: it runs here, off the event loop and off the inference thread."""

    def __init__(self, store: Store, max_requests: int = 64) -> None:
        self.store, self.max_requests = store, max_requests
        self.gate = threading.Lock()  # the Batcher's deliver lock: a batch's requests arrive together
        self._q: queue.Queue[tuple[Rows | Callable[[], Rows], Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def submit(self, records: Rows | Callable[[], Rows]) -> Future:
        """Commit ``records`` (or what the function returns); the future holds their ids once durable."""
        future: Future = Future()
        self._q.put((records, future))
        return future

    def _run(self, stream: int = 0) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            group = [item]
            with self.gate:  # the rest of an inference batch being handed out: wait for it
                pass
            while len(group) < self.max_requests:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                group.append(nxt)
            self._write(_built(group))

    def _write(self, group: list[tuple[Rows, Future]]) -> None:
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


def _built(group: list[tuple[Rows | Callable[[], Rows], Future]]) -> list[tuple[Rows, Future]]:
    """The group's rows, built now where a request handed over a builder; a builder that fails fails its own
    request only."""
    out = []
    for records, future in group:
        if callable(records):
            try:
                records = records()
            except Exception as exc:
                log.exception("building the rows of a request failed")
                future.set_exception(exc)
                continue
        out.append((records, future))
    return out


class PendingRequest:
    """One request's images on their way from its decode thread to its committed rows.

    :meth:`submit` puts each decoded image into the batcher; each result arrives on the inference thread,
    :meth:`filed` (or :meth:`failed`) comes from the decode thread. When every piece is in, ``build(paths,
    results)`` makes the rows on the store-writer thread, which commits them. ``done`` resolves with
    ``(records, results, ids)``, or with the first error, only once every submitted image has left the batcher:
    then, and not before, the request's places in the queue are given back.
    """

    def __init__(self, n: int, batcher: Batcher, writer: GroupCommit,
                 build: Callable[[list[Any], list[tuple[Any, Any]]], Rows]) -> None:
        self.n, self.batcher, self.writer, self.build = n, batcher, writer, build
        self.submitted = 0
        self.done: Future = Future()
        self._results: list[Any] = [None] * n
        self._paths: list[Any] = []
        self._records: Rows = []
        self._error: BaseException | None = None
        self._left = n + 1  # each image's result, and the filing
        self._lock = threading.Lock()

    def submit(self, data: bytes, x: np.ndarray, decode_ms: float, metadata: dict[str, str] | None) -> None:
        i = self.submitted
        future = self.batcher.submit(data, x, decode_ms, metadata)
        self.submitted += 1
        future.add_done_callback(lambda f: self._image(i, f))

    def filed(self, paths: list[Any]) -> None:
        self._paths = paths
        self._piece(None)

    def failed(self, exc: BaseException) -> None:
        """Decoding or filing failed: the images not submitted yet never will be."""
        with self._lock:
            self._left -= self.n - self.submitted
        self._piece(exc)

    def _image(self, i: int, future: Future) -> None:
        exc = future.exception()
        if exc is None:
            self._results[i] = future.result()
        self._piece(exc)

    def _piece(self, exc: BaseException | None) -> None:
        with self._lock:
            if exc is not None and self._error is None:
                self._error = exc
            self._left -= 1
            last = self._left == 0
        if not last:
            return
        if self._error is not None:
            self._settle(None, self._error)
            return
        self.writer.submit(self._build).add_done_callback(self._committed)

    def _build(self) -> Rows:
        self._records = self.build(self._paths, self._results)
        return self._records

    def _committed(self, future: Future) -> None:
        exc = future.exception()
        self._settle(None if exc else (self._records, self._results, future.result()), exc)

    def _settle(self, result: Any, exc: BaseException | None) -> None:
        self.batcher.release(self.n, self.n - self.submitted)
        if exc is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result(result)
