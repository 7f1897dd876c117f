"""Migration 0005: each decision keeps the verdict its writer saw (PASS / REJECT / REVIEW / Drift / _unreadable),
so a store written by several models is counted by each row's own verdict even when a model's good class is not
named like GOOD. Old rows are upgraded in place: non-class decisions get their own verdict, class rows NULL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from helpers import fresh_postgres_database
from test_dashboard_models import CLASSES, NEW, ODD, _rows, _services

from defectscope.station import store as store_mod
from defectscope.station.serve.routes.dashboard import _dashboard
from defectscope.station.store import Store, database_url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return fresh_postgres_database(request.getfixturevalue("postgres_url"))


def test_a_store_at_0004_is_upgraded_and_its_non_class_rows_get_their_verdict(url):
    engine = sa.create_engine(database_url(url))
    cfg = Config()
    cfg.set_main_option("script_location", str(store_mod._MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        for i, decision in enumerate(["GOOD", "REVIEW", "Drift", "_unreadable"]):
            conn.exec_driver_sql(
                "INSERT INTO decisions (time, file_name, source_path, content_sha256, size_bytes, decision, "
                "destination, status, request_id, source, needs_review) VALUES "
                f"('2024-01-01T00:00:00.000+00:00', '{i}.png', '/in', 'h{i}', 1, '{decision}', '-', 'done', '', "
                "'sort', false)")
    engine.dispose()
    with Store(url) as store:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == store_mod.HEAD == "0005"
        verdicts = {r["decision"]: r["verdict"] for r in store.rows()}
    assert verdicts == {"GOOD": None, "REVIEW": "REVIEW", "Drift": "Drift", "_unreadable": "_unreadable"}


def test_a_recorded_verdict_is_what_the_dashboard_counts(url):
    # ODD's good class ("functional") is named like none of GOOD / ok / pass: only its rows' verdicts tell.
    rows = ([{**r, "verdict": "PASS"} for r in _rows(ODD, "functional", 3)]
            + [{**r, "verdict": "REJECT"} for r in _rows(ODD, "broken", 1)] + _rows(ODD, "REVIEW", 1)
            + _rows(NEW, "functional", 2) + _rows(NEW, "crack", 1))
    with Store(url) as store:
        store.add_decisions(rows)
        assert {r["decision"]: r["verdict"] for r in store.rows() if r["model_id"] == ODD} == \
            {"functional": "PASS", "broken": "REJECT", "REVIEW": "REVIEW"}
        d = _dashboard(_services(store), 1, 60, None, None)
    assert d["verdict_unknown"]["decisions"] == 0
    assert d["kinds"]["functional"]["models"] == [NEW, ODD] and sum(d["decisions_by_kind"]["functional"]) == 5
    assert d["kinds"]["broken"]["verdict"] == "REJECT"
    assert sum(d["p_chart"]["defects"]) == 2 and sum(d["p_chart"]["n"]) == 7
    assert set(CLASSES[ODD]) <= set(d["kinds"])


def test_an_unknown_verdict_is_refused_with_the_row_it_came_with(tmp_path):
    with Store(tmp_path / "r.db") as store, pytest.raises(ValueError, match="verdict 'pass' of decision 'GOOD'"):
        store.add_decisions([{**_rows(ODD, "functional", 1)[0], "decision": "GOOD", "verdict": "pass"}])
