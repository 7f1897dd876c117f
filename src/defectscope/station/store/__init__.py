"""The results store shared by the sorter and the inspection service: one schema, SQLite or PostgreSQL.

A database is named by a URL: ``sqlite:///path/results.db`` (the default kind; a bare path means SQLite)
or ``postgresql://user@host/db`` for several writers on several machines. Queries are SQLAlchemy Core;
the tables are created and upgraded only by the Alembic scripts shipped in ``migrations/``, run on every
open, so an old sorter log (written by the stdlib ``ResultLog`` of defectscope <= 0.1) is upgraded in place.

SQLite runs in WAL mode with ``synchronous=FULL``: a reader (the dashboard, ``defectscope log export``)
never blocks a writer, and a committed row survives a killed process or a power cut. Every write method
commits before it returns - the sorter relies on a ``pending`` row being on disk before it touches a
file, the service on a row being on disk before it answers.

``decisions``: one row per image decision. The sorter's rows are keyed by ``(content_sha256, file_name)``
(``request_id`` is ``''``) and move ``pending`` -> ``done`` / ``error``; the service's rows carry their
request's id and the ``replica`` that made them, and are written ``done`` at once. ``reviews``: what a person
said about a decision, with who and when; the latest review of a decision is its human label. A decision's
``verdict`` (PASS / REJECT / REVIEW / Drift / _unreadable) is its writer's, by the good class of the model that
decided it; NULL when not given. ``review_claims``: who holds which queue item until when (several replicas, one
queue). ``model_generations``: the model the station was last asked to run.
"""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event

from defectscope import labels
from defectscope.errors import DefectscopeError
from defectscope.station.store.schema import TABLES, decisions, model_generations, review_claims, reviews

__all__ = ["COLUMNS", "REVIEW_COLUMNS", "SOURCES", "STATUSES", "TABLES", "VERDICTS", "Store", "StoreError",
           "database_url", "export_log", "sqlite_path", "utc_now"]

log = logging.getLogger(__name__)

STATUSES = ("pending", "done", "error")
VERDICTS = frozenset({labels.PASS, labels.REJECT, *labels.NOT_AUTOMATIC, None})
SOURCES = ("sort", "api")
# The sorter's original columns first, in their order: CSV exports of old and new logs line up.
COLUMNS = tuple(c.name for c in decisions.columns)
REVIEW_COLUMNS = tuple(c.name for c in reviews.columns)
_WRITABLE = tuple(c for c in COLUMNS if c not in ("id", "time", "status"))
HEAD = "0005"  # the newest migration (tests check it against the scripts)
_MIGRATIONS = Path(__file__).with_name("migrations")
_migrate_lock = threading.Lock()


class StoreError(DefectscopeError, sqlite3.Error):
    """The database refused a write or a read (disk full, connection lost, constraint).

    A subclass of ``sqlite3.Error`` so code written for the stdlib result log (``except sqlite3.Error``)
    keeps catching failures whichever database is behind the store.
    """


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds: fixed width, so text order is time order in every database."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def database_url(target: str | Path) -> str:
    """The SQLAlchemy URL for a store target: a bare path is a SQLite file (made absolute)."""
    text = str(target)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().absolute()}"
    scheme, _, rest = text.partition("://")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"  # psycopg 3, the driver we declare
    if scheme in ("sqlite", "postgresql+psycopg"):
        return text
    raise ValueError(f"unsupported database URL {_redact(text)!r}: use sqlite:///PATH, postgresql://... or a path")


def sqlite_path(target: str | Path) -> Path | None:
    """The file of a SQLite target (None for PostgreSQL or an in-memory database)."""
    url = sa.engine.make_url(database_url(target))
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _redact(text: str) -> str:
    try:
        return sa.engine.make_url(text).render_as_string(hide_password=True)
    except Exception:
        return text.split("@")[-1]


class Store:
    """The results database at ``target`` (URL or path), created or upgraded on open.

    Safe to share between threads. Use as a context manager or call :meth:`close`. The sorter's API
    (:meth:`find`, :meth:`rows`, :meth:`begin`, :meth:`mark_done`, :meth:`mark_error`, :meth:`counts`,
    :meth:`export_csv`) is the one of the former ``ResultLog``; rows are plain dicts. :meth:`find_many`,
    :meth:`begin_many` and :meth:`settle_many` do the same for a batch in one transaction.
    """

    def __init__(self, target: str | Path, *, create: bool = True) -> None:
        self.url = database_url(target)
        self.path = sqlite_path(target)
        if self.path is not None:
            if not create and not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no such results database")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.is_sqlite = self.url.startswith("sqlite")
        self._classes: dict[str | None, list[str]] = {}  # model id -> its classes (model_classes)
        kwargs: dict[str, Any] = {"pool_pre_ping": not self.is_sqlite}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30.0}
        self.engine = sa.create_engine(self.url, **kwargs)
        if self.is_sqlite:
            _sqlite_setup(self.engine)
        self._migrate()

    def __repr__(self) -> str:
        return f"Store({_redact(self.url)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------ plumbing
    def _migrate(self) -> None:
        if self._schema_version() == HEAD:
            return  # the common case: no Alembic run at every start
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        # One process migrates at a time (threads here; other processes: SQLite's write lock from
        # BEGIN IMMEDIATE, PostgreSQL's advisory lock), so two stations opening a new database do not race.
        with _migrate_lock, self._tx(write=True) as conn:
            if not self.is_sqlite:
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7262110)")
            tables = set(sa.inspect(conn).get_table_names())
            cfg.attributes["connection"] = conn
            if "decisions" in tables and "alembic_version" not in tables:
                log.info("%s: a result log from defectscope <= 0.1; upgrading it", self)
                command.stamp(cfg, "0001")
            command.upgrade(cfg, "head")

    def _schema_version(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table("alembic_version"):
                    return None
                return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        except sa.exc.SQLAlchemyError:
            return None  # let the migration report what is wrong

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[sa.Connection]:
        """One transaction, committed on exit; database errors become :class:`StoreError`."""
        try:
            with self.engine.connect() as conn:
                if write and self.is_sqlite:
                    # Take the write lock up front: a deferred transaction that reads and then writes can
                    # fail with "database is locked" instead of waiting its turn.
                    conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"{self}: {getattr(exc, 'orig', None) or exc}") from exc

    # --------------------------------------------------------------------------- the sorter's interface
    def find(self, content_sha256: str, file_name: str) -> dict[str, Any] | None:
        """The sorter's row of this image (same content, same name), whatever its status."""
        q = sa.select(decisions).where(decisions.c.content_sha256 == content_sha256,
                                       decisions.c.file_name == file_name, decisions.c.request_id == "")
        with self._tx() as conn:
            row = conn.execute(q).mappings().first()
        return dict(row) if row else None

    def rows(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every row (optionally of one status), in id order."""
        q = sa.select(decisions).order_by(decisions.c.id)
        if status is not None:
            q = q.where(decisions.c.status == status)
        with self._tx() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def begin(self, record: dict[str, Any], row_id: int | None = None) -> int:
        """Write ``record`` as a ``pending`` row (a new one, or ``row_id`` reused); returns the row id.

        ``record`` holds columns but ``id``, ``time`` and ``status``; ``probabilities`` may be a dict
        (stored as JSON text); ``error`` is an optional remark kept when the row is done.
        """
        values = _values(record, status="pending")
        with self._tx(write=True) as conn:
            if row_id is None:
                return int(conn.execute(sa.insert(decisions).values(**values)).inserted_primary_key[0])
            conn.execute(sa.update(decisions).where(decisions.c.id == row_id).values(**values))
        return row_id

    def mark_done(self, row_id: int) -> None:
        with self._tx(write=True) as conn:
            conn.execute(sa.update(decisions).where(decisions.c.id == row_id).values(status="done", time=utc_now()))

    def mark_error(self, row_id: int, message: str) -> None:
        with self._tx(write=True) as conn:
            conn.execute(sa.update(decisions).where(decisions.c.id == row_id)
                         .values(status="error", error=message, time=utc_now()))

    # The same steps for a batch of images, one transaction (one commit, one fsync) each: the sorter's
    # throughput. Each row is as durable as with the one-row methods once the call returns.
    def find_many(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """:meth:`find` for many ``(content_sha256, file_name)`` keys: key -> row, for the keys that have one."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        unique = list(dict.fromkeys(keys))
        with self._tx() as conn:
            for i in range(0, len(unique), 400):  # bounded statements (SQLite's variable limit)
                chunk = unique[i:i + 400]
                q = sa.select(decisions).where(sa.tuple_(decisions.c.content_sha256, decisions.c.file_name)
                                               .in_(chunk), decisions.c.request_id == "")
                for row in conn.execute(q).mappings():
                    found[(row["content_sha256"], row["file_name"])] = dict(row)
        return found

    def begin_many(self, jobs: Sequence[tuple[dict[str, Any], int | None]]) -> list[int]:
        """:meth:`begin` for many ``(record, row_id or None)`` in one transaction; the row ids in order.

        All or nothing: when one row is refused (a constraint, a full disk) none is written.
        """
        ids: list[int | None] = [row_id for _, row_id in jobs]
        with self._tx(write=True) as conn:
            new = [i for i, (_, row_id) in enumerate(jobs) if row_id is None]
            if new:
                rows = [_values(jobs[i][0], status="pending") for i in new]
                keys = set().union(*rows)
                rows = [{k: row.get(k) for k in keys} for row in rows]
                result = conn.execute(sa.insert(decisions).returning(decisions.c.id, sort_by_parameter_order=True),
                                      rows)
                for i, row_id in zip(new, result.scalars(), strict=True):
                    ids[i] = int(row_id)
            for record, row_id in jobs:
                if row_id is not None:
                    conn.execute(sa.update(decisions).where(decisions.c.id == row_id)
                                 .values(**_values(record, status="pending")))
        return [int(i) for i in ids if i is not None]

    def settle_many(self, done: Sequence[int], errors: dict[int, str] | None = None) -> None:
        """:meth:`mark_done` for ``done`` and :meth:`mark_error` for ``errors`` (row id -> message), one
        transaction."""
        now = utc_now()
        with self._tx(write=True) as conn:
            if done:
                conn.execute(sa.update(decisions).where(decisions.c.id.in_(list(done)))
                             .values(status="done", time=now))
            for row_id, message in (errors or {}).items():
                conn.execute(sa.update(decisions).where(decisions.c.id == row_id)
                             .values(status="error", error=message, time=now))

    def counts(self) -> dict[str, int]:
        """Rows per status."""
        q = sa.select(decisions.c.status, sa.func.count()).group_by(decisions.c.status)
        with self._tx() as conn:
            return {s: int(n) for s, n in conn.execute(q)}

    def export_csv(self, path: str | Path) -> int:
        """Write every decision (in id order, all columns) to a CSV file; returns the number of rows."""
        n = 0
        with open(path, "w", newline="", encoding="utf-8") as f, self._tx() as conn:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in conn.execute(sa.select(decisions).order_by(decisions.c.id)):
                writer.writerow(["" if v is None else v for v in row])
                n += 1
        return n

    # -------------------------------------------------------------------------- the service's interface
    def add_decisions(self, records: Sequence[dict[str, Any]]) -> list[int]:
        """Insert finished decisions (status ``done``) in one transaction; returns their ids in order.

        Each record needs ``request_id`` (unique per request) besides the sorter's columns.
        """
        if not records:
            return []
        rows = [_values({"source": "api", **record}, status="done") for record in records]
        # One executemany with RETURNING (SQLAlchemy batches it into few statements): same keys in every row.
        keys = set().union(*rows)
        rows = [{k: row.get(k) for k in keys} for row in rows]
        with self._tx(write=True) as conn:
            result = conn.execute(sa.insert(decisions).returning(decisions.c.id, sort_by_parameter_order=True), rows)
            return [int(i) for i in result.scalars()]

    def get(self, decision_id: int) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(decisions).where(decisions.c.id == decision_id)).mappings().first()
        return dict(row) if row else None

    def query(self, *, since: str | None = None, until: str | None = None, decision: str | None = None,
              model: str | None = None, station: str | None = None, source: str | None = None,
              replica: str | None = None, limit: int = 100, offset: int = 0,
              newest_first: bool = True) -> tuple[list[dict[str, Any]], int]:
        """Decisions matching every given filter (``since`` inclusive, ``until`` exclusive, ISO times;
        ``model`` matches the model id) and the total count before paging."""
        conds = []
        if since:
            conds.append(decisions.c.time >= since)
        if until:
            conds.append(decisions.c.time < until)
        for col, value in (("decision", decision), ("model_id", model), ("station", station), ("source", source),
                           ("replica", replica)):
            if value is not None:
                conds.append(decisions.c[col] == value)
        order = decisions.c.id.desc() if newest_first else decisions.c.id
        with self._tx() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(decisions).where(*conds)).scalar_one()
            rows = conn.execute(sa.select(decisions).where(*conds).order_by(order).limit(limit).offset(offset))
            return [dict(r) for r in rows.mappings()], int(total)

    def flag(self, decision_id: int) -> bool:
        """Send a decision to the review queue; False when there is no such decision."""
        with self._tx(write=True) as conn:
            res = conn.execute(sa.update(decisions).where(decisions.c.id == decision_id).values(needs_review=True))
            return res.rowcount > 0

    def add_review(self, decision_id: int, label: str, reviewer: str, comment: str | None = None) -> int:
        """Store a person's label for a decision; raises ``KeyError`` when the decision does not exist."""
        with self._tx(write=True) as conn:
            if conn.execute(sa.select(decisions.c.id).where(decisions.c.id == decision_id)).first() is None:
                raise KeyError(decision_id)
            res = conn.execute(sa.insert(reviews).values(decision_id=decision_id, time=utc_now(), reviewer=reviewer,
                                                         label=label, comment=comment))
            return int(res.inserted_primary_key[0])

    def reviews(self, decision_id: int | None = None) -> list[dict[str, Any]]:
        q = sa.select(reviews).order_by(reviews.c.id)
        if decision_id is not None:
            q = q.where(reviews.c.decision_id == decision_id)
        with self._tx() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def review_queue(self, limit: int = 50) -> tuple[list[dict[str, Any]], int]:
        """Decisions waiting for a person (flagged, no review yet), oldest first, and how many there are."""
        waiting = sa.and_(decisions.c.needs_review.is_(True), decisions.c.status == "done",
                          ~sa.exists().where(reviews.c.decision_id == decisions.c.id))
        with self._tx() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(decisions).where(waiting)).scalar_one()
            rows = conn.execute(sa.select(decisions).where(waiting).order_by(decisions.c.id).limit(limit))
            return [dict(r) for r in rows.mappings()], int(total)

    def claim_review(self, reviewer: str, lease_seconds: float = 300.0, *,
                     keep: bool = False) -> dict[str, Any] | None:
        """Hand the oldest waiting queue item nobody holds to ``reviewer`` for ``lease_seconds``; None when the
        queue is empty. ``keep``: an item ``reviewer`` already holds comes back first, its lease renewed.

        Replicas on one PostgreSQL never hand one item to two people: the candidate row is
        locked ``FOR UPDATE SKIP LOCKED`` (a concurrent claimer takes the next one), and the claim is a row
        of ``review_claims`` until it expires (SQLite: the write lock serialises claimers)."""
        now = datetime.now(timezone.utc)
        stamp, until = now.isoformat(timespec="milliseconds"), (now + timedelta(seconds=lease_seconds))
        held = sa.exists().where(review_claims.c.decision_id == decisions.c.id, review_claims.c.until > stamp)
        q = (sa.select(decisions).where(decisions.c.needs_review.is_(True), decisions.c.status == "done",
                                        ~sa.exists().where(reviews.c.decision_id == decisions.c.id), ~held)
             .order_by(decisions.c.id).limit(1))
        if not self.is_sqlite:
            q = q.with_for_update(skip_locked=True, of=decisions)
        with self._tx(write=True) as conn:
            own = (sa.select(decisions).join(review_claims, review_claims.c.decision_id == decisions.c.id)
                   .where(review_claims.c.reviewer == reviewer, review_claims.c.until > stamp,
                          ~sa.exists().where(reviews.c.decision_id == decisions.c.id))
                   .order_by(decisions.c.id).limit(1))
            mine = conn.execute(own).mappings().first() if keep else None
            # Asking again (a page reload, a retry after a lost answer) gives back the item already held, its
            # lease renewed: one person holds one item, never a growing pile of them.
            while mine is None:
                row = conn.execute(q).mappings().first()
                if row is None:
                    return None
                # The row lock does not re-check the claims table: a claimer that waited on this row's lock read
                # it with the snapshot from before the other claim committed. A new statement sees that claim.
                again = sa.select(review_claims.c.decision_id).where(review_claims.c.decision_id == row["id"],
                                                                     review_claims.c.until > stamp)
                if conn.execute(again).first() is None:
                    break
            row = mine or row
            conn.execute(sa.delete(review_claims).where(review_claims.c.decision_id == row["id"]))
            conn.execute(sa.insert(review_claims).values(decision_id=row["id"], reviewer=reviewer,
                                                         until=until.isoformat(timespec="milliseconds")))
        return dict(row)

    def claims(self) -> dict[int, dict[str, str]]:
        """The live review claims: decision id -> ``reviewer`` and ``until``."""
        q = sa.select(review_claims).where(review_claims.c.until > utc_now())
        with self._tx() as conn:
            rows = conn.execute(q).mappings()
            return {r["decision_id"]: {"reviewer": r["reviewer"], "until": r["until"]} for r in rows}

    def reviewed(self, since: str | None = None) -> list[dict[str, Any]]:
        """Reviewed decisions with their latest human label (``label``, ``reviewer``, ``reviewed_at``)."""
        latest = (sa.select(reviews.c.decision_id, sa.func.max(reviews.c.id).label("rid"))
                  .group_by(reviews.c.decision_id).subquery())
        q = (sa.select(decisions, reviews.c.label, reviews.c.reviewer, reviews.c.time.label("reviewed_at"),
                       reviews.c.comment)
             .join(latest, latest.c.decision_id == decisions.c.id)
             .join(reviews, reviews.c.id == latest.c.rid)
             .order_by(decisions.c.id))
        if since:
            q = q.where(decisions.c.time >= since)
        with self._tx() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def _done_since(self, since: str, station: str | None, replica: str | None = None) -> list[Any]:
        conds = [decisions.c.time >= since, decisions.c.status == "done"]
        if station is not None:
            conds.append(decisions.c.station == station)
        if replica is not None:
            conds.append(decisions.c.replica == replica)
        return conds

    def minute_counts(self, since: str, station: str | None = None,
                      replica: str | None = None) -> list[tuple[str, str, int]]:
        """Finished decisions per minute (``"YYYY-MM-DDTHH:MM"``, UTC) and decision since ``since``,
        counted in the database (ISO text times: a prefix is a minute on every backend)."""
        minute = sa.func.substr(decisions.c.time, 1, 16).label("minute")
        q = (sa.select(minute, decisions.c.decision, sa.func.count())
             .where(*self._done_since(since, station, replica)).group_by(minute, decisions.c.decision))
        with self._tx() as conn:
            return [(m, d, int(n)) for m, d, n in conn.execute(q)]

    def minute_model_counts(self, since: str, station: str | None = None,
                            replica: str | None = None) -> list[tuple[str, str, str | None, str | None, int]]:
        """:meth:`minute_counts` per model and recorded verdict too: (minute, decision, model_id, verdict, n). A
        class name means what the model that decided it says (its good class passes), so a store written by
        several models is counted per model."""
        minute = sa.func.substr(decisions.c.time, 1, 16).label("minute")
        cols = (minute, decisions.c.decision, decisions.c.model_id, decisions.c.verdict)
        q = sa.select(*cols, sa.func.count()).where(*self._done_since(since, station, replica)).group_by(*cols)
        with self._tx() as conn:
            return [(m, d, model, v, int(n)) for m, d, model, v, n in conn.execute(q)]

    def model_classes(self, model_ids: Iterable[str | None]) -> dict[str | None, list[str]]:
        """The classes of each of ``model_ids``: the keys of its newest row's ``probabilities`` (every row stores
        its own model's distribution). A model none of whose rows carries probabilities (only unreadable images) is
        absent. Remembered per store: a model id is its file's hash, so its classes do not change (rows without a
        model id, from old writers, are remembered as first found)."""
        wanted = [m for m in dict.fromkeys(model_ids) if m not in self._classes]
        found: dict[str | None, list[str] | None] = {}
        if wanted:
            with self._tx() as conn:
                for model_id in wanted:
                    same = decisions.c.model_id.is_(None) if model_id is None else decisions.c.model_id == model_id
                    # Newest first by primary key: no index on model_id is needed, and the scan stops at its
                    # first row (once per model, then remembered).
                    probs = conn.execute(sa.select(decisions.c.probabilities)
                                         .where(same, decisions.c.probabilities.is_not(None))
                                         .order_by(decisions.c.id.desc()).limit(1)).scalar()
                    found[model_id] = _class_names(probs, self, model_id)
            if len(self._classes) > 1024:
                self._classes.clear()
            # Only what was found is remembered: a model with no readable row yet is asked again next time.
            self._classes.update((m, c) for m, c in found.items() if c is not None)
        return {m: c for m in dict.fromkeys(model_ids) if (c := self._classes.get(m, found.get(m))) is not None}

    def sample(self, since: str, max_rows: int = 5_000, station: str | None = None,
               replica: str | None = None) -> list[tuple[Any, ...]]:
        """(time, confidence, total_ms) of the finished decisions since ``since``: all of them, or every
        k-th by id when there are more than ``max_rows`` (enough for quantiles, bounded cost)."""
        conds = self._done_since(since, station, replica)
        with self._tx() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(decisions).where(*conds)).scalar_one()
            k = max(1, -(-int(n) // max_rows))
            if k > 1:
                conds.append(decisions.c.id % k == 0)
            q = sa.select(decisions.c.time, decisions.c.confidence, decisions.c.total_ms).where(*conds)
            return [tuple(r) for r in conn.execute(q)]

    def recent_decisions(self, n: int = 500, station: str | None = None, replica: str | None = None) -> list[str]:
        """The decisions of the last ``n`` finished rows, oldest first."""
        q = sa.select(decisions.c.decision).where(decisions.c.status == "done")
        if station is not None:
            q = q.where(decisions.c.station == station)
        if replica is not None:
            q = q.where(decisions.c.replica == replica)
        with self._tx() as conn:
            return [d for (d,) in conn.execute(q.order_by(decisions.c.id.desc()).limit(n))][::-1]

    def replica_counts(self, since: str, station: str | None = None) -> list[dict[str, Any]]:
        """Per replica (NULL: the sorter) and model: finished decisions by kind since ``since`` and the newest row's
        time, counted in the database."""
        cols = (decisions.c.replica, decisions.c.model_id, decisions.c.decision)
        q = (sa.select(*cols, sa.func.count(), sa.func.max(decisions.c.time))
             .where(*self._done_since(since, station)).group_by(*cols))
        with self._tx() as conn:
            return [{"replica": r, "model_id": m, "decision": d, "n": int(n), "last": t}
                    for r, m, d, n, t in conn.execute(q)]

    # ------------------------------------------------------------------------ the station's model, shared
    def publish_model(self, model_id: str, replica: str) -> int:
        """Say that the station now runs ``model_id`` (loaded by ``replica``); returns the generation number."""
        with self._tx(write=True) as conn:
            res = conn.execute(sa.insert(model_generations).values(time=utc_now(), model_id=model_id, replica=replica))
            return int(res.inserted_primary_key[0])

    def latest_model(self) -> dict[str, Any] | None:
        """The newest model generation (``id``, ``time``, ``model_id``, ``replica``), None before the first."""
        q = sa.select(model_generations).order_by(model_generations.c.id.desc()).limit(1)
        with self._tx() as conn:
            row = conn.execute(q).mappings().first()
        return dict(row) if row else None

    def window(self, since: str, until: str | None = None) -> list[dict[str, Any]]:
        """The columns the dashboard's statistics need, for finished decisions in a time window."""
        cols = [decisions.c[c] for c in ("id", "time", "decision", "top_class", "confidence", "drift_score",
                                         "model_id", "total_ms", "source", "station")]
        q = sa.select(*cols).where(decisions.c.time >= since, decisions.c.status == "done").order_by(decisions.c.id)
        if until:
            q = q.where(decisions.c.time < until)
        with self._tx() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]


def _class_names(probabilities: str | None, store: Store, model_id: str | None) -> list[str] | None:
    """The class names of one stored ``probabilities`` (JSON object text), None when there is none to read."""
    if probabilities is None:
        return None
    try:
        parsed = json.loads(probabilities)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        log.warning("%s: model %s: its newest row's probabilities are not a JSON object; its classes are unknown",
                    store, model_id)
        return None
    return [str(c) for c in parsed]


def _values(record: dict[str, Any], status: str) -> dict[str, Any]:
    unknown = set(record) - set(_WRITABLE)
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}; valid: {list(_WRITABLE)}")
    values = {k: v for k, v in record.items() if k in _WRITABLE}
    if isinstance(values.get("probabilities"), dict):
        values["probabilities"] = json.dumps(values["probabilities"])
    values.setdefault("request_id", "")
    values.setdefault("source", "sort")
    # REVIEW and Drift decisions wait for a person whoever made them (the sorter does not say so itself).
    values.setdefault("needs_review", values.get("decision") in (labels.REVIEW, labels.DRIFT))
    # A decision that is not a class is its own verdict; a class's verdict is its writer's to give (PASS / REJECT
    # by the good class of the model that decided it), else NULL.
    if values.get("verdict") is None and values.get("decision") in labels.NOT_AUTOMATIC:
        values["verdict"] = values["decision"]
    if values.get("verdict") not in VERDICTS:
        raise ValueError(f"verdict {values['verdict']!r} of decision {values.get('decision')!r}: not one of "
                         f"{sorted(v for v in VERDICTS if v)} or None")
    values.update(time=utc_now(), status=status)
    return values


def _sqlite_setup(engine: sa.Engine) -> None:
    """WAL + synchronous=FULL on every connection, and transactions under our control (pysqlite's own
    implicit BEGIN would run DDL outside them and cannot take the write lock up front)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get("sqlite_begin", "DEFERRED"))


def export_log(db: str | Path, out_csv: str | Path) -> int:
    """``defectscope log export DB --out CSV``: every decision as CSV; returns the row count.

    Safe while a sorter or a service is writing. A missing SQLite file is an error, not a new empty log.
    """
    with Store(db, create=False) as store:
        return store.export_csv(out_csv)
