"""Every Drift member implements the one protocol, reads its own input, round-trips its state, and has a graph head."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.decision.drift import DriftError
from defectscope.decision.drift.fusion import Standardiser
from defectscope.decision.drift.member import READS, DriftInputs
from defectscope.decision.drift.patch import PatchGaussian
from defectscope.decision.drift.photometric import PhotometricGaussian
from defectscope.decision.drift.rule import MEMBERS, DriftRule
from defectscope.decision.drift.scorer import SCORES, DriftScorer, PooledScore


def _inputs(rng, n: int) -> DriftInputs:
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    maps = [rng.normal(size=(n, 4, 4, 4)).astype(np.float32), rng.normal(size=(n, 3, 2, 2)).astype(np.float32)]
    return DriftInputs(feats, feats @ np.ones((6, 3)), maps, rng.integers(0, 256, (n, 12, 12), dtype=np.uint8))


@pytest.fixture
def rule() -> DriftRule:
    rng = np.random.default_rng(0)
    x = _inputs(rng, 40)
    head = (rng.normal(size=(3, 6)), rng.normal(size=3))
    pooled = DriftScorer(k=3).fit(x.features, x.logits, np.arange(40) % 3, head=head)
    return DriftRule(MEMBERS, pooled, PatchGaussian(d=5, stages=(1, 2)).fit(x.maps),
                     photometric=PhotometricGaussian().fit(x.images))


def test_members_follow_the_protocol_and_round_trip_their_state(rule):
    x = _inputs(np.random.default_rng(1), 7)
    raw = rule.raw(*x)
    for member in rule.bound_members():
        assert member.reads in READS and member.kind in MEMBERS
        scores = member.score_samples(x.read(member))
        assert scores.shape == (7,) and scores.dtype == np.float64
        np.testing.assert_array_equal(scores, raw[member.kind])
        back = type(member).from_state(member.state())
        np.testing.assert_array_equal(back.score_samples(x.read(back)), scores)
    std = Standardiser.fit(raw)
    assert Standardiser.from_state(std.state()) == std


def test_pooled_members_share_one_scorer_and_fit_returns_the_member(rule):
    members = [rule.member(k) for k in SCORES]
    assert all(isinstance(m, PooledScore) and m.scorer is rule.pooled for m in members)
    rng = np.random.default_rng(2)
    x = _inputs(rng, 30)
    m = PooledScore("knn", DriftScorer(k=3))
    assert m.fit((x.features, x.logits), np.arange(30) % 3) is m and m.scorer.fitted


def test_each_member_says_what_it_is_missing(rule):
    x = _inputs(np.random.default_rng(3), 4)
    with pytest.raises(DriftError, match="patch score needs the feature maps"):
        rule.raw(x.features, x.logits, None, x.images)
    with pytest.raises(DriftError, match="photometric score needs the images"):
        rule.raw(x.features, x.logits, x.maps)
    with pytest.raises(DriftError, match="knn, vim score needs the pooled drift statistics"):
        DriftRule(("knn", "vim")).raw(*x)


def test_every_member_kind_has_a_graph_head(rule):
    torch = pytest.importorskip("torch")
    from defectscope.onnx_export.drift_heads import GRAPH_HEADS, GraphInputs, graph_head, rule_head

    assert set(GRAPH_HEADS) == set(MEMBERS)
    x = _inputs(np.random.default_rng(4), 5)
    t = GraphInputs(torch.from_numpy(x.features), torch.from_numpy(x.logits).float(),
                    [torch.from_numpy(m) for m in x.maps],
                    torch.from_numpy(x.images.astype(np.float32) / np.float32(255))[:, None])
    raw = rule.raw(*x)
    with torch.no_grad():
        for member in rule.bound_members():
            head = graph_head(member).eval()
            assert head.reads == member.reads
            np.testing.assert_allclose(head.from_inputs(t).numpy(), raw[member.kind], rtol=1e-4, atol=1e-4)
        rule.standardiser = Standardiser.fit(raw)
        np.testing.assert_allclose(rule_head(rule).from_inputs(t).numpy(), rule.combine(raw), rtol=1e-4, atol=1e-4)
