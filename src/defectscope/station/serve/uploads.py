"""An upload's way in: names made labels, metadata checked, images decoded, bytes filed content-addressed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from defectscope.data.images import ImageDecodeError
from defectscope.runtime.predictor import MetadataInputError, Predictor

__all__ = ["META_FIELDS", "META_RE", "check_meta", "decode_all", "file_uploads", "image_suffix", "metadata_values",
           "safe_name", "store_bytes"]

META_FIELDS = ("station", "lot", "part_id")
META_RE = re.compile(r"^[^\x00-\x1f\x7f]{0,128}$")
# A stored upload is named by its bytes alone (hash and format), never by the client's name: the same bytes
# posted as "a.png" and as a raw body are one file.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"BM", ".bmp"))


def image_suffix(data: bytes) -> str:
    """The file suffix of an image's format, read from its first bytes (``.img`` when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in _MAGIC if data.startswith(magic)), ".img")


def safe_name(name: str | None) -> str:
    """A client's file name reduced to a printable label: never a path, never used as one."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".")
    return name[:128] or "upload"


def check_meta(name: str, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not META_RE.match(value):
        raise HTTPException(422, f"{name}: at most 128 printable characters")
    return value


def metadata_values(predictor: Predictor, given: dict[str, Any]) -> dict[str, str]:
    """The model's metadata input values from a request's fields (a ``metadata`` JSON object, then fields
    named after the inputs); checked against the model's encoding, else 422 naming the field."""
    values: dict[str, Any] = {}
    if given.get("metadata"):
        try:
            parsed = json.loads(given["metadata"])
        except json.JSONDecodeError as exc:
            raise HTTPException(422, f"metadata: not valid JSON ({exc.msg})") from None
        if not isinstance(parsed, dict):
            raise HTTPException(422, "metadata: expected a JSON object such as {\"type\": \"mono\"}")
        values.update(parsed)
    values.update({k: given[k] for k in predictor.metadata_fields if k in given})
    values = {k: values.get(k) for k in predictor.metadata_fields}
    for k, v in values.items():
        if v is not None and not isinstance(v, (str, int, float)):
            raise HTTPException(422, f"metadata field {k!r}: expected a string or a number")
        if v is not None:
            check_meta(k, str(v))
    try:
        predictor.encode_metadata(values)
    except MetadataInputError as exc:
        raise HTTPException(422, str(exc)) from None
    return {k: str(v) for k, v in values.items()}


def decode_all(predictor: Predictor, uploads: list[tuple[str, bytes]]) -> list[tuple[np.ndarray, float]]:
    out = []
    for fname, data in uploads:
        start = time.perf_counter()
        try:
            x = predictor.preprocess(data)
        except ImageDecodeError as exc:
            # The decoder names "<bytes>": name the upload instead. Pillow's own bomb limit (179 M pixels) may
            # trip before ours on a huge image; the limit the station's user can change is --max-pixels.
            reason = exc.reason
            if "bomb" in reason and "max_pixels" not in reason:
                reason = (f"too large, possible decompression bomb: over the station's --max-pixels "
                          f"{predictor.max_pixels}")
            raise HTTPException(422, f"{fname}: {reason}") from None
        out.append((x, (time.perf_counter() - start) * 1000))
    return out


def file_uploads(folder: Path, uploads: list[tuple[str, bytes]]) -> list[tuple[str, Path]]:
    out = []
    for _, data in uploads:
        sha = hashlib.sha256(data).hexdigest()
        out.append((sha, store_bytes(folder, data, sha, image_suffix(data))))
    return out


def store_bytes(folder: Path, data: bytes, sha: str, suffix: str) -> Path:
    """File ``data`` under ``folder/ab/<sha><suffix>``, durably; an existing file is never overwritten."""
    dest = folder / sha[:2] / f"{sha}{suffix}"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with suppress(FileExistsError):  # a concurrent twin won: same bytes anyway
            os.link(tmp, dest)  # atomic, and never replaces an existing file
    finally:
        os.unlink(tmp)
    return dest
