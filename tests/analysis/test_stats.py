"""trial_stats.py: intervals over trials, ratios of geometric means, drift against the run order, interleaving,
each checked against values worked out by hand."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from llm_psi.analysis import stats as ts

T975 = {1: 12.706204736, 2: 4.302652730}  # Student t quantiles, from printed tables


def test_t_interval_by_hand():
    mean, lo, hi = ts.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert mean == 2.0
    assert (lo, hi) == pytest.approx((2 - T975[2] / math.sqrt(3), 2 + T975[2] / math.sqrt(3)))
    assert ts.t_interval([5.0, np.nan])[0] == 5.0 and np.isnan(ts.t_interval([5.0])[1])
    assert all(np.isnan(ts.t_interval([])))


def test_trial_ratio_geometric_means_and_welch_interval():
    # logs 1, 3 over logs 0, 2: difference 1, each variance of the mean 1, Welch df = 2
    r, lo, hi = ts.trial_ratio(np.exp([1.0, 3.0]), np.exp([0.0, 2.0]))
    assert r == pytest.approx(math.e)
    assert (lo, hi) == pytest.approx((math.exp(1 - T975[2] * math.sqrt(2)), math.exp(1 + T975[2] * math.sqrt(2))))
    # 2 and 8 (geometric mean 4) over two equal trials: all variance on one side, df = 1, se = ln 2
    r, lo, hi = ts.trial_ratio([2.0, 8.0], [1.0, 1.0])
    assert (r, lo, hi) == pytest.approx((4.0, 4 / 2 ** T975[1], 4 * 2 ** T975[1]))
    assert ts.trial_ratio([3.0, 3.0], [1.5, 1.5]) == pytest.approx((2.0, 2.0, 2.0))  # no spread: zero width
    r, lo, hi = ts.trial_ratio([3.0], [1.5, 1.5])
    assert r == pytest.approx(2.0) and np.isnan(lo) and np.isnan(hi)
    assert np.isnan(ts.trial_ratio([], [1.0])[0])


def test_every_interval_contains_its_ratio():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = rng.lognormal(0, 0.5, rng.integers(2, 6)), rng.lognormal(0, 0.5, rng.integers(2, 6))
        r, lo, hi = ts.trial_ratio(a, b)
        assert lo < r < hi


def test_difference_welch_by_hand_and_against_scipy():
    # means 2 and 0, each variance of the mean 1/2 + ... : a = 1, 3 (var 2, /2 = 1), b = -1, 1 (var 2, /2 = 1): df 2
    d, lo, hi = ts.difference([1.0, 3.0], [-1.0, 1.0])
    assert (d, lo, hi) == pytest.approx((2.0, 2 - T975[2] * math.sqrt(2), 2 + T975[2] * math.sqrt(2)))
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.normal(5, 2, rng.integers(2, 30)), rng.normal(4, 1, rng.integers(2, 30))
        want = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        d, lo, hi = ts.difference(a, b)
        assert d == pytest.approx(a.mean() - b.mean()) and (lo, hi) == pytest.approx((want.low, want.high))
    assert ts.difference([100.0, 100.0], [100.0, 100.0, np.nan]) == (0.0, 0.0, 0.0)   # no spread: zero width
    d, lo, hi = ts.difference([3.0], [1.0, 2.0])
    assert d == pytest.approx(1.5) and np.isnan(lo) and np.isnan(hi)
    assert all(np.isnan(ts.difference([], [1.0, 2.0])))


def test_spearman_exact_for_few_points_scipy_above():
    assert ts.spearman([0, 1, 2], [5.0, 6.0, 7.0]) == pytest.approx((1.0, 2 / 6))   # 2 of 3! orderings as extreme
    assert ts.spearman(range(5), [9.0, 7, 5, 3, 1]) == pytest.approx((-1.0, 2 / 120))
    x, y = np.arange(12), np.random.default_rng(0).normal(size=12)
    assert ts.spearman(x, y) == pytest.approx(tuple(stats.spearmanr(x, y)))


def runs_and_rows(medians, run_index=None, started=None):
    trials = range(1, len(medians) + 1)
    runs = pd.DataFrame({"trial": list(trials), "run_index": run_index or [np.nan] * len(medians),
                         "started_at": pd.to_datetime(started or [None] * len(medians), utc=True)})
    rows = pd.DataFrame([{"trial": t, "status": "ok", "service_ms": m + d} for t, m in zip(trials, medians)
                         for d in (-1.0, 0.0, 1.0)] + [{"trial": 1, "status": "failed", "service_ms": 1e9}])
    return runs, rows


def test_drift_against_run_order():
    # run order 1, 2, 0, 3, 4 sorts the medians to 10, 11, 12, 13, 14: rho 1, exact p 2/120, slope 1/12 per trial
    d = ts.drift(*runs_and_rows([11.0, 12.0, 10.0, 13.0, 14.0], run_index=[1, 2, 0, 3, 4]))
    assert (d["status"], d["n"], d["order"]) == ("drift", 5, "run_index")
    assert (d["rho"], d["p"], d["slope_pct"]) == pytest.approx((1.0, 2 / 120, 100 / 12))
    times = ["2026-01-01T00:00:03Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z"]
    d = ts.drift(*runs_and_rows([30.0, 10.0, 20.0], started=times))
    assert (d["order"], d["rho"], d["p"], d["status"]) == ("started_at", 1.0, pytest.approx(1 / 3), "none found")
    assert ts.drift(*runs_and_rows([1.0, 2.0, 3.0]))["status"] == "no run order recorded"
    assert ts.drift(*runs_and_rows([1.0, 2.0], run_index=[0, 1]))["status"] == "2 trials: too few"


def test_drift_slope_has_a_t_interval():
    # medians 10, 12, 11, 14, 13 in run order: slope 0.8 per trial, residual SS 3.6 on 3 df, stderr sqrt(1.2 / 10),
    # t(0.975, 3) = 3.1824; in % of the mean 12
    d = ts.drift(*runs_and_rows([10.0, 12.0, 11.0, 14.0, 13.0], run_index=[0, 1, 2, 3, 4]))
    half = 3.182446305 * (1.2 / 10) ** 0.5
    assert d["slope_pct"] == pytest.approx(100 * 0.8 / 12)
    assert (d["slope_ci_lo_pct"], d["slope_ci_hi_pct"]) == pytest.approx((100 * (0.8 - half) / 12,
                                                                          100 * (0.8 + half) / 12))
    assert d["status"] == "none found" and d["slope_ci_lo_pct"] < 0 < d["slope_ci_hi_pct"]


def test_interleaving_share():
    at = lambda *s: pd.DataFrame({"started_at": pd.to_datetime(list(s), unit="s", utc=True)})
    assert ts.interleaving([("a", at(0, 2, 4)), ("b", at(1, 3, 5))]) == (5, 5)
    assert ts.interleaving([("a", at(0, 1, 2)), ("b", at(3, 4, 5))]) == (1, 5)
    assert ts.interleaving([("a", at(0)), ("b", pd.DataFrame({"started_at": [pd.NaT]}))]) is None
