"""The running model: loaded, checked on a blank image, and swapped for a new file at the model path.

Several replicas on one store run one model. The store's ``model_generations`` says which: a replica that loads
a new model (its file changed, or ``POST /v1/model/reload`` asked it) writes a generation, and every replica
polls the newest one. A replica whose model is not the station's loads its own model file at once (a shared or
copied file need not wait for its change to be seen) and takes it if the file holds that model; otherwise it
keeps serving what it has, says so in ``behind`` and ``/readyz`` answers 503 until its file holds the station's
model, so that a load balancer sends it nothing. A replica that starts on another model than the station's does
not change the station's: only a change seen while running, or a reload asked of it, does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectscope import labels
from defectscope.runtime.predictor import Predictor
from defectscope.station.store import Store, utc_now

__all__ = ["LoadedModel", "ModelHolder", "load_model"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    predictor: Predictor
    model_id: str  # first 16 hex of the file's SHA-256, as the sorter records it
    model_version: str
    signature: tuple[int, int, int]
    good_class: str
    drift_rate: float | None
    loaded_at: str = field(default_factory=utc_now)
    # One Predictor per inference stream (the first is ``predictor``): each stream's thread runs its own.
    streams: list[Predictor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.streams:
            self.streams = [self.predictor]

    def info(self) -> dict[str, Any]:
        """What the station says about its model: never the file's path on the server."""
        return {"id": self.model_id, "version": self.model_version, "classes": self.predictor.classes,
                "good_class": self.good_class, "drift_rate": self.drift_rate, "loaded_at": self.loaded_at,
                **({"metadata_inputs": self.predictor.metadata_encoder.to_spec()}
                   if self.predictor.metadata_encoder else {})}


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def load_model(path: Path, threads: int | None = None, max_pixels: int = 50_000_000, streams: int = 1,
               **runtime: str) -> LoadedModel:
    """Load and check a model: it must run on a blank image and give finite probabilities summing to 1.
    ``streams`` Predictors of the file share ``threads`` inference threads (at least one each).

    Raises ``ValueError`` (or the loader's error) for a file that is not a usable defectscope model, and
    ``RuntimeError`` when the file changed while it was read (a copy still in progress).
    """
    sig = _signature(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # runtime: runtime=, precision=, device= as for the sorter (--runtime auto measures once per machine).
    each = max(1, (threads or os.cpu_count() or 1) // streams) if streams > 1 else threads
    predictors = [Predictor(path, threads=each, decode_threads=1, max_pixels=max_pixels, heatmaps=True, **runtime)
                  for _ in range(streams)]
    predictor = predictors[0]
    if _signature(path) != sig or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise RuntimeError(f"{path} changed while it was loaded")
    blank = np.zeros((1, 1, predictor.image_size, predictor.image_size), np.float32)
    encoder = predictor.metadata_encoder
    # A blank metadata vector beside the blank image: this only checks that the graph runs and normalises.
    pred = predictor.infer_arrays(blank, metadata=np.zeros((1, encoder.dim), np.float32) if encoder else None)[0]
    total = sum(pred.probabilities.values())
    if not pred.probabilities or not all(np.isfinite(list(pred.probabilities.values()))) or abs(total - 1) > 1e-3:
        raise ValueError(f"{path}: the model's probabilities on a blank image are not a distribution ({total})")
    spec, prov, policy = predictor.spec, predictor.provenance or {}, predictor.policy or {}
    version = prov.get("defectscope_version") or spec.get("defectscope_version")
    classes = predictor.classes
    good = labels.good_class_of(classes, policy)
    if good is None:
        good = classes[0]
        log.warning("%s: no calibrated good class and no class named like GOOD (%s): the station counts %r as "
                    "passing; calibrate the model with --good-class", path, "/".join(labels.GOOD_NAMES), good)
    drift = policy.get("drift") or {}
    rate = drift.get("target_false_flag_rate") if policy.get("drift_threshold") is not None else None
    return LoadedModel(predictor, digest[:16], f"defectscope {version}, model created {spec.get('created')}", sig,
                       good, float(rate) if rate is not None else None, streams=predictors)


class ModelHolder:
    """The running model, swapped atomically when a new file at the model path passes :func:`load_model`, and
    kept on the station's model generation when a ``store`` is given."""

    def __init__(self, path: Path, threads: int | None, max_pixels: int, poll: float,
                 on_reload: Callable[[str], None], runtime: dict[str, str] | None = None, *,
                 store: Store | None = None, replica: str = "", generation_poll: float = 0.0,
                 streams: int = 1) -> None:
        self.path, self.threads, self.max_pixels, self.poll = path, threads, max_pixels, poll
        self.runtime, self.streams = dict(runtime or {}), streams
        self.current = load_model(path, threads, max_pixels, streams, **self.runtime)
        self.on_reload = on_reload
        self.last_error: str | None = None
        self.store, self.replica, self.generation_poll = store, replica, generation_poll
        self.generation: dict[str, Any] | None = None  # the station's newest model generation, as last read
        self.behind: str | None = None  # why this replica does not run the station's model
        self._rejected: tuple[int, int, int] | None = None
        self._tried: tuple[int, tuple[int, int, int]] | None = None  # (generation, file) already tried
        self._lock = threading.Lock()  # one load at a time: the watch thread and a reload request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="model-reload", daemon=True)

    def start(self) -> None:
        if self.store is not None:
            if self.store.latest_model() is None:  # the first replica on a new store names the station's model
                self.store.publish_model(self.current.model_id, self.replica)
            self.follow()
        if self.poll > 0 or (self.store is not None and self.generation_poll > 0):
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """Load the file at the model path if it changed and settled; True when the model was replaced."""
        try:
            sig = _signature(self.path)
        except OSError:
            return False  # moved away mid-replace: keep serving the loaded model
        if sig == self.current.signature or sig == self._rejected:
            return False
        time.sleep(min(self.poll, 0.5))  # a copy in progress keeps changing: wait for it to settle
        with suppress(OSError):
            if _signature(self.path) != sig:
                return False
        with self._lock:
            new = self._load(sig)
            if new is None:
                return False
            self._swap(new)
        self._publish()
        return True

    def reload(self) -> dict[str, Any]:
        """``POST /v1/model/reload``: load the model file now, changed or not, and make it the station's model
        (every replica follows). Raises ``ValueError`` with the reason when the file is not a usable model; the
        running model keeps serving."""
        with self._lock:
            new = self._load(_signature(self.path))
            if new is None:
                raise ValueError(f"the model file was not loaded, still serving {self.current.model_id}: "
                                 f"{self.last_error}")
            if new.model_id != self.current.model_id:
                self._swap(new)
        self._publish()
        return {"model": self.current.info(), "generation": (self.generation or {}).get("id"),
                "replica": self.replica}

    def follow(self) -> None:
        """Read the station's newest generation; load this replica's model file when the station runs another
        model, and take it when it holds that model (else say so in :attr:`behind`)."""
        if self.store is None:
            return
        latest = self.store.latest_model()
        self.generation = latest
        if latest is None or latest["model_id"] == self.current.model_id:
            self.behind = None
            return
        with suppress(OSError):
            sig = _signature(self.path)
            if self._tried != (latest["id"], sig):  # try each file once per generation
                self._tried = (latest["id"], sig)
                holds = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16] == latest["model_id"]
                with self._lock:
                    new = self._load(sig, quiet=True) if holds else None
                    if new is not None and new.model_id == latest["model_id"]:
                        log.info("following the station's model generation %s (%s)", latest["id"], new.model_id)
                        self._swap(new)
                        self.behind = None
                        return
        self.behind = (f"the station runs model {latest['model_id']} (generation {latest['id']}, loaded by "
                       f"{latest['replica']}); this replica runs {self.current.model_id} and its model file holds "
                       "another: copy the station's model files to this replica's model path")

    def _load(self, sig: tuple[int, int, int], quiet: bool = False) -> LoadedModel | None:
        try:
            return load_model(self.path, self.threads, self.max_pixels, self.streams, **self.runtime)
        except Exception as exc:  # any failure keeps the old model serving; the error is shown in /readyz
            self._rejected = sig
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("model reload rejected, still serving %s: %s", self.current.model_id, self.last_error)
            if not quiet:
                self.on_reload("rejected")
            return None

    def _swap(self, new: LoadedModel) -> None:
        old, self.current, self.last_error = self.current, new, None
        log.info("model reloaded: %s -> %s", old.model_id, new.model_id)
        self.on_reload("loaded")

    def _publish(self) -> None:
        """Make the running model the station's, unless it already is."""
        if self.store is None:
            return
        latest = self.store.latest_model()
        if latest is None or latest["model_id"] != self.current.model_id:
            self.store.publish_model(self.current.model_id, self.replica)
        self.follow()

    def _watch(self) -> None:
        polls = [p for p in (self.poll, self.generation_poll if self.store is not None else 0) if p > 0]
        step = min(polls)
        next_file = next_gen = time.monotonic()
        while not self._stop.wait(step):
            now = time.monotonic()
            try:
                if self.poll > 0 and now >= next_file:
                    next_file = now + self.poll
                    self.check()
                if self.store is not None and self.generation_poll > 0 and now >= next_gen:
                    next_gen = now + self.generation_poll
                    self.follow()
            except Exception:  # a database outage must not end the watch: the next poll tries again
                log.exception("model watch failed; trying again in %.1f s", step)
