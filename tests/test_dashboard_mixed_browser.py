"""The dashboard in a real headless Chromium on a store of two models: the older model's classes are drawn under
their own names and coloured by that model's verdict, and its good class is not a defect of the current one."""

from __future__ import annotations

import httpx
import pytest
from test_dashboard_browser import browser  # noqa: F401 (the fixture)
from test_serve import config_for, running

from defectscope.station.store import Store

OLD = "0123456789abcdef"  # not the station model's id: an older model whose classes are "ok" / "crack"


def _old_rows(decision: str, n: int) -> list[dict]:
    probs = {"ok": 0.9, "crack": 0.1} if decision == "ok" else {"ok": 0.1, "crack": 0.9}
    return [{"request_id": f"old-{decision}-{i}", "file_name": f"old{i}.png", "source_path": "api:old",
             "content_sha256": f"old{decision}{i}", "size_bytes": 1, "decision": decision, "top_class": decision,
             "confidence": 0.9, "probabilities": probs, "model_id": OLD, "model_version": "old",
             "destination": "-", "total_ms": 4.0} for i in range(n)]


@pytest.mark.slow
def test_another_models_rows_in_the_browser(browser, station_model, tmp_path):  # noqa: F811
    config = config_for(tmp_path, station_model)
    with Store(config.db) as store:
        store.add_decisions(_old_rows("ok", 3) + _old_rows("crack", 1))
    with running(config) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('t-total').textContent === '4'")
        # One crack among four automatic decisions: 25 %, not the 100 % of naming "ok" a defect of this model.
        assert page.locator("#t-pbar").inner_text() == "25.00 %"
        ok = page.locator("#l-decisions span[data-kind='ok']")
        assert ok.get_attribute("data-verdict") == "PASS" and "ok 3" in ok.inner_text()
        assert OLD in ok.get_attribute("title")
        crack = page.locator("#l-decisions span[data-kind='crack']")
        assert crack.get_attribute("data-verdict") == "REJECT" and "crack 1" in crack.inner_text()
        green = ok.locator("i").evaluate("e => getComputedStyle(e).backgroundColor")
        assert green == "rgb(134, 239, 172)"  # another model's good class: a lighter green, never a defect colour
        assert page.locator("#pchart-note").inner_text() == ""
        page.screenshot(path=str(tmp_path / "mixed.png"), full_page=True)
        page.close()
        d = httpx.get(url + "/v1/dashboard", timeout=30).json()
        assert d["model"]["id"] != OLD and d["kinds"]["ok"]["verdict"] == "PASS"
    assert problems == []


def _review_row(i: int) -> dict:
    return {"request_id": f"rq-{i}", "file_name": f"rq{i}.png", "source_path": "api:rq", "content_sha256": f"rq{i}",
            "size_bytes": 1, "decision": "REVIEW", "top_class": "ok", "confidence": 0.5,
            "probabilities": {"ok": 0.5, "crack": 0.5}, "model_id": OLD, "model_version": "old", "destination": "-"}


@pytest.mark.slow
def test_the_review_tile_and_the_queue_panel_agree_after_an_insert(browser, station_model, tmp_path):  # noqa: F811
    """The tile came from /v1/dashboard (shared for 2 s), the panel from /v1/review/queue: a row queued between
    two refreshes showed 1 in one and 2 in the other."""
    config = config_for(tmp_path, station_model)
    with Store(config.db) as store:
        store.add_decisions([_review_row(0)])
    with running(config) as url, Store(config.db) as store:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('rq-count').textContent === '(1 waiting)'")
        page.evaluate("refresh()")  # the dashboard's answer, now cached for the next 2 s
        store.add_decisions([_review_row(1)])
        page.evaluate("refresh()")
        shown = page.evaluate("() => [document.getElementById('t-queue').textContent, "
                              "document.getElementById('rq-count').textContent]")
        assert shown == ["2", "(2 waiting)"]
        page.close()
