"""``defectscope predict MODEL SRC --engine ray --out DIR``: re-classify an archive on a Ray cluster.

The images (a folder tree, files, CSV manifests: :func:`defectscope.runtime.predict.list_items`) are listed once,
in path order, and cut into partitions of ``partition_size`` images. Ray Data hands partitions to a pool of
``actors`` actors; each loads the torch-free :class:`~defectscope.runtime.predictor.Predictor` once, runs its
partition through ``iter_predict`` in batches of ``batch_size`` (decoding beside inference, as on the line),
and writes ``DIR/part-NNNNN.parquet`` (or ``.csv``) itself under a temporary name then renames it: a finished
partition is complete or absent. Only a partition number and its list travel through Ray; the results go
straight to storage, so memory stays bounded by the actors in flight whatever the archive's size (Ray Data's
streaming executor does the backpressure).

Same columns and decisions as the plain ``predict`` CSV (:func:`~defectscope.runtime.predict.table_columns`);
an unreadable file is a row with ``decision`` ``_unreadable`` and its reason in ``error``, never a failed job.
``DIR/_job.json`` records the listing's fingerprint: run again with the same inputs and the finished partitions
are kept, only the missing ones are done (a stopped or crashed job resumes); other inputs are refused.

Ray is optional: ``pip install 'defectscope[ray]'``. ``address``: ``None`` starts (or joins) a local Ray,
``auto`` joins the cluster of this machine, ``ray://head:10001`` a remote one; for several machines, DIR and
the images must be on storage every node sees.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from defectscope.errors import DefectscopeError
from defectscope.runtime.engines import check_model_path
from defectscope.runtime.predict import list_items, table_columns, table_row

__all__ = ["ARCHIVE_FORMATS", "RayMissing", "archive_predict"]

ARCHIVE_FORMATS = ("parquet", "csv")
JOB_FILE = "_job.json"


class RayMissing(DefectscopeError, ImportError):
    """``--engine ray`` without Ray installed."""


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library, part of the ray[data] extra
    except ImportError:
        raise RayMissing("--engine ray needs Ray: pip install 'defectscope[ray]' (or pip install 'ray[data]')") \
            from None
    return ray


def _part_path(out: Path, k: int, fmt: str) -> Path:
    return out / f"part-{k:05d}.{fmt}"


class _PartitionWriter:
    """A Ray actor: one model load, then every partition it is handed, written to its own file."""

    def __init__(self, model: str, out: str, fmt: str, batch_size: int, threads: int, runtime: str) -> None:
        from defectscope.runtime.predictor import Predictor, WithMetadata

        self.predictor = Predictor(model, threads=threads, decode_threads=1, runtime=runtime)
        self.with_metadata = WithMetadata
        self.out, self.fmt, self.batch_size = Path(out), fmt, batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        parts, counts = [], []
        for k, listing in zip(batch["part"], batch["items"], strict=True):
            items = [self.with_metadata(path, meta or None) for path, meta in json.loads(str(listing))]
            rows = [table_row(p.to_dict(), self.predictor.classes)
                    for p in self.predictor.iter_predict(items, self.batch_size)]
            _write_part(_part_path(self.out, int(k), self.fmt), table_columns(self.predictor.classes), rows)
            parts.append(int(k))
            counts.append(json.dumps(Counter(r[1] for r in rows)))
        return {"part": parts, "counts": counts}


def _write_part(dest: Path, columns: list[str], rows: list[list[Any]]) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    if dest.suffix == ".csv":
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(["" if v is None else v for v in r] for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        text = {"image", "decision", "reason", "verdict", "top_class", "error"}  # the rest are numbers
        schema = pa.schema([(c, pa.string() if c in text else pa.float64()) for c in columns])
        table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)}, schema=schema)
        pq.write_table(table, tmp)
    os.replace(tmp, dest)  # a partition is complete or absent


def archive_predict(
    model: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    recursive: bool = True,
    fmt: str = "parquet",
    address: str | None = None,
    actors: int = 2,
    partition_size: int = 1000,
    batch_size: int = 32,
    threads: int = 1,
    runtime: str = "onnxruntime",
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Classify every image the inputs name on Ray, one file per partition in ``out``; returns a summary
    (``images``, ``partitions``, ``done_before`` (kept from an earlier run), ``written``, ``per_decision`` of
    the partitions written now, ``out``)."""
    if fmt not in ARCHIVE_FORMATS:
        raise DefectscopeError(f"--engine ray writes {' or '.join(ARCHIVE_FORMATS)}, not {fmt!r}")
    if partition_size < 1 or actors < 1:
        raise DefectscopeError("--partition-size and --actors must be at least 1")
    ray = _ray()
    check_model_path(model)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    items = sorted(([str(Path(s.source).absolute()), dict(s.metadata or {})]
                    for s in list_items(inputs, recursive=recursive, metadata=metadata)), key=lambda x: x[0])
    parts = [items[i:i + partition_size] for i in range(0, len(items), partition_size)]
    _check_job(out, model, items, partition_size, fmt)
    todo = [k for k in range(len(parts)) if not _part_path(out, k, fmt).exists()]
    counts: Counter[str] = Counter()
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        ds = ray.data.from_items([{"part": k, "items": json.dumps(parts[k])} for k in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(_PartitionWriter, batch_size=1, batch_format="numpy", concurrency=actors,
                            fn_constructor_kwargs={"model": str(Path(model).absolute()), "out": str(out),
                                                   "fmt": fmt, "batch_size": batch_size, "threads": threads,
                                                   "runtime": runtime})
        for row in ds.iter_rows():  # streams: partitions finish (and are on disk) as the actors go
            counts.update(json.loads(str(row["counts"])))
    return {"images": len(items), "partitions": len(parts), "done_before": len(parts) - len(todo),
            "written": len(todo), "per_decision": dict(counts), "out": str(out)}


def _check_job(out: Path, model: str | Path, items: list[Any], partition_size: int, fmt: str) -> None:
    """Same inputs, partitioning and format as the job that wrote ``out`` (or none yet): else refuse."""
    listing = hashlib.sha256(json.dumps(items).encode()).hexdigest()
    job = {"listing_sha256": listing, "images": len(items), "partition_size": partition_size, "format": fmt,
           "model": str(Path(model).absolute())}
    path = out / JOB_FILE
    if path.exists():
        before = json.loads(path.read_text())
        changed = [k for k in ("listing_sha256", "partition_size", "format", "model") if before.get(k) != job[k]]
        if changed:
            raise DefectscopeError(f"{path}: this folder holds another job ({', '.join(changed)} differ); "
                                   "resume with the same inputs and options, or write to a new --out folder")
        return
    path.write_text(json.dumps(job, indent=2) + "\n")
