"""Bounded fuzzing of the station's API on a live server: no input may produce a 5xx or kill it."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import config_for, png, running

FUZZ = settings(max_examples=15, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GOOD = png("spot", 3)
# Header values a client can send at all (h11 refuses surrounding blanks before anything leaves).
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(str.strip)
any_text = st.text(max_size=200)


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "good"]))
    if kind == "random":
        return draw(st.binary(max_size=3000))
    if kind == "truncated":
        return GOOD[: draw(st.integers(0, len(GOOD)))]
    if kind == "flipped":
        data = bytearray(GOOD)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    return GOOD


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def station(request, station_model, tmp_path_factory):
    """A live server on each backend: PostgreSQL is stricter (32-bit ids, no NUL in text)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    db = str(tmp / "results.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    config = config_for(tmp, station_model, db=db, data=tmp / "data", max_files=6, max_request_bytes=2 << 20,
                        max_upload_bytes=1 << 20, max_pixels=1_000_000)
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, config


def assert_clean(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert "detail" in r.json()


@pytest.mark.slow
@FUZZ
@given(body=bodies(), ctype=st.one_of(st.sampled_from(["image/png", "application/octet-stream", "image/jpeg",
                                                        "multipart/form-data", "text/plain", ""]), header_text),
       params=st.dictionaries(st.sampled_from(["station", "lot", "part_id", "name"]), any_text, max_size=4))
def test_fuzz_predict_raw(station, body, ctype, params):
    client, _ = station
    assert_clean(client.post("/v1/predict", content=body, params=params, headers={"Content-Type": ctype}))


@pytest.mark.slow
@FUZZ
@given(files=st.lists(st.tuples(st.sampled_from(["file", "other"]), any_text, bodies()), max_size=4),
       data=st.dictionaries(st.sampled_from(["station", "lot", "part_id", "file"]), any_text, max_size=4))
def test_fuzz_predict_multipart(station, files, data):
    client, _ = station
    parts = [(field, (name, body, "image/png")) for field, name, body in files] or [("x", ("x", b"1"))]
    assert_clean(client.post("/v1/predict", files=parts, data=data))


@pytest.mark.slow
@FUZZ
@given(params=st.dictionaries(st.sampled_from(["since", "until", "decision", "model", "station", "source", "limit",
                                               "offset"]),
                              st.one_of(any_text, st.integers(-10, 10**12).map(str)), max_size=6),
       review=st.fixed_dictionaries({"decision_id": st.one_of(st.integers(-5, 10**12), any_text),
                                     "label": st.one_of(any_text, st.sampled_from(["GOOD", "Drift"]))},
                                    optional={"reviewer": any_text, "comment": any_text}),
       decision_id=st.integers(-5, 10**12))
def test_fuzz_reads_and_reviews(station, params, review, decision_id):
    client, _ = station
    assert_clean(client.get("/v1/results", params=params))
    assert_clean(client.get("/v1/dashboard", params={k: v for k, v in params.items() if k in ("limit",)}))
    assert_clean(client.post("/v1/reviews", json=review))
    assert_clean(client.get(f"/v1/decisions/{decision_id}"))
    assert_clean(client.get(f"/v1/decisions/{decision_id}/image"))
