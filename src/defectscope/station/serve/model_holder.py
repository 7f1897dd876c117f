"""The running model: loaded, checked on a blank image, and swapped for a new file at the model path."""

from __future__ import annotations

import hashlib
import logging
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
from defectscope.station.store import utc_now

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

    def info(self) -> dict[str, Any]:
        """What the station says about its model: never the file's path on the server."""
        return {"id": self.model_id, "version": self.model_version, "classes": self.predictor.classes,
                "good_class": self.good_class, "drift_rate": self.drift_rate, "loaded_at": self.loaded_at,
                **({"metadata_inputs": self.predictor.metadata_encoder.to_spec()}
                   if self.predictor.metadata_encoder else {})}


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def load_model(path: Path, threads: int | None = None, max_pixels: int = 50_000_000,
               **runtime: str) -> LoadedModel:
    """Load and check a model: it must run on a blank image and give finite probabilities summing to 1.

    Raises ``ValueError`` (or the loader's error) for a file that is not a usable defectscope model, and
    ``RuntimeError`` when the file changed while it was read (a copy still in progress).
    """
    sig = _signature(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # runtime: runtime=, precision=, device= as for the sorter (--runtime auto measures once per machine).
    predictor = Predictor(path, threads=threads, decode_threads=1, max_pixels=max_pixels, heatmaps=True, **runtime)
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
                       good, float(rate) if rate is not None else None)


class ModelHolder:
    """The running model, swapped atomically when a new file at the model path passes :func:`load_model`."""

    def __init__(self, path: Path, threads: int | None, max_pixels: int, poll: float,
                 on_reload: Callable[[str], None], runtime: dict[str, str] | None = None) -> None:
        self.path, self.threads, self.max_pixels, self.poll = path, threads, max_pixels, poll
        self.runtime = dict(runtime or {})
        self.current = load_model(path, threads, max_pixels, **self.runtime)
        self.on_reload = on_reload
        self.last_error: str | None = None
        self._rejected: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="model-reload", daemon=True)

    def start(self) -> None:
        if self.poll > 0:
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
        try:
            new = load_model(self.path, self.threads, self.max_pixels, **self.runtime)
        except Exception as exc:  # any failure keeps the old model serving; the error is shown in /readyz
            self._rejected = sig
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("model reload rejected, still serving %s: %s", self.current.model_id, self.last_error)
            self.on_reload("rejected")
            return False
        old, self.current, self.last_error = self.current, new, None
        log.info("model reloaded: %s -> %s", old.model_id, new.model_id)
        self.on_reload("loaded")
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self.check()
