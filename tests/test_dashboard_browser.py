"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): loads clean, shows a posted
image in the charts and the review queue, and a relabel clicked in the page is stored and exported."""

from __future__ import annotations

import csv
import os
import shutil

import httpx
import pytest
from test_serve import config_for, png, running

from defectscope.station.corrections import export_corrections
from defectscope.station.store import Store

CHROMIUM = os.environ.get("DEFECTSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the serve test extra)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.mark.slow
def test_dashboard_review_in_the_browser(browser, station_model, tmp_path):
    config = config_for(tmp_path, station_model, pilot=True)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('t-total').textContent === '0'")
        assert page.locator("#rq-empty").is_visible()

        first = client.post("/v1/predict", files=[("file", ("one.png", png("scratch", 1), "image/png"))],
                            data={"station": "<img src=x onerror=alert(1)>"}).json()["results"][0]
        page.evaluate("refresh()")
        page.wait_for_function("() => document.getElementById('t-total').textContent === '1'")
        assert page.locator("#c-decisions rect").count() >= 1  # the decision is in the per-bucket chart
        assert page.locator("#c-pchart circle").count() >= 1  # and on the p-chart
        assert page.locator("#c-automation circle").count() >= 1  # and in the automation-rate series
        assert page.locator("#t-automation").inner_text().endswith("%")
        page.wait_for_selector("#rq-item:not([hidden])")
        assert f"#{first['id']} one.png" in page.locator("#rq-meta").inner_text()
        page.wait_for_function("() => document.getElementById('rq-image').complete && "
                               "document.getElementById('rq-image').naturalWidth === 40")
        assert page.locator("#rq-probs .prob").count() == 3
        assert "<img" in page.locator("#rq-meta").inner_text()  # hostile metadata shown as text, not markup

        relabel = next(label for label in ("GOOD", "scratch", "spot") if label != first["class"])
        page.fill("#reviewer", "ann")
        page.click(f"#rq-buttons button[data-label='{relabel}']:not(.confirm)")
        page.wait_for_function("() => document.getElementById('rq-msg').textContent.startsWith('stored')")
        with Store(config.db) as store:
            assert [(r["label"], r["reviewer"]) for r in store.reviews(first["id"])] == [(relabel, "ann")]

        # Keyboard: Enter confirms the model's class.
        second = client.post("/v1/predict", content=png("spot", 2), headers={"Content-Type": "image/png"}).json()
        second = second["results"][0]
        page.evaluate("refresh()")
        page.wait_for_function(f"() => document.getElementById('rq-meta').textContent.includes('#{second['id']} ')")
        page.locator("body").click(position={"x": 5, "y": 300})
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.getElementById('rq-msg').textContent.startsWith('stored')")
        with Store(config.db) as store:
            assert [r["label"] for r in store.reviews(second["id"])] == [second["class"]]
        page.evaluate("refresh()")
        page.wait_for_selector("#rq-empty:not([hidden])")
        page.wait_for_function("() => document.getElementById('pilot').textContent.includes('2 / 2') || "
                               "document.getElementById('pilot').textContent.includes('/ 2')")

        replicas = page.locator("#replicas").inner_text()  # this process's own row, with its decisions
        assert f"{config.replica} (this one)" in replicas and "sorter" not in replicas

        out = tmp_path / "corrections.csv"
        assert export_corrections(config.db, out) == 2
        with open(out, newline="") as f:
            labels = {int(r["decision_id"]): r["label"] for r in csv.DictReader(f)}
        assert labels == {first["id"]: relabel, second["id"]: second["class"]}
        page.screenshot(path=str(os.environ.get("DEFECTSCOPE_SCREENSHOT") or tmp_path / "dashboard.png"),
                        full_page=True)
        page.close()
        assert problems == []


@pytest.mark.slow
def test_dashboard_with_keys_in_the_browser(browser, station_model, tmp_path):
    """Keys set: the page loads, asks for a key, draws with a read-only key (images fetched with it) and says
    that a read-only key cannot store a review; with a full key the review is stored."""
    from test_serve import KEY
    from test_serve_attack import READ_KEY

    config = config_for(tmp_path, station_model, api_keys=frozenset({KEY}), read_keys=frozenset({READ_KEY}))
    with running(config) as url, httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": KEY}) as client:
        first = client.post("/v1/predict", files=[("file", ("k.png", png("scratch", 3), "image/png"))]).json()
        first = first["results"][0]
        client.post(f"/v1/decisions/{first['id']}/review-request").raise_for_status()
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('401')")
        assert page.locator("#key-label").is_visible()
        page.fill("#apikey", READ_KEY)
        page.dispatch_event("#apikey", "change")
        page.wait_for_function("() => document.getElementById('t-total').textContent === '1'")
        page.wait_for_function("() => document.getElementById('rq-image').complete && "
                               "document.getElementById('rq-image').naturalWidth === 40")
        page.click("#rq-buttons button.confirm")
        page.wait_for_function("() => document.getElementById('rq-msg').textContent.includes('403')")
        page.fill("#apikey", KEY)
        page.dispatch_event("#apikey", "change")  # a refresh in flight while the review is stored
        page.click("#rq-buttons button.confirm")
        page.wait_for_function("() => document.getElementById('rq-msg').textContent.startsWith('stored')")
        # A queue answer fetched before the review neither brings the item back nor wipes the message.
        page.evaluate("() => refresh()")
        page.wait_for_function("() => !document.getElementById('rq-empty').hidden")
        assert page.locator("#rq-msg").text_content().startswith("stored")
        with Store(config.db) as store:
            assert len(store.reviews(first["id"])) == 1
        page.close()
        assert problems == []


@pytest.mark.slow
def test_review_queue_item_without_its_image_shows_a_placeholder(browser, station_model, tmp_path):
    """A queued decision whose image file is gone, or was never stored, shows 'image not available' (no
    broken-image box, no heatmap over nothing); the next item with an image shows it again."""
    from pathlib import Path

    config = config_for(tmp_path, station_model, pilot=True)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        ids = [client.post("/v1/predict", files=[("file", (f"{i}.png", png("scratch", i), "image/png"))]).json()
               ["results"][0]["id"] for i in range(2)]
        with Store(config.db) as store:
            gone = store.get(ids[0])
            Path(gone["image_path"]).unlink()  # the file is gone from the station
            keep = ("file_name", "source_path", "content_sha256", "size_bytes", "decision", "top_class", "confidence",
                    "probabilities", "model_id", "station", "replica")
            record = {k: gone[k] for k in keep}  # a row stored without its image (destination empty, no image_path)
            record |= {"request_id": "no-image", "destination": "", "needs_review": True}
            never, = store.add_decisions([record])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(url + "/")
        page.wait_for_selector("#rq-item:not([hidden])")
        assert f"#{ids[0]} " in page.locator("#rq-meta").inner_text()
        page.wait_for_selector("#rq-noimage:not([hidden])")
        assert page.locator("#rq-noimage").inner_text() == "image not available"
        assert not page.locator("#rq-image").is_visible() and not page.locator("#rq-heatmap").is_visible()
        assert page.locator("#rq-noimage").get_attribute("title") == "the image file is no longer on the station"

        page.fill("#reviewer", "ann")
        page.locator("body").click(position={"x": 5, "y": 300})
        page.keyboard.press("Enter")  # confirm: the next item (with its image) comes up
        page.wait_for_function(f"() => document.getElementById('rq-meta').textContent.includes('#{ids[1]} ')")
        page.wait_for_function("() => document.getElementById('rq-image').complete && "
                               "document.getElementById('rq-image').naturalWidth === 40")
        assert page.locator("#rq-image").is_visible() and not page.locator("#rq-noimage").is_visible()

        page.locator("body").click(position={"x": 5, "y": 300})
        page.keyboard.press("Enter")
        page.wait_for_function(f"() => document.getElementById('rq-meta').textContent.includes('#{never} ')")
        page.wait_for_selector("#rq-noimage:not([hidden])")
        assert page.locator("#rq-noimage").get_attribute("title") == "this decision's image was not stored"
        assert not page.locator("#rq-image").is_visible()
        shot = os.environ.get("DEFECTSCOPE_SCREENSHOT")  # the committed screenshots: this one beside the other
        page.screenshot(path=str(Path(shot).with_name(Path(shot).stem + "_no_image.png") if shot
                                 else tmp_path / "no_image.png"), full_page=True)
        page.close()
        assert problems == []
