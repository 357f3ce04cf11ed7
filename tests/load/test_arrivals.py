"""arrivals.py: open-loop schedules from a seed, and SLO strings."""
import numpy as np
import pytest

from llm_psi.load import arrivals
from llm_psi.analysis import metrics


def cv(times) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


@pytest.mark.parametrize("kind", ["constant", "poisson", "gamma"])
def test_starts_at_zero_ascending_and_n_long(kind):
    t = arrivals.schedule(kind, 4, n=50, burstiness=0.5, seed=1)
    assert len(t) == 50 and t[0] == 0 and np.all(np.diff(t) >= 0)


@pytest.mark.parametrize("kind", ["poisson", "gamma"])
def test_same_seed_same_schedule_other_seed_differs(kind):
    a = arrivals.schedule(kind, 4, n=100, seed=7)
    assert np.array_equal(a, arrivals.schedule(kind, 4, n=100, seed=7))
    assert not np.array_equal(a, arrivals.schedule(kind, 4, n=100, seed=8))


def test_poisson_gaps_seed_3():
    t = arrivals.schedule("poisson", 4, n=12, seed=3)
    assert 0.1 <= np.diff(t).mean() <= 0.6
    assert cv(t) > 0.5


def test_constant_gaps_are_one_over_rate():
    t = arrivals.schedule("constant", 4, n=9)
    assert list(t) == [i / 4 for i in range(9)]
    assert cv(t) == 0
    assert cv(arrivals.schedule("constant", 3, n=100)) == pytest.approx(0, abs=1e-12)


def test_gamma_burstiness_sets_the_cv():
    t = arrivals.schedule("gamma", 4, n=20000, burstiness=0.25, seed=0)
    assert cv(t) == pytest.approx(2.0, rel=0.1)  # 1 / sqrt(0.25)
    assert np.diff(t).mean() == pytest.approx(0.25, rel=0.1)
    assert cv(arrivals.schedule("gamma", 4, n=20000, burstiness=4, seed=0)) == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("kind", ["constant", "poisson", "gamma"])
def test_duration_mode_is_the_n_mode_schedule_cut_at_the_bound(kind):
    t = arrivals.schedule(kind, 4, duration=30, burstiness=0.5, seed=5)
    assert len(t) > 60 and t[0] == 0 and t.max() < 30
    longer = arrivals.schedule(kind, 4, n=len(t) + 1, burstiness=0.5, seed=5)
    assert np.array_equal(t, longer[:-1]) and longer[-1] >= 30


def test_constant_duration_excludes_the_bound():
    assert list(arrivals.schedule("constant", 2, duration=2)) == [0, 0.5, 1, 1.5]


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="closed", rate=1, n=5), "closed loop has no schedule"),
    (dict(kind="uniform", rate=1, n=5), "unknown arrival kind"),
    (dict(kind="poisson", rate=0, n=5), "rate"),
    (dict(kind="poisson", rate=-1, n=5), "rate"),
    (dict(kind="poisson", rate=float("nan"), n=5), "rate"),
    (dict(kind="poisson", rate=float("inf"), n=5), "rate"),
    (dict(kind="poisson", rate="fast", n=5), "rate"),
    (dict(kind="gamma", rate=1, n=5, burstiness=0), "burstiness"),
    (dict(kind="gamma", rate=1, n=5, burstiness=-0.5), "burstiness"),
    (dict(kind="gamma", rate=1, n=5, burstiness=float("nan")), "burstiness"),
    (dict(kind="poisson", rate=1), "exactly one of n"),
    (dict(kind="poisson", rate=1, n=5, duration=10), "exactly one of n"),
    (dict(kind="poisson", rate=1, n=0), "n must be"),
    (dict(kind="poisson", rate=1, n=2.5), "n must be"),
    (dict(kind="poisson", rate=1, n=True), "n must be"),
    (dict(kind="poisson", rate=1, duration=0), "duration"),
    (dict(kind="poisson", rate=1, duration=float("inf")), "duration"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        arrivals.schedule(kwargs.pop("kind"), kwargs.pop("rate"), **kwargs)


def test_arrivals_list_closed_first():
    assert arrivals.ARRIVALS == ("closed", "constant", "poisson", "gamma")


def test_parse_slo():
    assert arrivals.parse_slo("ttft:500,e2e:20000") == {"ttft_ms": 500.0, "e2e_ms": 20000.0}
    assert arrivals.parse_slo(" tpot : 2.5 ") == {"tpot_ms": 2.5}
    every = arrivals.parse_slo(",".join(f"{k}:1" for k in arrivals.SLO_KEYS))
    assert sorted(every) == sorted(metrics.METRICS)


@pytest.mark.parametrize("text, message", [
    ("", "empty SLO"),
    ("   ", "empty SLO"),
    ("ttft", "'ttft' is not metric:milliseconds"),
    ("ttft:500,", "'' is not metric:milliseconds"),
    (":500", "':500' is not"),
    ("ttft:", "'ttft:' is not"),
    ("latency:500", "unknown metric 'latency'"),
    ("ttft_ms:500", "unknown metric 'ttft_ms'"),
    ("ttft:500,e2e:1,ttft:600", "'ttft:600'.*given twice"),
    ("ttft:0", "'ttft:0'.*> 0"),
    ("ttft:-5", "> 0"),
    ("ttft:nan", "'ttft:nan'.*finite"),
    ("e2e:inf", "finite"),
    ("e2e:fast", "'e2e:fast'"),
])
def test_parse_slo_rejects(text, message):
    with pytest.raises(ValueError, match=message) as e:
        arrivals.parse_slo(text)
    assert "\n" not in str(e.value)
