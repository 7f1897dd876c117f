"""What the routes share: the configuration, the metrics and, from startup to shutdown, the store, the
running model and the two worker threads. One per app, on ``app.state.services``; a route asks for it with a
parameter typed :data:`ServicesDep`."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Annotated, Any

from fastapi import Depends, Request

from defectscope.station.serve.batching import Batcher, GroupCommit
from defectscope.station.serve.config import ServeConfig, inference_streams
from defectscope.station.serve.metrics import Metrics
from defectscope.station.serve.model_holder import ModelHolder
from defectscope.station.store import Store

__all__ = ["Services", "ServicesDep", "get_services"]

log = logging.getLogger(__name__)


class Services:
    """The station's moving parts. ``store``, ``models``, ``batcher`` and ``writer`` exist between
    :meth:`open` and :meth:`close` only, so that an app can be built (and its OpenAPI read) without a model."""

    store: Store
    models: ModelHolder
    batcher: Batcher
    writer: GroupCommit

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        # Decisions waiting for a person: counted by the store on startup and by each review-queue read,
        # kept current by the routes in between so that /metrics never queries the database.
        self.review_depth = 0
        self.metrics = Metrics(self._queue_depth, lambda: self.review_depth)
        # The dashboard: one computation at a time, answers shared for a moment (routes/dashboard.py).
        self.dashboard_gate = asyncio.Lock()
        self.dashboard_cache: dict[tuple, tuple[float, dict[str, Any]]] = {}
        self.dashboard_next = 0.0  # monotonic time before which no new dashboard computation starts

    def _queue_depth(self) -> int:
        batcher = self.__dict__.get("batcher")  # scraped before startup: nothing queued
        return batcher.depth if batcher is not None else 0

    def open(self) -> None:
        """Open the store, load the model and start the inference, store-writer and reload threads."""
        config = self.config
        streams = inference_streams(config)
        store = Store(config.db)
        models = ModelHolder(config.model, config.threads, config.max_pixels, config.reload_poll_seconds,
                             self.metrics.on_reload,
                             runtime={"runtime": config.runtime, "precision": config.precision,
                                      "device": config.device},
                             store=store, replica=config.replica or "", generation_poll=config.generation_poll_seconds,
                             streams=streams)
        writer = GroupCommit(store)
        batcher = Batcher(models, config.max_batch, config.batch_wait_ms, config.max_queue, self.metrics.on_batch,
                          deliver=writer.gate, streams=streams)
        self.store, self.models, self.batcher, self.writer = store, models, batcher, writer
        self.review_depth = store.review_queue(limit=0)[1]
        (config.data / "images").mkdir(parents=True, exist_ok=True)
        batcher.start()
        writer.start()
        models.start()
        # What startup made (the model, the app, the libraries: over 100k objects) lives as long as the process:
        # out of the collector's reach, a full collection no longer walks it (30 ms, a p99 spike at half load).
        gc.freeze()
        log.info("station ready: model %s (%d inference stream%s), store %r, data %s", models.current.model_id, streams,
                 "s" if streams > 1 else "", store, config.data)

    def close(self) -> None:
        self.models.stop()
        self.batcher.stop()
        self.writer.stop()
        self.store.close()
        self.metrics.close()


async def get_services(request: Request) -> Services:
    # async: FastAPI would run a plain function in a worker thread, a hop per request for an attribute read.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
