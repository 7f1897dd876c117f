"""The sorter's result log: one SQLite table, written ahead of every file move, exportable to CSV.

Standard library only (``sqlite3``), so it runs wherever the torch-free predictor runs. The database is
in WAL mode with ``synchronous=FULL``: a reader (a dashboard, ``defectscope log export``) never blocks
the sorter, and a committed row survives a killed process or a power cut.

One row per image, keyed by ``(content_sha256, file_name)``: the same bytes under the same name are the
same image (a re-delivery or a crash leftover), while identical bytes under another name are a separate
image with its own row. ``status`` is ``pending`` from just before the file is moved until it is in place,
then ``done``; ``error`` rows (a failed move) are retried by the next pass and reuse their row.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "STATUSES", "ResultLog", "export_log"]

STATUSES = ("pending", "done", "error")

COLUMNS = (
    "id", "time", "file_name", "source_path", "content_sha256", "size_bytes", "decision", "top_class",
    "confidence", "probabilities", "drift_score", "model_id", "model_version", "destination", "status", "error",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    time           TEXT NOT NULL,
    file_name      TEXT NOT NULL,
    source_path    TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL,
    decision       TEXT NOT NULL,
    top_class      TEXT,
    confidence     REAL,
    probabilities  TEXT,
    drift_score    REAL,
    model_id       TEXT,
    model_version  TEXT,
    destination    TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('pending', 'done', 'error')),
    error          TEXT,
    UNIQUE (content_sha256, file_name)
);
CREATE INDEX IF NOT EXISTS decisions_status ON decisions (status);
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ResultLog:
    """The ``decisions`` table of one SQLite file (created on first use).

    Every write commits at once: the sorter relies on a ``pending`` row being on disk before it touches
    the file. One process writes at a time (the sorter holds a lock on its output folder); any number may
    read. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each statement is its own durable transaction.
        # check_same_thread=False: the sorter reads from its main thread and writes from its filing thread,
        # one at a time under its own lock (sqlite3 connections are serialized, the check is only a guard).
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def find(self, content_sha256: str, file_name: str) -> sqlite3.Row | None:
        """The row of this image (same content, same name), whatever its status."""
        return self.conn.execute("SELECT * FROM decisions WHERE content_sha256 = ? AND file_name = ?",
                                 (content_sha256, file_name)).fetchone()

    def rows(self, status: str | None = None) -> list[sqlite3.Row]:
        if status is None:
            return self.conn.execute("SELECT * FROM decisions ORDER BY id").fetchall()
        return self.conn.execute("SELECT * FROM decisions WHERE status = ? ORDER BY id", (status,)).fetchall()

    def begin(self, record: dict[str, Any], row_id: int | None = None) -> int:
        """Write ``record`` as a ``pending`` row (a new one, or ``row_id`` reused); returns the row id.

        ``record`` holds every column but ``id``, ``time`` and ``status``; ``probabilities`` may be a dict
        (stored as JSON text); ``error`` is an optional remark kept when the row is done (e.g. why a file
        could not be decoded).
        """
        values = {k: record.get(k) for k in COLUMNS if k not in ("id", "time", "status")}
        if isinstance(values["probabilities"], dict):
            values["probabilities"] = json.dumps(values["probabilities"])
        values.update(time=utc_now(), status="pending")
        names = list(values)
        if row_id is None:
            cur = self.conn.execute(
                f"INSERT INTO decisions ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [values[n] for n in names])
            return int(cur.lastrowid)
        self.conn.execute(f"UPDATE decisions SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                          [*(values[n] for n in names), row_id])
        return row_id

    def mark_done(self, row_id: int) -> None:
        self.conn.execute("UPDATE decisions SET status = 'done', time = ? WHERE id = ?", (utc_now(), row_id))

    def mark_error(self, row_id: int, message: str) -> None:
        self.conn.execute("UPDATE decisions SET status = 'error', error = ?, time = ? WHERE id = ?",
                          (message, utc_now(), row_id))

    def counts(self) -> dict[str, int]:
        """Rows per status."""
        return {s: n for s, n in self.conn.execute("SELECT status, COUNT(*) FROM decisions GROUP BY status")}

    def export_csv(self, path: str | Path) -> int:
        """Write every row (in id order, all columns) to a CSV file; returns the number of rows."""
        n = 0
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in self._iter_rows():
                writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
                n += 1
        return n

    def _iter_rows(self) -> Iterator[sqlite3.Row]:
        yield from self.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM decisions ORDER BY id")


def export_log(db: str | Path, out_csv: str | Path) -> int:
    """``defectscope log export DB --out CSV``: the log as CSV; returns the row count.

    Safe while a sorter is writing (WAL readers see the last committed state). A missing database is an
    error rather than a new empty one.
    """
    if not Path(db).is_file():
        raise FileNotFoundError(f"{db}: no such result log")
    with ResultLog(db) as log:
        return log.export_csv(out_csv)
