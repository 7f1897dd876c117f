"""The results store: one schema on SQLite and a real PostgreSQL, the sorter's interface, the service's."""

from __future__ import annotations

import csv
import sqlite3
import threading
import uuid

import pytest
import sqlalchemy as sa
from helpers import fresh_postgres_database

from defectscope.station import spc
from defectscope.station import store as store_mod
from defectscope.station.corrections import export_corrections
from defectscope.station.store import COLUMNS, Store, StoreError, database_url, export_log, sqlite_path


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return fresh_postgres_database(request.getfixturevalue("postgres_url"))


def record(i: int = 0, **kw) -> dict:
    base = {"file_name": f"img_{i}.png", "source_path": f"/in/img_{i}.png", "content_sha256": f"{i:064x}",
            "size_bytes": 100 + i, "decision": "GOOD", "top_class": "GOOD", "confidence": 0.9,
            "probabilities": {"GOOD": 0.9, "scratch": 0.1}, "drift_score": None, "model_id": "m1",
            "model_version": "v", "destination": f"/out/GOOD/img_{i}.png"}
    return {**base, **kw}


def test_sorter_interface_round_trip(url, tmp_path):
    with Store(url) as s:
        a = s.begin(record(1))
        b = s.begin(record(2))
        assert s.find(record(1)["content_sha256"], "img_1.png")["status"] == "pending"
        s.mark_done(a)
        s.mark_error(b, "disk full")
        assert s.counts() == {"done": 1, "error": 1}
        assert [r["status"] for r in s.rows()] == ["done", "error"]
        assert [r["id"] for r in s.rows("error")] == [b] and s.rows("error")[0]["error"] == "disk full"
        assert s.find("f" * 64, "img_1.png") is None
        # An error row is reused by the retry, keeping its id.
        assert s.begin(record(2, decision="scratch"), b) == b
        s.mark_done(b)
        row = s.find(record(2)["content_sha256"], "img_2.png")
        assert row["decision"] == "scratch" and row["status"] == "done" and row["source"] == "sort"
        # The same bytes under the same name are one image: a second row is refused.
        with pytest.raises(StoreError):
            s.begin(record(1))
        assert isinstance(StoreError("x"), sqlite3.Error)  # the sorter's `except sqlite3.Error` catches it
        assert s.export_csv(tmp_path / "log.csv") == 2
    with open(tmp_path / "log.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and table[0]["probabilities"] == '{"GOOD": 0.9, "scratch": 0.1}'


def test_schema_from_migrations_matches_the_tables_the_code_queries(url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with Store(url) as s, s.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), store_mod.TABLES)
        assert diff == []
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == store_mod.HEAD
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(store_mod._MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == store_mod.HEAD


def test_dashboard_queries_use_the_done_since_indexes(tmp_path):
    """The dashboard's window queries (done rows since a time, per station or not) are served by the composite
    indexes, not a scan through the status index that every done row matches."""
    with Store(tmp_path / "log.db") as s:
        for i in range(50):
            s.mark_done(s.begin(record(i)))
        with s.engine.connect() as conn:
            def plan(where: str) -> str:
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN SELECT count(*) FROM decisions WHERE {where}")
                return " ".join(str(r[-1]) for r in rows)
            assert "decisions_status_time" in plan("status = 'done' AND time >= '2026-01-01'")
            assert "decisions_station_status_time" in plan(
                "status = 'done' AND time >= '2026-01-01' AND station = 'line-1'")


def test_service_rows_queries_and_reviews(url):
    with Store(url) as s:
        sort_id = s.begin(record(0))
        s.mark_done(sort_id)
        # The same image posted twice is two inspections: rows keyed by request.
        recs = [record(0, request_id=uuid.uuid4().hex, station="A", needs_review=True, decision="REVIEW"),
                record(0, request_id=uuid.uuid4().hex, station="B", model_id="m2"),
                record(3, request_id=uuid.uuid4().hex, station="A", lot="L'; DROP TABLE decisions;--")]
        ids = s.add_decisions(recs)
        assert len(set(ids)) == 3
        assert s.get(ids[2])["lot"] == "L'; DROP TABLE decisions;--" and s.get(ids[0])["source"] == "api"
        assert s.find(record(0)["content_sha256"], "img_0.png")["id"] == sort_id  # the sorter's row only
        rows, total = s.query(station="A")
        assert total == 2 and [r["id"] for r in rows] == [ids[2], ids[0]]
        assert s.query(model="m2")[1] == 1 and s.query(decision="REVIEW")[1] == 1 and s.query(source="sort")[1] == 1
        page, total = s.query(limit=2, offset=1)
        assert total == 4 and [r["id"] for r in page] == [ids[1], ids[0]]
        first = s.get(sort_id)["time"]
        assert s.query(since=first)[1] == 4 and s.query(until=first)[1] == 0

        queue, n = s.review_queue()
        assert n == 1 and queue[0]["id"] == ids[0]
        assert s.flag(ids[1]) and not s.flag(10**6)
        assert s.review_queue()[1] == 2
        s.add_review(ids[0], "scratch", "ann", "line at the edge")
        s.add_review(ids[0], "GOOD", "bob")  # a later review overrides
        assert [r["id"] for r in s.review_queue()[0]] == [ids[1]]
        with pytest.raises(KeyError):
            s.add_review(10**6, "GOOD", "ann")
        reviewed = s.reviewed()
        assert [(r["id"], r["label"], r["reviewer"]) for r in reviewed] == [(ids[0], "GOOD", "bob")]
        assert [r["label"] for r in s.reviews(ids[0])] == ["scratch", "GOOD"]
        assert len(s.window(first)) == 4
        # The dashboard's aggregates, computed by the database, equal the ones from the rows.
        counts, samples, recent = spc.aggregate(s.window(first))
        assert sorted(s.minute_counts(first)) == sorted(counts)
        assert sorted(s.sample(first)) == sorted(samples) and s.recent_decisions(500) == recent
        assert len(s.sample(first, max_rows=2)) == 2 and s.recent_decisions(2) == recent[-2:]
        assert sum(n for *_, n in s.minute_counts(first, station="A")) == 2


def test_concurrent_writers_lose_nothing(url):
    """Several threads (the service's handlers) and a second Store (another process) writing at once."""
    with Store(url) as s1, Store(url) as s2:
        def work(store: Store, start: int) -> None:
            for i in range(start, start + 15):
                store.add_decisions([record(i, request_id=uuid.uuid4().hex)])
                rid = store.begin(record(1000 + i))
                store.mark_done(rid)

        threads = [threading.Thread(target=work, args=(s, k * 100)) for k, s in enumerate([s1, s2, s1, s2])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s1.counts() == {"done": 120}


def test_bare_path_is_sqlite_and_bad_urls_are_refused(tmp_path):
    assert database_url(tmp_path / "r.db") == f"sqlite:///{tmp_path / 'r.db'}"
    assert database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert sqlite_path("postgresql://u@h/db") is None and sqlite_path(tmp_path / "x.db") == tmp_path / "x.db"
    with pytest.raises(ValueError, match="unsupported database URL"):
        database_url("mysql://root:secret@h/db")
    with pytest.raises(FileNotFoundError):
        export_log(tmp_path / "missing.db", tmp_path / "x.csv")
    with Store(tmp_path / "sub" / "r.db") as s:
        journal = s.engine.connect().exec_driver_sql("PRAGMA journal_mode").scalar()
        sync = s.engine.connect().exec_driver_sql("PRAGMA synchronous").scalar()
    assert journal == "wal" and sync == 2  # 2 = FULL


def test_a_log_of_the_old_stdlib_resultlog_is_upgraded_in_place(tmp_path):
    """defectscope 0.1's sorter wrote its log with hand-written DDL: it must open, keep its rows, and work."""
    db = tmp_path / "results.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE decisions (
            id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, file_name TEXT NOT NULL,
            source_path TEXT NOT NULL, content_sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL,
            decision TEXT NOT NULL, top_class TEXT, confidence REAL, probabilities TEXT, drift_score REAL,
            model_id TEXT, model_version TEXT, destination TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'error')), error TEXT,
            UNIQUE (content_sha256, file_name));
        CREATE INDEX decisions_status ON decisions (status);
        INSERT INTO decisions (time, file_name, source_path, content_sha256, size_bytes, decision, destination, status)
        VALUES ('2024-01-01T00:00:00.000+00:00', 'a.png', '/in/a.png', 'abc', 3, 'GOOD', '/out/GOOD/a.png', 'done');
    """)
    conn.close()
    with Store(db) as s:
        old = s.find("abc", "a.png")
        assert old["status"] == "done" and old["source"] == "sort" and old["request_id"] == ""
        with pytest.raises(StoreError):
            s.begin(record(0, content_sha256="abc", file_name="a.png"))
        s.add_decisions([record(0, content_sha256="abc", file_name="a.png", request_id="r1")])
        assert s.counts() == {"done": 2}
        with pytest.raises(sa.exc.IntegrityError), s.engine.begin() as conn:  # the CHECK survived the rebuild
            conn.exec_driver_sql("UPDATE decisions SET status = 'bogus'")


def test_review_export_is_a_training_manifest(url, tmp_path):
    from defectscope.data.table import load_table

    images = []
    for i in range(3):
        p = tmp_path / f"img_{i}.png"
        p.write_bytes(b"x")
        images.append(p)
    with Store(url) as s:
        ids = s.add_decisions([record(i, request_id=f"r{i}", image_path=str(p)) for i, p in enumerate(images)])
        s.add_review(ids[0], "scratch", "ann")
        s.add_review(ids[1], "Drift", "ann")
        s.add_review(ids[2], "spot", "bob")
    out = tmp_path / "corrections.csv"
    assert export_corrections(url, out) == 2
    table, skipped = load_table(out)
    assert sorted(table["label"]) == ["scratch", "spot"] and not skipped
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["filename"], r["label"], r["reviewer"]) for r in rows] == [
        (str(images[0]), "scratch", "ann"), (str(images[2]), "spot", "bob")]
    assert export_corrections(url, out, include_drift=True) == 3


def test_the_sorter_writes_to_any_store_url_and_its_doubtful_images_wait_for_review(url, station_model, tmp_path):
    import numpy as np
    from conftest import CLASSES, make_image
    from PIL import Image

    from defectscope.cli import build_parser
    from defectscope.station.sorter import sort

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    rng = np.random.default_rng(3)
    for i in range(9):
        Image.fromarray(make_image(CLASSES[i % 3], rng)).save(inbox / f"img_{i}.png")
    summary = sort(station_model, inbox, out, log_path=url, settle_seconds=0, progress=False)
    assert summary["processed"] == 9 and not (out / "results.db").exists()
    with Store(url) as s:
        rows = s.rows()
        assert len(rows) == 9 and {r["status"] for r in rows} == {"done"} and {r["source"] for r in rows} == {"sort"}
        queue, n = s.review_queue()
        assert n == sum(r["decision"] in ("REVIEW", "Drift") for r in rows)
        assert all(q["destination"].startswith(str(out)) for q in queue)
    for flag in ("--db", "--log"):
        args = build_parser().parse_args(["sort", "m.onnx", "--inbox", "i", "--out", "o", flag, url])
        assert args.db == url


def test_two_replicas_claiming_the_review_queue_never_share_an_item(url):
    """Two stores (two replicas' connections) draining one queue at once: each item to one reviewer."""
    with Store(url) as seed:
        ids = seed.add_decisions([{**record(i, decision="REVIEW"), "request_id": f"r{i}"} for i in range(30)])
    got: dict[str, list[int]] = {"a": [], "b": []}

    def drain(name: str) -> None:
        with Store(url) as store:
            while (item := store.claim_review(name)) is not None:
                got[name].append(item["id"])

    threads = [threading.Thread(target=drain, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got["a"] + got["b"]) == sorted(ids)  # every item handed out once, none twice
    with Store(url) as store:
        assert store.claim_review("c") is None  # all held
        assert store.claim_review("c", lease_seconds=0) is None
        store.add_review(ids[0], "GOOD", "a")
        assert store.review_queue()[1] == 29  # claims do not hide items from the queue's count
