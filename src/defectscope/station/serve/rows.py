"""Stored rows on their way out: server paths replaced by URLs, images served with their type, times in UTC."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import HTTPException
from fastapi import Path as FastPath
from fastapi.responses import FileResponse

__all__ = ["MAX_ID", "DecisionId", "image_response", "public_row", "utc_iso"]

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "GIF": "image/gif", "WEBP": "image/webp",
         "TIFF": "image/tiff"}
MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER in PostgreSQL: a larger one is a 404, never a database error
DecisionId = Annotated[int, FastPath(ge=1, le=MAX_ID)]


def utc_iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if isinstance(out.get("probabilities"), str):
        out["probabilities"] = json.loads(out["probabilities"])
    out["needs_review"] = bool(out.get("needs_review"))
    out["image_url"] = f"/v1/decisions/{row['id']}/image" if (row.get("image_path") or row.get("destination")) else None
    out["heatmap_url"] = f"/v1/decisions/{row['id']}/heatmap" if row.get("heatmap_path") else None
    for private in ("image_path", "heatmap_path", "source_path", "destination"):
        out.pop(private, None)  # server paths stay on the server
    return out


def image_response(path: str | None) -> FileResponse:
    from PIL import Image

    if not path or not Path(path).is_file():
        raise HTTPException(404, "the image file is not there any more")
    try:
        with Image.open(path) as im:
            mime = _MIME.get(im.format or "", "application/octet-stream")
    except Exception:
        mime = "application/octet-stream"
    return FileResponse(path, media_type=mime, headers={"Cache-Control": "private, max-age=86400"})
