"""Classify images with an exported model: ONNX Runtime or OpenVINO, numpy and Pillow only, never torch.

Preprocessing is :func:`defectscope.data.images.load_gray` with the run's size and resize mode, then
``uint8 / 255`` - exactly what training cached and fed - so deployed and trained models see identical
pixels. Everything else (classes, input size, policy) is read from the ONNX file's metadata.

>>> p = Predictor("model.onnx")  # doctest: +SKIP
>>> p.predict("wafer_017.png").to_dict()  # doctest: +SKIP
>>> p.predict("cell_0042.png", metadata={"type": "mono"})  # a model trained with metadata inputs  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from defectscope import labels
from defectscope.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_gray
from defectscope.data.metadata_inputs import MetadataEncoder, MetadataInputError
from defectscope.decision.policy import Policy, decide_rows, relative_drift
from defectscope.runtime import card as md
from defectscope.runtime import engines
from defectscope.runtime.cascade_runner import CascadeRunner, is_manifest

UNREADABLE = labels.UNREADABLE

__all__ = ["UNREADABLE", "MetadataInputError", "Prediction", "Predictor", "WithMetadata"]


@dataclass(frozen=True)
class WithMetadata:
    """One input of :meth:`Predictor.iter_predict` with its metadata values (field name -> value), for a
    model trained with metadata inputs (``Predictor.metadata_fields``)."""

    source: Any
    metadata: Mapping[str, Any] | None


@dataclass
class Prediction:
    """One image's result. ``decision`` is what to act on (a class, ``REVIEW`` or ``Drift``; argmax without a
    policy) and ``reason`` why, e.g. ``below the escape threshold`` when it is not ``top_class``.

    ``confidence`` is the calibrated probability of the decided class (None for REVIEW and Drift, which no class
    probability decides); ``probabilities`` are the model's own, before the policy's temperature. ``drift_score``
    is relative to the policy's Drift line: 1.0 is the line, above it the image is Drift.
    For an unreadable image (batch mode only) ``decision`` is ``"_unreadable"``, ``error`` says why and
    the class fields are empty. ``timing``: ``decode_ms`` for this image, ``infer_ms`` its share of its
    batch's inference time. ``features`` is set only when asked for (``return_features=True``).
    """

    path: str | None
    top_class: str | None
    confidence: float | None
    probabilities: dict[str, float]
    decision: str
    drift_score: float | None = None
    timing: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    features: np.ndarray | None = field(default=None, repr=False, compare=False)
    verdict: str | None = None  # PASS / REJECT / REVIEW / Drift / _unreadable (labels.verdict_of)
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)  # (h, w) in [0, 1]
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the usual classification-API shape (predictions sorted by probability)."""
        ranked = sorted(self.probabilities.items(), key=lambda kv: kv[1], reverse=True)
        out: dict[str, Any] = {
            "image": self.path,
            "decision": self.decision,
            "reason": self.reason,
            "verdict": self.verdict,
            "confidence": self.confidence,
            "top_class": self.top_class,
            "predictions": [{"class": c, "probability": p} for c, p in ranked],
            "drift_score": self.drift_score,
            "timing": dict(self.timing),
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class Predictor:
    """An exported defectscope model ready to classify images.

    ``runtime``: ``onnxruntime`` (default), ``openvino`` or ``auto``; ``precision``: ``fp32`` (default),
    ``int8``, ``bf16``, ``fp16`` or ``auto``. ``auto`` takes the fastest candidate whose decisions match fp32
    on the run's reference images, measured once per machine (:mod:`defectscope.runtime.choice`).
    ``device``: ``cpu`` or ``gpu`` (CUDA for onnxruntime, OpenVINO's GPU), falling back to the CPU.
    ``threads``: inference threads (default: every core). ``decode_threads``: image decoders running beside
    inference in :meth:`predict_batch` (default: the cores ``threads`` leaves free, else a quarter of the
    cores, at least one; raise it for large images and small models). ``providers``: ONNX Runtime
    execution providers (overrides ``device``).
    ``choice_seconds``: the time budget of an ``auto`` choice measured at this start (default
    :data:`defectscope.runtime.choice.CHOICE_SECONDS`; 0: none).
    ``model_path`` may also be the ``cascade.json`` of a two-file cascade export: the screen runs on every
    image, the classifier only on those the screen did not pass (see ``runtime/cascade_runner.py``; ONNX
    Runtime fp32 on the CPU only).
    Raises :class:`defectscope.runtime.card.MetadataError` for an ONNX file not made by
    ``defectscope export``, :class:`defectscope.runtime.engines.RuntimeUnavailable` for a runtime,
    precision or device this machine cannot provide.
    """

    def __init__(self, model_path: str | Path, *, threads: int | None = None,
                 providers: list[str] | None = None, decode_threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, runtime: str = "onnxruntime", precision: str = "fp32",
                 device: str = "cpu", heatmaps: bool = False, choice_seconds: float | None = None) -> None:
        self.heatmaps = heatmaps  # fetch the graph's Grad-CAM output (when it has one) into Prediction.heatmap

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: no such model file")
        cores = os.cpu_count() or 1
        # Decoding runs in parallel with inference in predict_batch. Inference is most of the work for a
        # real model (68% of the sorter's time on ELPV, bench/results/throughput.json), so the runtime gets
        # every core and the decode threads share them; a 1 + 1 split on 2 cores left inference at half speed.
        # With fewer inference threads than cores, the decoders get the cores inference leaves free.
        self.decode_threads = decode_threads or max(1, cores - threads if threads and threads < cores else cores // 4)
        threads = threads or cores
        self.selection: dict[str, Any] | None = None
        chosen: dict[str, Any] = {"layout": "full"}
        if (runtime == "auto" or precision == "auto") and not is_manifest(self.model_path):
            from defectscope.runtime import choice

            card = engines.read_card(self.model_path)
            if card.takes_metadata:
                # The runtime candidates are measured on images alone: a model that also takes metadata runs
                # on ONNX Runtime fp32 (what its export was checked against).
                runtime = "onnxruntime" if runtime == "auto" else runtime
                precision = "fp32" if precision == "auto" else precision
            else:
                budget = choice.CHOICE_SECONDS if choice_seconds is None else choice_seconds
                chosen, self.selection = choice.resolve(self.model_path, runtime, precision, device=device,
                                                        threads=threads, choice_seconds=budget)
                runtime, precision = chosen["runtime"], chosen["precision"]
        self.cascade = None
        if is_manifest(self.model_path):
            # A two-file cascade (screen.onnx + classifier.onnx): the classifier's file describes the model.
            self.cascade = CascadeRunner(self.model_path, lambda path: engines.ort_session(
                path, threads=threads, providers=providers))
            self.engine, self.session = None, self.cascade.classifier
            self.runtime, self.precision, self.device = "onnxruntime", "fp32", "cpu"
            self.layout, self.views = "full", None
            meta = md.decode(self.session.get_modelmeta().custom_metadata_map, str(self.model_path))
        else:
            if chosen["layout"] == "full":
                self.engine = engines.create_engine(self.model_path, runtime, precision, device=device,
                                                    threads=threads, providers=providers)
            else:  # the backbone at reduced precision on the chosen views, the head in fp32
                from defectscope.runtime import choice

                self.engine = choice.engine_for(self.model_path, chosen, device=device, threads=threads)
            self.layout, self.views = chosen["layout"], chosen.get("views")
            self.runtime, self.precision, self.device = runtime, precision, self.engine.device
            # ONNX Runtime's session, for callers that used it directly (None with OpenVINO).
            self.session = getattr(self.engine, "session", None)
            props = self.engine.props if self.engine.model_file == self.model_path else None
            meta = md.decode(props, str(self.model_path)) if props else engines.read_metadata(self.model_path)
        self.metadata = meta
        self.card = md.ModelCard.from_metadata(meta)
        self.spec: dict[str, Any] = self.card.spec
        self.policy: dict[str, Any] | None = self.card.policy
        self.provenance: dict[str, Any] | None = self.card.provenance
        self.classes: list[str] = self.card.classes
        self.image_size: int = self.card.image_size
        self.resize: str = self.card.resize
        # "wafer_map": die grids (files or arrays of 0/1/2) rendered and resized nearest, as in training.
        self.input_kind: str = self.card.input_kind
        # Metadata inputs (spec "metadata_inputs"): values every image must come with, encoded as in training.
        self.metadata_encoder: MetadataEncoder | None = MetadataEncoder.from_spec(self.spec.get("metadata_inputs"))
        if self.metadata_encoder is not None and self.cascade is not None:
            raise md.MetadataError(f"{self.model_path}: a cascade whose classifier takes metadata inputs is not "
                                   "supported")
        self.max_pixels = max_pixels
        if self.policy is not None:
            Policy.from_dict(self.policy)  # a malformed policy fails at load, not on the first image
        self.good_class: str | None = labels.good_class_of(self.classes, self.policy)

    def __repr__(self) -> str:
        return (f"Predictor({str(self.model_path)!r}, classes={self.classes}, "
                f"input={self.image_size}px {self.resize}, {self.runtime} {self.precision} {self.device})")

    @property
    def metadata_fields(self) -> list[str]:
        """The metadata values each image must come with (empty for an image-only model)."""
        return self.metadata_encoder.names if self.metadata_encoder is not None else []

    def encode_metadata(self, values: Mapping[str, Any] | None) -> np.ndarray | None:
        """The graph's ``metadata`` input (M,) for one image's values, or None for an image-only model (which
        ignores any values). Raises :class:`MetadataInputError` naming a missing, empty or unknown field."""
        if self.metadata_encoder is None:
            return None
        return self.metadata_encoder.encode(values)

    def preprocess(self, source: Any) -> np.ndarray:
        """The graph input for one image: float32 (1, H, W) in [0, 1]. Raises ImageDecodeError."""
        gray = load_gray(source, self.image_size, self.resize, max_pixels=self.max_pixels,
                         input_kind=self.input_kind)
        return (gray.astype(np.float32) / np.float32(255))[None]

    def predict(self, source: Any, *, metadata: Mapping[str, Any] | None = None,
                return_features: bool = False) -> Prediction:
        """Classify one path, encoded bytes, PIL image or numpy array; unreadable input raises ImageDecodeError.

        ``metadata``: the image's values of :attr:`metadata_fields` (e.g. ``{"type": "mono"}``), required by a
        model trained with metadata inputs; a missing or unknown value raises :class:`MetadataInputError`.
        """
        m = self.encode_metadata(metadata)
        start = time.perf_counter()
        x = self.preprocess(source)
        decode_ms = (time.perf_counter() - start) * 1000
        return self._infer([_path_of(source)], x[None], [decode_ms], return_features,
                           None if m is None else m[None])[0]

    def predict_batch(self, sources: Iterable[Any], batch_size: int = 32, *,
                      metadata: Iterable[Mapping[str, Any] | None] | None = None,
                      return_features: bool = False) -> list[Prediction]:
        """Classify many images, in input order; unreadable ones give ``"_unreadable"`` rows, not errors.

        ``metadata``: one mapping per source, in the same order (or pass :class:`WithMetadata` items). An image
        whose metadata is missing or unknown also gives an ``"_unreadable"`` row, its ``error`` naming the field.
        """
        return list(self.iter_predict(sources, batch_size, metadata=metadata, return_features=return_features))

    def iter_predict(self, sources: Iterable[Any], batch_size: int = 32, *,
                     metadata: Iterable[Mapping[str, Any] | None] | None = None,
                     return_features: bool = False) -> Iterator[Prediction]:
        """:meth:`predict_batch` as a generator, for folders too large to hold all results.

        Batch k+1 is decoded in a thread pool while batch k runs in the runtime (which releases the GIL).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if metadata is not None:
            sources = (WithMetadata(s, m) for s, m in zip(sources, metadata, strict=True))
        it = iter(sources)
        with ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="decode") as pool:
            pending: deque[list[tuple[Any, Future]]] = deque()

            def submit_next() -> None:
                chunk = list(islice(it, batch_size))
                if chunk:
                    pending.append([(s, pool.submit(self._timed_decode, s)) for s in chunk])

            submit_next()
            while pending:
                batch = pending.popleft()
                submit_next()  # queue the next batch's decoding before waiting on and running this one
                yield from self._run_batch(batch, return_features)

    def _timed_decode(self, source: Any) -> tuple[np.ndarray | None, np.ndarray | None, str | None, float]:
        start = time.perf_counter()
        values = None
        if isinstance(source, WithMetadata):
            source, values = source.source, source.metadata
        m = None
        try:
            m = self.encode_metadata(values)
            x, error = self.preprocess(source), None
        except MetadataInputError as exc:
            x, error = None, f"{_path_of(source) or '<bytes>'}: {exc}"
        except ImageDecodeError as exc:
            x, error = None, str(exc)
        except (TypeError, ValueError) as exc:  # an unsupported source type must not sink the whole batch
            x, error = None, f"{_path_of(source) or type(source).__name__}: {exc}"
        return x, m, error, (time.perf_counter() - start) * 1000

    def _run_batch(self, batch: list[tuple[Any, Future]], return_features: bool) -> list[Prediction]:
        decoded = [(source, *future.result()) for source, future in batch]
        good = [d for d in decoded if d[1] is not None]
        meta = np.stack([d[2] for d in good]) if good and self.metadata_encoder is not None else None
        results = iter(self._infer([_path_of(s) for s, *_ in good], np.stack([d[1] for d in good]),
                                   [d[4] for d in good], return_features, meta) if good else [])
        out = []
        for source, x, _, error, decode_ms in decoded:
            if x is not None:
                out.append(next(results))
            else:
                out.append(Prediction(path=_path_of(source), top_class=None, confidence=None, probabilities={},
                                      decision=UNREADABLE, timing={"decode_ms": round(decode_ms, 3), "infer_ms": 0.0},
                                      error=error, verdict=UNREADABLE))
        return out

    def infer_arrays(self, x: np.ndarray, *, decode_ms: list[float] | None = None,
                     return_features: bool = False, metadata: np.ndarray | None = None) -> list[Prediction]:
        """Classify already-preprocessed graph inputs ``x`` float32 (N, 1, H, W) in [0, 1] (see :meth:`preprocess`);
        for callers that decode themselves (the station's micro-batcher). ``metadata``: the encoded values
        (N, M) (rows of :meth:`encode_metadata`), required by a model trained with metadata inputs."""
        return self._infer([None] * len(x), x, decode_ms or [0.0] * len(x), return_features, metadata)

    def _infer(self, paths: list[str | None], x: np.ndarray, decode_ms: list[float],
               return_features: bool, metadata: np.ndarray | None = None) -> list[Prediction]:
        if self.metadata_encoder is None:
            metadata = None
        elif metadata is None or np.shape(metadata) != (len(x), self.metadata_encoder.dim):
            raise MetadataInputError(f"{self.model_path.name} needs metadata with every image: "
                                     f"{self.metadata_encoder.describe()}")
        start = time.perf_counter()
        heat = None
        if self.cascade is not None:
            probs, features, drift = self.cascade.run(x)[1:]
        elif self.heatmaps and getattr(self.engine, "has_heatmap", False):
            probs, features, drift, heat = self.engine.run_with_heatmap(x, metadata)
        else:
            probs, features, drift = self.engine.run(x, metadata)
        infer_ms = (time.perf_counter() - start) * 1000 / len(x)
        has_drift = self.card.has_drift
        decisions, reasons, sure = decide_rows(probs, self.policy, self.classes, drift)
        threshold = (self.policy or {}).get("drift_threshold")
        shown = relative_drift(drift, threshold) if has_drift and threshold is not None else drift
        out = []
        for i, path in enumerate(paths):
            top = int(probs[i].argmax())
            out.append(Prediction(
                path=path, top_class=self.classes[top], confidence=None if np.isnan(sure[i]) else float(sure[i]),
                probabilities={c: float(p) for c, p in zip(self.classes, probs[i], strict=True)}, decision=decisions[i],
                reason=reasons[i], drift_score=float(shown[i]) if has_drift else None,
                timing={"decode_ms": round(decode_ms[i], 3), "infer_ms": round(infer_ms, 3)},
                features=features[i].copy() if return_features else None,
                heatmap=None if heat is None else heat[i].copy(),
                verdict=labels.verdict_of(decisions[i], self.good_class),
            ))
        return out


def _path_of(source: Any) -> str | None:
    if isinstance(source, WithMetadata):
        source = source.source
    return os.fsdecode(source) if isinstance(source, (str, os.PathLike)) else None
