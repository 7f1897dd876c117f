"""``defectscope predict``: classify files and folders with an exported model, one row per image.

A ``.csv`` input is a manifest: one image per row, its path in a column named like training's manifests
(``filename``, ``file``, ``path``, ``image``...; relative to the CSV's folder) and, for a model trained with
metadata inputs, those values in columns of the same names (e.g. ``lib``, ``window``). ``metadata`` values given
to :func:`predict` apply to every image and fill what a manifest row lacks.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from defectscope.data.files import list_images
from defectscope.runtime.engines import check_model_path
from defectscope.runtime.predictor import UNREADABLE, Predictor, WithMetadata

log = logging.getLogger(__name__)

FORMATS = ("csv", "json", "jsonl")
# The path columns training's manifest reader recognises (defectscope.data.table), in the same order.
PATH_COLUMNS = ("filename", "file", "path", "image", "image_path", "filepath", "file_name", "img")


def read_manifest(path: str | Path) -> list[tuple[Path, dict[str, str]]]:
    """(image path, the row's other columns) of each row of a CSV manifest; paths relative to its folder."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else []) if c}
    found = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
    if found is None:
        raise ValueError(f"{path}: no image path column (one of {', '.join(PATH_COLUMNS)})")
    out = []
    for row in rows:
        image = Path(row[found])
        out.append((image if image.is_absolute() else path.parent / image,
                    {k.strip(): v for k, v in row.items() if k and k != found}))
    return out


def exported_model_of(model: str | Path) -> Path:
    """``model``, or a run folder's own export (``RUN/export/model.onnx``) when ``model`` is a run that has one."""
    path = Path(model)
    exported = path / "export" / "model.onnx"
    if path.is_dir() and exported.is_file():
        log.info(f"{path} is a run folder: predicting with its export {exported}")
        return exported
    return path


def expand_inputs(inputs: Sequence[str | Path], *, recursive: bool = False) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); a missing input is an error."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += list_images(item, recursive=recursive)
        elif item.exists() or item.is_symlink():
            files.append(item)  # decoded and judged by the predictor; a bad one becomes an _unreadable row
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def predict(
    model: str | Path,
    inputs: Sequence[str | Path],
    *,
    recursive: bool = False,
    fmt: str = "jsonl",
    out: str | Path | None = None,
    batch_size: int = 32,
    threads: int | None = None,
    runtime: str = "auto",
    precision: str = "auto",
    device: str = "cpu",
    metadata: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Write one row per image (csv, json or jsonl) to ``out`` or stdout; returns counts per decision.

    ``runtime``, ``precision``, ``device``: as :class:`Predictor`; ``auto`` by default (the fastest runtime
    whose decisions match fp32 on this machine). ``inputs`` may include CSV manifests (see the module
    docstring); ``metadata``: values for every image of a model trained with metadata inputs. An image whose
    metadata is missing or unknown gets an ``_unreadable`` row naming the field. A ``model`` that is no
    exported model (a training run, its weights) raises :class:`~defectscope.runtime.engines.NotAnExport`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    model = exported_model_of(model)
    # Before the Predictor, which would call a training run "no such model file" and choke on weights.
    check_model_path(model)
    predictor = Predictor(model, threads=threads, runtime=runtime, precision=precision, device=device)
    items: list[tuple[Path, dict[str, str]]] = []
    for item in inputs:
        if str(item).lower().endswith(".csv") and Path(item).is_file():
            items += read_manifest(item)
        else:
            items += [(f, {}) for f in expand_inputs([item], recursive=recursive)]
    # A row's empty cell is a value it lacks: the one given for every image fills it.
    sources = [WithMetadata(str(f), {**(metadata or {}), **{k: v for k, v in values.items() if v}})
               for f, values in items]
    counts: dict[str, int] = {}
    stream: TextIO
    with (open(out, "w", newline="") if out else _stdout()) as stream:
        rows = (p.to_dict() for p in predictor.iter_predict(sources, batch_size))
        for row in _write(rows, stream, fmt, predictor.classes):
            counts[row["decision"]] = counts.get(row["decision"], 0) + 1
    return counts


def _write(rows: Iterator[dict[str, Any]], stream: TextIO, fmt: str, classes: list[str]) -> Iterator[dict[str, Any]]:
    if fmt == "jsonl":
        for row in rows:
            stream.write(json.dumps(row) + "\n")
            yield row
    elif fmt == "json":
        collected = []
        for row in rows:
            collected.append(row)
            yield row
        json.dump(collected, stream, indent=2)
        stream.write("\n")
    else:
        writer = csv.writer(stream)
        writer.writerow(["image", "decision", "verdict", "top_class", "confidence", *(f"p_{c}" for c in classes),
                         "drift_score", "error"])
        for row in rows:
            probs = {p["class"]: p["probability"] for p in row["predictions"]}
            writer.writerow([row["image"], row["decision"], row.get("verdict") or "", row["top_class"],
                             row["confidence"], *(probs.get(c, "") for c in classes), row["drift_score"],
                             row.get("error", "")])
            yield row


class _stdout(io.TextIOBase):
    """stdout as a context manager that is not closed on exit."""

    def __enter__(self) -> TextIO:
        return sys.stdout  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()


__all__ = ["FORMATS", "UNREADABLE", "expand_inputs", "predict", "read_manifest"]
