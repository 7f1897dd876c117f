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

FORMATS = ("table", "csv", "json", "jsonl")
# The columns of the CSV, in the order a person reads them: what to do and why first, the evidence after.
CSV_HEAD = ("image", "decision", "reason", "verdict", "confidence", "top_class")
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


def list_items(inputs: Sequence[str | Path], *, recursive: bool = False,
               metadata: Mapping[str, str] | None = None) -> list[WithMetadata]:
    """Every image the inputs name (files, folders, CSV manifests), each with its metadata values."""
    items: list[tuple[Path, dict[str, str]]] = []
    for item in inputs:
        if str(item).lower().endswith(".csv") and Path(item).is_file():
            items += read_manifest(item)
        else:
            items += [(f, {}) for f in expand_inputs([item], recursive=recursive)]
    # A row's empty cell is a value it lacks: the one given for every image fills it.
    return [WithMetadata(str(f), {**(metadata or {}), **{k: v for k, v in values.items() if v}})
            for f, values in items]


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
    """Write one row per image (table, csv, json or jsonl) to ``out`` or stdout; returns counts per decision.

    Each row has the ``decision``, its ``reason`` (why, e.g. ``below the escape threshold``), ``confidence`` (the
    decided class's calibrated probability) and ``drift_score`` (1.0 = the Drift line).

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
    sources = list_items(inputs, recursive=recursive, metadata=metadata)
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
    elif fmt == "table":
        yield from _write_table(rows, stream)
    else:
        writer = csv.writer(stream)
        writer.writerow(table_columns(classes))
        for row in rows:
            writer.writerow(["" if v is None else v for v in table_row(row, classes)])
            yield row


def table_columns(classes: Sequence[str]) -> list[str]:
    """The columns of a CSV row (and of the Ray archive's Parquet and CSV, :mod:`defectscope.runtime.archive`)."""
    return [*CSV_HEAD, *(f"p_{c}" for c in classes), "drift_score", "error"]


def table_row(row: dict[str, Any], classes: Sequence[str]) -> list[Any]:
    """One :meth:`Prediction.to_dict` as the values of :func:`table_columns` (None where there is none)."""
    probs = {p["class"]: p["probability"] for p in row["predictions"]}
    return [*(row.get(k) for k in CSV_HEAD), *(probs.get(c) for c in classes), row["drift_score"], row.get("error")]


def _write_table(rows: Iterator[dict[str, Any]], stream: TextIO) -> Iterator[dict[str, Any]]:
    """Aligned columns for a person at a terminal, one line per image as it is decided."""
    widths = (32, 14, 40, 10, 7)
    stream.write(f"{'image':<32} {'decision':<14} {'reason':<40} {'confidence':>10} {'drift':>7}\n")
    for row in rows:
        image = Path(row["image"]).name if row["image"] else "<bytes>"
        conf = "" if row["confidence"] is None else f"{row['confidence']:.3f}"
        drift = "" if row["drift_score"] is None else f"{row['drift_score']:.2f}"
        reason = row.get("error") or row.get("reason") or ""
        cells = [_fit(image, widths[0]), _fit(row["decision"], widths[1]), _fit(reason, widths[2])]
        stream.write(f"{cells[0]:<32} {cells[1]:<14} {cells[2]:<40} {conf:>10} {drift:>7}\n")
        yield row


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def default_format(out: str | Path | None, stream_is_terminal: bool) -> str:
    """``--format`` when not given: a table on a terminal, JSON lines when piped, else by ``--out``'s suffix."""
    if out is not None:
        suffix = Path(out).suffix.lower().lstrip(".")
        return suffix if suffix in ("csv", "json") else "jsonl"
    return "table" if stream_is_terminal else "jsonl"


class _stdout(io.TextIOBase):
    """stdout as a context manager that is not closed on exit."""

    def __enter__(self) -> TextIO:
        return sys.stdout  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()


__all__ = ["FORMATS", "UNREADABLE", "default_format", "expand_inputs", "list_items", "predict", "read_manifest",
           "table_columns", "table_row"]
