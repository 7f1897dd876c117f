"""``defectscope predict``: classify files and folders with an exported model, one row per image."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from defectscope.data.files import list_images
from defectscope.deploy.predictor import UNREADABLE, Predictor

FORMATS = ("csv", "json", "jsonl")


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
) -> dict[str, int]:
    """Write one row per image (csv, json or jsonl) to ``out`` or stdout; returns counts per decision.

    ``runtime``, ``precision``, ``device``: as :class:`Predictor`; ``auto`` by default (the fastest runtime
    whose decisions match fp32 on this machine).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    predictor = Predictor(model, threads=threads, runtime=runtime, precision=precision, device=device)
    files = expand_inputs(inputs, recursive=recursive)
    counts: dict[str, int] = {}
    stream: TextIO
    with (open(out, "w", newline="") if out else _stdout()) as stream:
        rows = (p.to_dict() for p in predictor.iter_predict(map(str, files), batch_size))
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
        writer.writerow(["image", "decision", "top_class", "confidence", *(f"p_{c}" for c in classes),
                         "drift_score", "error"])
        for row in rows:
            probs = {p["class"]: p["probability"] for p in row["predictions"]}
            writer.writerow([row["image"], row["decision"], row["top_class"], row["confidence"],
                             *(probs.get(c, "") for c in classes), row["drift_score"], row.get("error", "")])
            yield row


class _stdout(io.TextIOBase):
    """stdout as a context manager that is not closed on exit."""

    def __enter__(self) -> TextIO:
        return sys.stdout  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()


__all__ = ["FORMATS", "UNREADABLE", "expand_inputs", "predict"]
