"""The dashboard on a store written by several models: each row counts by its own decision and its own model's
good class (PASS / REJECT / REVIEW / Drift), never by its class name against the current model's class list."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import fresh_postgres_database

from defectscope.station.serve.routes.dashboard import _dashboard
from defectscope.station.store import Store

NEW = "a1" * 8  # the model the station runs now: its good class is "functional" (a calibrated name)
OLD = "b2" * 8  # an older model: classes GOOD / scratch, GOOD passes
ODD = "c3" * 8  # a model whose good class is named like none of GOOD / ok / pass: the store cannot tell it

CLASSES = {NEW: ["functional", "crack", "finger"], OLD: ["GOOD", "scratch"], ODD: ["functional", "broken"]}


def _rows(model: str, decision: str, n: int, top: str | None = None) -> list[dict]:
    classes = CLASSES[model]
    top = top or (decision if decision in classes else classes[0])
    probs = {c: (0.9 if c == top else 0.1 / (len(classes) - 1)) for c in classes}
    return [{"request_id": f"{model}-{decision}-{i}", "file_name": f"{decision}{i}.png", "source_path": "api:x",
             "content_sha256": f"{model}{decision}{i}", "size_bytes": 1, "decision": decision, "top_class": top,
             "confidence": 0.9, "probabilities": probs, "model_id": model, "model_version": "t",
             "destination": "-", "total_ms": 5.0, "replica": "r"} for i in range(n)]


def _services(store: Store) -> SimpleNamespace:
    predictor = SimpleNamespace(classes=CLASSES[NEW], policy=None)
    model = SimpleNamespace(predictor=predictor, model_id=NEW, good_class="functional", drift_rate=None,
                            info=lambda: {"id": NEW, "classes": CLASSES[NEW], "good_class": "functional"})
    config = SimpleNamespace(max_dashboard_points=2000, escape_cap=0.05, pilot=False, replica="r", api_keys=[])
    return SimpleNamespace(config=config, models=SimpleNamespace(current=model), store=store,
                           batcher=SimpleNamespace(depth=0))


@pytest.fixture(params=["sqlite", "postgresql"])
def mixed(request, tmp_path):
    url = tmp_path / "results.db" if request.param == "sqlite" else \
        fresh_postgres_database(request.getfixturevalue("postgres_url"))
    with Store(url) as store:
        ids = store.add_decisions(
            _rows(NEW, "functional", 6) + _rows(NEW, "crack", 2) + _rows(NEW, "REVIEW", 1) + _rows(NEW, "Drift", 1)
            + _rows(OLD, "GOOD", 5) + _rows(OLD, "scratch", 1) + _rows(OLD, "REVIEW", 2)
            + _rows(ODD, "functional", 3))
        yield store, ids


def test_the_store_counts_per_model_and_reads_each_models_classes(mixed):
    store, _ = mixed
    since = "2000-01-01T00:00:00.000+00:00"
    counts = {(d, m): n for _, d, m, _, n in store.minute_model_counts(since)}
    assert counts[("functional", NEW)] == 6 and counts[("functional", ODD)] == 3 and counts[("GOOD", OLD)] == 5
    assert sum(counts.values()) == 21
    assert store.model_classes([NEW, OLD, ODD]) == CLASSES
    assert store.model_classes(["later", None]) == {}
    store.add_decisions([{**_rows(OLD, "GOOD", 1)[0], "model_id": "later", "request_id": "later"}])
    assert store.model_classes(["later"]) == {"later": CLASSES[OLD]}  # a miss is not remembered


def _total(d: dict, kind: str) -> int:
    return sum(d["decisions_by_kind"][kind])


def test_each_row_counts_by_its_own_models_verdict(mixed):
    store, _ = mixed
    d = _dashboard(_services(store), 1, 60, None, None)
    assert d["total"] == 21 and not d["other_decisions"]
    # Another model's classes are shown under their own names, its good class green like the current one's.
    assert _total(d, "GOOD") == 5 and _total(d, "scratch") == 1
    assert d["kinds"]["GOOD"]["verdict"] == "PASS" and d["kinds"]["scratch"]["verdict"] == "REJECT"
    assert d["kinds"]["GOOD"]["models"] == [OLD]
    # Defects: crack 2 (this model) + scratch 1 (the old one) among the 14 PASS/REJECT decisions; the old
    # model's GOOD rows are passes, not defects (the name-based count said 8 of 17).
    assert sum(d["p_chart"]["defects"]) == 3 and sum(d["p_chart"]["n"]) == 14
    assert d["p_chart"]["pbar"] == pytest.approx(3 / 14, abs=1e-6)
    # Automation counts every class decision of every model; review load every REVIEW row.
    assert d["automation"]["total_rate"] == pytest.approx(17 / 21, abs=1e-6)
    assert sum(d["automation"]["review"]) == 3 and _total(d, "Drift") == 1
    # The queue's depth here is as fresh as the answer, which says so (the page shows the queue's own total).
    assert d["review_queue"] == 3 + 1 and d["cache_seconds"] == 2.0 and d["as_of"].endswith("+00:00")


def test_a_model_whose_good_class_cannot_be_told_is_shown_apart_and_left_out_of_the_defect_rate(mixed):
    store, _ = mixed
    d = _dashboard(_services(store), 1, 60, None, None)
    # Its "functional" is not this model's "functional": shown under its name qualified by its model.
    odd = f"functional (model {ODD[:8]})"
    assert _total(d, "functional") == 6 and _total(d, odd) == 3
    assert d["kinds"][odd]["verdict"] is None
    assert d["verdict_unknown"] == {"decisions": 3, "kinds": {odd: 3}, "models": [ODD]}


def test_the_pilot_judges_another_models_rows_by_its_verdict(mixed):
    store, ids = mixed
    old_good, old_scratch = ids[10], ids[15]
    assert store.get(old_good)["decision"] == "GOOD" and store.get(old_scratch)["decision"] == "scratch"
    store.add_review(old_good, "GOOD", "ann")  # given while the old model ran: its own good class
    store.add_review(old_scratch, "functional", "ann")  # a good part the old model rejected: overkill
    store.add_review(ids[6], "crack", "ann")  # this model's crack, confirmed
    store.add_review(ids[-1], "functional", "ann")  # the unknown model's row: left out
    p = _dashboard(_services(store), 1, 60, None, None)["pilot"]
    assert p["reviewed_auto"] == 3 and p["verdict_unknown"] == 1
    assert (p["agreement"]["k"], p["agreement"]["n"]) == (2, 3)
    assert (p["escape"]["k"], p["escape"]["n"]) == (0, 1)  # the old GOOD, a good part: no escape
    assert (p["overkill"]["k"], p["overkill"]["n"]) == (1, 2)  # the old scratch was a good part


def test_a_store_of_one_model_is_counted_as_before(tmp_path):
    with Store(tmp_path / "results.db") as store:
        store.add_decisions(_rows(NEW, "functional", 4) + _rows(NEW, "finger", 1) + _rows(NEW, "REVIEW", 1))
        d = _dashboard(_services(store), 1, 60, None, None)
    assert list(d["kinds"]) == ["functional", "crack", "finger", "REVIEW", "Drift"]
    assert sum(d["p_chart"]["defects"]) == 1 and sum(d["p_chart"]["n"]) == 5 and d["verdict_unknown"]["decisions"] == 0


def test_a_name_that_means_two_verdicts_is_shown_twice_apart(tmp_path):
    from defectscope.station.serve.routes.dashboard import _Kinds

    with Store(tmp_path / "results.db") as store:
        kinds = _Kinds(_services(store).models.current, {OLD: CLASSES[OLD]})
    assert kinds.name("crack", NEW) == "crack" and kinds.name("crack", NEW, "REJECT") == "crack"
    assert kinds.name("crack", NEW, "PASS") == f"crack (model {NEW[:8]})"  # a writer that disagreed with itself
    assert kinds.name("crack", NEW, None) == "crack"
    assert kinds.name("GOOD", OLD) == "GOOD" and kinds.kinds["GOOD"]["verdict"] == "PASS"
    assert kinds.name("functional", ODD) == f"functional (model {ODD[:8]})"  # its classes unread: no verdict
    assert kinds.kinds[f"functional (model {ODD[:8]})"]["verdict"] is None
    assert kinds.name("functional", ODD, "PASS") == "functional"  # recorded: the same verdict, the same panel
