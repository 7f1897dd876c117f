"""The dashboard's statistics: p-chart limits, Western Electric rules, the Drift alarm, pilot intervals."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from defectscope.station import spc


def test_p_chart_limits_follow_the_textbook_formula():
    d = np.array([2, 5, 0, 3])
    n = np.array([100, 120, 40, 80])
    chart = spc.p_chart(d, n)
    pbar = 10 / 340
    assert chart["pbar"] == pytest.approx(pbar, abs=1e-6)
    for i in range(4):
        sigma = math.sqrt(pbar * (1 - pbar) / n[i])
        assert chart["ucl"][i] == pytest.approx(pbar + 3 * sigma, abs=1e-6)
        assert chart["lcl"][i] == pytest.approx(max(0.0, pbar - 3 * sigma), abs=1e-6)
        assert chart["p"][i] == pytest.approx(d[i] / n[i], abs=1e-6)
    assert chart["lcl"][2] == 0.0  # clipped at 0 for the small subgroup
    assert chart["violations"] == [[], [], [], []]


def test_p_chart_empty_subgroups_and_bad_input():
    chart = spc.p_chart([1, 0, 2], [10, 0, 10])
    assert chart["p"][1] is None and chart["ucl"][1] is None and chart["violations"][1] == []
    with pytest.raises(ValueError):
        spc.p_chart([3], [2])
    empty = spc.p_chart([0, 0], [0, 0])
    assert empty["pbar"] is None


@pytest.mark.parametrize("z, rule, at", [
    ([0, 0.5, -0.5, 3.2, 0], 1, 3),
    ([0, 2.5, 0.3, 2.2, 0], 2, 3),
    ([-2.5, 0.3, -2.2, 0.1], 2, 2),
    ([1.5, 1.2, 0.5, 1.1, 1.3, 0], 3, 4),
    ([0.2, 0.4, 0.1, 0.3, 0.5, 0.2, 0.1, 0.6, -1], 4, 7),
])
def test_western_electric_rules(z, rule, at):
    marks = spc.western_electric(np.array(z, dtype=float))
    assert rule in marks[at]
    assert all(rule not in m for i, m in enumerate(marks) if i < at)


def test_western_electric_quiet_on_in_control_noise_and_skips_empty_subgroups():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, 400)
    marks = spc.western_electric(z)
    # In-control data trips rule 1 about 0.27% of the time; all four together well under 5%.
    assert sum(bool(m) for m in marks) / len(z) < 0.05
    gap = spc.western_electric(np.array([0.5] * 4 + [np.nan] + [0.5] * 4))
    assert 4 in gap[-1] and gap[4] == []


def test_a_shift_in_the_defect_rate_is_flagged():
    rng = np.random.default_rng(1)
    n = np.full(30, 200)
    p = np.r_[np.full(20, 0.02), np.full(10, 0.08)]
    chart = spc.p_chart(rng.binomial(n, p), n)
    assert any(chart["violations"][20:]) and not any(1 in v for v in chart["violations"][:20])


def test_binomial_alarm_p_value_is_scipys_exact_test():
    from scipy import stats

    for k, n, p0 in [(5, 500, 0.01), (20, 500, 0.01), (1, 10, 0.2), (0, 10, 0.2), (10, 10, 0.5)]:
        expected = stats.binomtest(k, n, p0, alternative="greater").pvalue
        assert spc.binomial_alarm(k, n, p0)["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_binomial_alarm():
    assert not spc.binomial_alarm(5, 500, 0.01)["alarm"]  # exactly the calibrated rate
    a = spc.binomial_alarm(20, 500, 0.01)
    assert a["alarm"] and a["p_value"] < 1e-5 and a["rate"] == 0.04
    assert spc.binomial_alarm(0, 0, 0.01)["alarm"] is False


def test_clopper_pearson_known_values():
    lo, hi = spc.clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.30850, abs=1e-4)  # the "rule of 3.7" end
    lo, hi = spc.clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-4) and hi == pytest.approx(0.81291, abs=1e-4)
    assert spc.clopper_pearson(0, 0) == (0.0, 1.0)


def test_pilot_stats_says_when_good_decisions_may_stop_going_to_review():
    def rows(n_good_ok, n_escape, n_bad_ok, n_overkill):
        def r(decision, label):
            return {"decision": decision, "label": label}

        return ([r("GOOD", "GOOD")] * n_good_ok + [r("GOOD", "scratch")] * n_escape
                + [r("scratch", "scratch")] * n_bad_ok + [r("scratch", "GOOD")] * n_overkill
                + [r("REVIEW", "GOOD")] * 3)

    few = spc.pilot_stats(rows(50, 0, 20, 2), "GOOD", escape_cap=0.01)
    assert few["reviewed"] == 75 and few["reviewed_auto"] == 72
    assert few["escape"]["k"] == 0 and few["escape"]["n"] == 50 and few["overkill"]["k"] == 2
    assert few["agreement"]["rate"] == pytest.approx(70 / 72)
    assert not few["can_stop_reviewing_good"] and few["more_good_reviews_needed"] > 0
    # 0 escapes in n GOOD reviews: the one-sided 95% bound is 1 - 0.05^(1/n) < 1% from n = 299.
    enough = spc.pilot_stats(rows(300, 0, 20, 0), "GOOD", escape_cap=0.01)
    assert enough["can_stop_reviewing_good"] and enough["escape_upper_one_sided"] < 0.01
    assert 250 <= 50 + few["more_good_reviews_needed"] <= 330
    assert not spc.pilot_stats(rows(300, 5, 0, 0), "GOOD", escape_cap=0.01)["can_stop_reviewing_good"]


def test_pilot_measures_both_caps_against_people():
    """In a pilot people review everything: escape over parts they call defective, overkill over parts they
    call good (a REVIEW decision is neither)."""
    def r(decision, label):
        return {"decision": decision, "label": label}

    reviewed = ([r("GOOD", "GOOD")] * 180 + [r("scratch", "GOOD")] * 2 + [r("REVIEW", "GOOD")] * 18
                + [r("scratch", "scratch")] * 90 + [r("GOOD", "scratch")] * 1 + [r("REVIEW", "scratch")] * 9)
    p = spc.pilot_stats(reviewed, "GOOD", escape_cap=0.05, overkill_cap=0.05)["caps_against_people"]
    assert (p["escape_of_defective"]["k"], p["escape_of_defective"]["n"]) == (1, 100)
    assert (p["overkill_of_good"]["k"], p["overkill_of_good"]["n"]) == (2, 200)
    assert p["escape_of_defective"]["within_cap"] and p["overkill_of_good"]["within_cap"]
    worse = spc.pilot_stats(reviewed + [r("scratch", "GOOD")] * 15, "GOOD", escape_cap=0.05, overkill_cap=0.05)
    assert worse["caps_against_people"]["overkill_of_good"]["within_cap"] is False
    assert spc.pilot_stats(reviewed, "GOOD", escape_cap=0.05)["caps_against_people"]["overkill_of_good"][
        "within_cap"] is None


def test_dashboard_buckets_and_series():
    t0 = datetime(2026, 1, 1, 8, 0, tzinfo=timezone.utc)

    def row(minutes, decision, conf=0.9, ms=10.0):
        t = (t0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")
        return {"time": t, "decision": decision, "confidence": conf, "total_ms": ms, "drift_score": None}

    rows = [row(1, "GOOD"), row(2, "scratch"), row(3, "REVIEW", 0.5), row(65, "Drift", 0.4), row(70, "GOOD"),
            row(70, "_unreadable", None, None)]
    d = spc.dashboard(*spc.aggregate(rows), classes=["GOOD", "scratch"], good_class="GOOD", since=t0,
                      until=t0 + timedelta(hours=3), bucket_minutes=60, drift_rate=0.01)
    assert len(d["buckets"]) == 3 and d["total"] == 6
    assert d["decisions_by_kind"]["GOOD"] == [1, 1, 0] and d["decisions_by_kind"]["Drift"] == [0, 1, 0]
    assert d["other_decisions"] == {"_unreadable": 1}
    assert d["p_chart"]["n"] == [2, 1, 0] and d["p_chart"]["defects"] == [1, 0, 0]
    assert d["drift"]["per_bucket"] == [0, 1, 0] and d["drift"]["alarm"]["k"] == 1
    assert d["confidence"]["q50"][0] == pytest.approx(0.9) and d["confidence"]["q50"][2] is None
    assert d["throughput_per_minute"][0] == pytest.approx(3 / 60)
    assert d["automation"]["rate"] == [pytest.approx(2 / 3), pytest.approx(1 / 3), None]
    assert d["automation"]["review"] == [1, 0, 0] and d["automation"]["total_rate"] == pytest.approx(3 / 6)
    spc.dumps(d)  # strict JSON: no NaN
