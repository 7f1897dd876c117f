"""Pooled backbone features of images this process has already seen through the same weights.

One run's images go through the same frozen backbone several times in a row: the frozen recipe extracts the
training split's features, then calibration fits the Drift statistics on those same images, evaluation runs
the test split before and after the policy, export checks the model on it again. On a 2-core CPU each pass over
ELPV's training split costs minutes (the demo spent about 40% of its time recomputing features it had already
computed). :class:`Classifier.forward_features <defectscope.models.factory.Classifier.forward_features>` asks
this memo first, so each image costs one backbone pass per set of weights and views.

The key is the content, never an object's identity: a digest of the backbone's weights and buffers, the
normalisation, the views, and each image's own bytes (so batch composition does not matter and a model loaded
again from the same file hits). The weights' digest is recomputed whenever a tensor's storage or in-place
version changes (an optimizer step, ``load_state_dict``), so a fine-tune's later epochs never read features of
its earlier ones. The memo only serves inference: eval mode, gradients off, on the CPU, not while tracing or
exporting. It is bounded (:data:`MAX_BYTES`, least recently used out first) and can be turned off with
``DEFECTSCOPE_FEATURE_MEMO=0``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Any

import torch

MAX_BYTES = 512 << 20  # ~100k Lite0 feature vectors (1280 float32)

_lock = threading.Lock()
_rows: OrderedDict[tuple[bytes, bytes], torch.Tensor] = OrderedDict()
_bytes = 0
stats = {"hits": 0, "misses": 0}


def enabled(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model.forward_features(x)`` may be served from the memo."""
    if os.environ.get("DEFECTSCOPE_FEATURE_MEMO", "1") == "0":
        return False
    if model.training or torch.is_grad_enabled() or x.device.type != "cpu" or x.requires_grad:
        return False
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                or _compiling())


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _tensor_bytes(t: torch.Tensor) -> Any:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def weights_digest(model: Any) -> bytes:
    """A digest of what the pooled features depend on: backbone weights and buffers, normalisation, views.
    Cached on the model until one of those tensors is replaced or changed in place."""
    tensors = [*model.backbone.state_dict(keep_vars=True).values(), model.mean, model.std]
    signature = (tuple(model.views), tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors))
    cached = model.__dict__.get("_feature_memo_key")
    if cached is not None and cached[0] == signature:
        return cached[1]
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(tuple(model.views)).encode())
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(_tensor_bytes(t))
    digest = h.digest()
    model.__dict__["_feature_memo_key"] = (signature, digest)
    return digest


def pooled(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``model.pooled_over_views`` of the normalised ``x``, each image computed at most once per weights."""
    key = weights_digest(model)
    rows = x.detach().contiguous()
    digests = [hashlib.blake2b(_tensor_bytes(r), digest_size=16).digest() for r in rows]
    out: list[torch.Tensor | None] = [None] * len(digests)
    with _lock:
        for i, d in enumerate(digests):
            hit = _rows.get((key, d))
            if hit is not None:
                _rows.move_to_end((key, d))
                out[i] = hit
    missing = [i for i, o in enumerate(out) if o is None]
    if missing:
        xs = x[missing] if len(missing) < len(rows) else x  # x keeps the caller's memory format
        fresh = model.pooled_over_views((xs - model.mean) / model.std)
        for j, i in enumerate(missing):
            out[i] = fresh[j].clone()
        _remember(key, [digests[i] for i in missing], [out[i] for i in missing])
    with _lock:
        stats["hits"] += len(digests) - len(missing)
        stats["misses"] += len(missing)
    return torch.stack(out) if out else model.pooled_over_views((x - model.mean) / model.std)


def _remember(key: bytes, digests: list[bytes], feats: list[torch.Tensor]) -> None:
    global _bytes
    with _lock:
        for d, f in zip(digests, feats, strict=True):
            if (key, d) not in _rows:
                _rows[(key, d)] = f
                _bytes += f.numel() * f.element_size()
        while _bytes > MAX_BYTES and _rows:
            _, old = _rows.popitem(last=False)
            _bytes -= old.numel() * old.element_size()


def clear() -> None:
    """Forget every remembered feature (tests; a caller that wants the memory back)."""
    global _bytes
    with _lock:
        _rows.clear()
        _bytes = 0
        stats.update(hits=0, misses=0)


__all__ = ["MAX_BYTES", "clear", "enabled", "pooled", "stats", "weights_digest"]
