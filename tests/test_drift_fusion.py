"""Standardised max fusion, worst-kind selection with leave-one-kind-out, and small-data calibration support."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectscope.decision.drift import DriftError
from defectscope.decision.drift.fit import calibrate_drift_threshold
from defectscope.decision.drift.fusion import (
    Candidate,
    Standardiser,
    auroc,
    candidates,
    fuse_max,
    select_score,
)
from defectscope.decision.drift.support import (
    guaranteed_rate,
    images_needed,
    per_10000_words,
    rate_support,
    support_message,
    threshold_with_support,
)


def _part(rng, shifts: dict[str, float], scales: dict[str, float] | None = None, n=300, k=200):
    """Normal scores N(0, scale) per score name, drift shifted by ``shifts[name]`` (in units of the scale)."""
    scales = scales or {}
    out = {"val": {}, "normal": {}, "drift": {}}
    for name, shift in shifts.items():
        sc = scales.get(name, 1.0)
        out["val"][name] = rng.normal(0, sc, n)
        out["normal"][name] = rng.normal(0, sc, n)
        out["drift"][name] = rng.normal(shift * sc, sc, k)
    return out


def test_standardiser_and_max_fusion():
    rng = np.random.default_rng(0)
    held = {"a": rng.normal(5, 2, 1000), "b": rng.normal(-1, 0.1, 1000)}
    std = Standardiser.fit(held)
    assert std.mu["a"] == pytest.approx(5, abs=0.2) and std.sigma["b"] == pytest.approx(0.1, rel=0.1)
    z = std.transform({"a": np.array([5.0, 9.0]), "b": np.array([-0.8, -1.0])})
    np.testing.assert_allclose(fuse_max(z, ["a", "b"]), np.maximum(z["a"], z["b"]))
    # Image 0 is ordinary on a (z ~ 0) but ~2 sigma high on b: the max reports b.
    fused = fuse_max(z, ["a", "b"])[0]
    assert fused == pytest.approx((-0.8 - std.mu["b"]) / std.sigma["b"], rel=1e-9) and fused > 1.5
    with pytest.raises(DriftError, match="no standardisation"):
        std.transform({"c": np.zeros(2)})
    with pytest.raises(DriftError, match=">= 2"):
        Standardiser.fit({"a": np.array([1.0])})


def test_auroc_by_ranks_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    n, d = rng.normal(size=50).round(1), rng.normal(0.5, size=40).round(1)  # with ties
    ref = roc_auc_score(np.r_[np.zeros(50), np.ones(40)], np.r_[n, d])
    assert auroc(n, d) == pytest.approx(ref, abs=1e-12)


def test_max_fusion_covers_kinds_each_score_misses():
    """Score a sees global drift only, score b local drift only: the max of their z-scores sees both,
    and worst-kind selection prefers it to either alone (a single score would lose one kind)."""
    rng = np.random.default_rng(2)
    kinds = {
        "far": [_part(rng, {"a": 4.0, "b": 0.0}, {"a": 100.0})],  # on very different raw scales
        "corruptions": [_part(rng, {"a": 0.0, "b": 4.0})],
        "group": [_part(rng, {"a": 3.0, "b": 3.0}, {"a": 100.0})],
    }
    result = select_score(kinds, candidates(["a", "b"], max_members=2, weighted=False))
    assert result["chosen"] == "max(a,b)"
    assert result["per_kind"]["far"] > 0.97 and result["per_kind"]["corruptions"] > 0.97
    assert result["candidates"]["a"]["worst"] < 0.6 and result["candidates"]["b"]["worst"] < 0.6
    # LOKO: without 'far' both max(a,b) and b look perfect on the rest; the estimate is what the choice
    # made without a kind scores on it, so it can be lower than the in-sample worst.
    assert result["loko_worst"] <= result["worst_in_sample"] + 1e-12


def test_loko_never_judges_a_fitted_combination_on_its_own_kind():
    rng = np.random.default_rng(3)
    kinds = {k: [_part(rng, {"a": s1, "b": s2, "c": 1.0})] for k, s1, s2 in
             [("far", 3.0, 0.0), ("corruptions", 0.0, 3.0), ("group", 1.0, 1.0), ("heldout_class", 0.5, 0.2)]}
    seen: list[tuple[str, tuple[str, ...]]] = []

    def spy(cand: Candidate, fit_kinds):
        from defectscope.decision.drift.fusion import fit_weights

        if cand.rule != "weighted":
            return cand
        fitted = fit_weights(cand, fit_kinds, step=0.5)
        seen.append((cand.name, tuple(fit_kinds)))
        return fitted

    cands = candidates(["a", "b", "c"], max_members=2)
    result = select_score(kinds, cands, prepare=spy)
    # One weight fit per left-out kind (on the other three) and one final fit on all four.
    fits = [k for _, k in seen]
    assert len(fits) == 5 and sorted(map(len, fits)) == [3, 3, 3, 3, 4]
    for held, rec in result["loko"].items():
        assert held not in fits[list(kinds).index(held)]
        if rec["chosen"].startswith("weighted"):
            assert rec["weights"] is not None
    # A weighted candidate that claims to be fitted on the kind it is judged on is refused.
    cheat = Candidate("weighted(a,b)", ("a", "b"), "weighted", {"a": 0.5, "b": 0.5}, tuple(kinds))
    with pytest.raises(DriftError, match="fitted on the kind"):
        select_score(kinds, [cheat], prepare=lambda c, k: c)


def test_select_needs_two_kinds():
    rng = np.random.default_rng(4)
    with pytest.raises(DriftError, match=">= 2 kinds"):
        select_score({"far": [_part(rng, {"a": 1.0})]}, candidates(["a"]))


def test_small_data_calibration_support():
    assert images_needed(0.01) == 99 and images_needed(0.05) == 19 and images_needed(0.001) == 999
    assert guaranteed_rate(49) == pytest.approx(0.02)
    s = rate_support(49, 0.01)
    assert not s["supported"] and s["guaranteed_rate"] == pytest.approx(0.02) and s["images_needed"] == 99
    assert s["per_10000"] == 200
    msg = support_message(s)
    assert "49 normal" in msg and "0.02" in msg and "at least 99" in msg and "50 more" in msg
    ok = rate_support(99, 0.01)
    assert ok["supported"] and ok["guaranteed_rate"] == 0.01 and "about 100 of every 10,000" in support_message(ok)
    # Too few images: the largest calibration score, which guarantees 1/(n+1).
    scores = np.arange(49.0)
    t, info = threshold_with_support(scores, 0.01)
    assert t == 48.0 and not info["supported"]
    # Enough images: the same threshold as the split-conformal rule.
    scores = np.random.default_rng(5).normal(size=500)
    t, info = threshold_with_support(scores, 0.01)
    assert info["supported"] and t == calibrate_drift_threshold(scores, 0.01)
    # The refusal names what the data supports.
    with pytest.raises(DriftError, match=r"guarantee 0\.0204 at best.*at least 99"):
        calibrate_drift_threshold(np.arange(48.0), 0.01)


def test_false_flag_rate_in_words():
    assert per_10000_words(0.01) == "about 100 of every 10,000 normal parts set aside"
    assert per_10000_words(0.0005) == "about 5 of every 10,000 normal parts set aside"
    assert per_10000_words(0.00012) == "about 1.2 of every 10,000 normal parts set aside"
    assert math.isclose(0.0204, 1 / 49, rel_tol=0.01)
