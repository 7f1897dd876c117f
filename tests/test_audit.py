"""The data audit finds every planted problem, names the files, and changes nothing."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from audit_fixture import make_audit_fixture

from defectscope.audit.core import AuditSettings, audit, cramers_v, label_suspects, near_pairs
from defectscope.data.checks import cheap_checks
from defectscope.data.table import load_table


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    planted = make_audit_fixture(root)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}
    result = audit(root / "manifest.csv", root / "out", settings=AuditSettings(features="pixels"),
                   split_column="split")
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
             if p.is_file() and "out" not in p.relative_to(root).parts}
    return root, planted, result, before, after


def _names(groups):
    return [sorted(f["name"].split("/")[-1] for f in g) for g in groups]


def test_planted_problems_found(audited):
    root, planted, r, _, _ = audited
    assert ["ring_00.png", planted["exact"]] in _names(r["exact_duplicates"])
    assert _names(r["leakage"]["exact"]) == [["ramp_01.png", planted["leak"]]]
    assert _names(r["near_duplicates"]) == [["ring_02.png", planted["near"]]]
    assert [x["name"].split("/")[-1] for x in r["label_suspects"]] == [planted["mislabel"]]
    assert r["label_suspects"][0]["suggested"] == "ramp"
    assert [u["path"].split("/")[-1] for u in r["unreadable"]] == [planted["unreadable"]]
    assoc = {a["column"]: a["cramers_v"] for a in r["metadata_association"]}
    assert assoc["tool"] > 0.5 and assoc["lot"] < 0.2
    assert r["classes"]["ring"]["train"] > 0 and r["sizes"]["distinct"] == 1 and r["modes"] == {"L": 52}


def test_reports_written_and_nothing_changed(audited):
    root, planted, r, before, after = audited
    assert before == after
    saved = json.loads((root / "out" / "audit.json").read_text())
    assert saved["summary"] == r["summary"]
    leak = pd.read_csv(root / "out" / "leakage.csv")
    assert set(leak["path"].str.split("/").str[-1]) == {"ramp_01.png", planted["leak"]}
    page = (root / "out" / "audit.html").read_text()
    assert planted["mislabel"] in page and "data:image/png;base64," in page


def test_near_pairs_is_exact_against_brute_force():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    flips = np.array([np.uint64(1) << np.uint64(b) for b in rng.integers(0, 64, size=40)], dtype=np.uint64)
    hashes = np.concatenate([base, base ^ flips, base[:10] ^ flips[:10] ^ (flips[10:20] << np.uint64(1))])
    for t in (0, 2, 4, 7):
        brute = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                 if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= t}
        assert {(i, j) for i, j, _ in near_pairs(hashes, t)} == brute


def test_cramers_v_bounds():
    labels = pd.Series(list("ab" * 50))
    assert cramers_v(labels, labels.map({"a": "x", "b": "y"})) == pytest.approx(1.0, abs=0.02)
    noise = pd.Series(np.random.default_rng(0).choice(list("xyz"), size=100))
    assert cramers_v(labels, noise) < 0.15


def test_label_suspects_needs_a_clear_majority():
    feats = np.r_[np.ones((10, 2)) + np.random.default_rng(0).normal(0, 0.01, (10, 2)), [[1, 1.01]]]
    labels = np.array(["a"] * 10 + ["b"])
    assert [s["row"] for s in label_suspects(feats, labels, k=5, min_share=0.6)] == [10]


def test_cheap_checks_name_leakage(audited):
    root, planted, _, _, _ = audited
    table, _ = load_table(root / "manifest.csv", split_column="split", skip_bad=True)
    warnings = cheap_checks(table)
    assert any("span splits" in w and planted["leak"] in w for w in warnings)
    assert any("exact duplicate" in w for w in warnings)


def test_audit_cli(tmp_path, capsys):
    from defectscope.cli import main

    planted = make_audit_fixture(tmp_path, n_per_class=12)
    assert main(["audit", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "out"), "--features", "pixels",
                 "--split-column", "split"]) == 0
    out = capsys.readouterr().out
    assert "LEAKAGE" in out and planted["leak"] in out
    assert (tmp_path / "out" / "audit.html").is_file()


def test_wafer_audit_finds_a_mislabelled_map(tmp_path):
    from defectscope.data.wafer_synth import generate_dataset

    manifest = generate_dataset(tmp_path, per_class={"Center": 15, "Edge-Ring": 15, "Scratch": 15, "none": 15},
                                seed=2, patterns=("Center", "Edge-Ring", "Scratch", "none"))
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)[["path", "label"]]
    wrong = table.index[table["label"] == "Edge-Ring"][3]
    table.loc[wrong, "label"] = "Center"
    table.to_csv(manifest, index=False)
    r = audit(manifest, tmp_path / "out", report=False)
    flagged = {x["path"] for x in r["label_suspects"]}
    assert str((tmp_path / table["path"][wrong]).resolve()) in flagged, r["label_suspects"]
    assert len(flagged) <= 6  # few clean maps flagged (measured 4 of 59 with 15 maps per class)
    assert r["modes"] == {"die_states": 60} and r["wafer_maps"]
