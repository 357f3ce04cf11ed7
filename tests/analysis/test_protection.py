"""The protection study's metrics (llm_psi.analysis.protection) and the power computation (stats.power,
stats.trials_needed) on hand-made inputs."""
import math

import numpy as np
import pytest

from llm_psi.analysis import protection as pr
from llm_psi.analysis import stats


def test_isolation_per_second_counts_completions_per_whole_second():
    done = [0.1, 0.5, 0.9, 1.2, 1.3, 2.95, 3.0, math.nan, -0.1]   # 3.0 lies past the last whole second of 3 s
    assert pr.isolation_per_second(done, 3.5, 3).tolist() == pytest.approx([100.0, 200 / 3, 100 / 3])


def test_isolation_seconds_align_with_where_completions_fall_alone():
    """Due at (k + 1/2) / 4 s, done 100 ms later: the last of each second ends at 0.975 s, so a 40 ms delay moves
    it into the next second; with the seconds shifted by the latency alone it stays."""
    done = [(k + 0.5) / 4 + 0.1 for k in range(8)]
    done[3] += 0.04
    assert pr.isolation_per_second(done, 2, 4).tolist() == [75.0, 125.0]
    assert pr.isolation_per_second(done, 2, 4, offset_s=0.1).tolist() == [100.0, 100.0]


def test_isolation_mean_and_first_percentile():
    mean, p01 = pr.isolation([100.0] * 99 + [0.0])
    assert mean == pytest.approx(99.0)
    assert p01 == pytest.approx(np.percentile([100.0] * 99 + [0.0], 1))
    assert all(math.isnan(v) for v in pr.isolation([]))


def test_isolation_refuses_a_bad_target():
    with pytest.raises(ValueError):
        pr.isolation_per_second([0.5], 3, 0)


def test_batch_isolation_is_against_the_mean_alone():
    assert pr.batch_isolation_per_second([50, 100], [90, 110]).tolist() == [50.0, 100.0]
    assert np.isnan(pr.batch_isolation_per_second([50], [])).all()


def test_lat_imp_pct():
    alone, with_ = [10.0] * 100, [12.0] * 100
    assert pr.lat_imp_pct(alone, with_, 50) == pytest.approx(20.0)
    assert pr.lat_imp_pct(alone, [10.0] * 99 + [30.0], 99) > 0
    assert math.isnan(pr.lat_imp_pct([], with_, 99))


def test_cpu_share_is_per_second_of_each_phase():
    assert pr.cpu_share(cpu_with_s=6, with_s=30, cpu_alone_s=4, alone_s=20) == pytest.approx(1.0)
    assert pr.cpu_share(3, 30, 4, 20) == pytest.approx(0.5)
    assert math.isnan(pr.cpu_share(None, 30, 4, 20)) and math.isnan(pr.cpu_share(3, 30, 0, 20))


def test_work_conservation_against_what_the_owner_leaves_idle():
    # 2 CPUs for 30 s = 60 CPU-s; the owner used 0.3 CPU alone -> 9 CPU-s of the 30 s phase; 51 CPU-s idle
    assert pr.idle_left_s(6.0, 20, 30, 2) == pytest.approx(51.0)
    assert pr.work_conservation(40.8, 6.0, 20, 30, 2) == pytest.approx(0.8)
    assert math.isnan(pr.work_conservation(1.0, 40.0, 20, 30, 2))   # a saturating owner leaves nothing


def test_tokens_per_s():
    assert pr.tokens_per_s(300, 30) == 10
    assert math.isnan(pr.tokens_per_s(None, 30)) and math.isnan(pr.tokens_per_s(3, 0))


def test_power_and_trials_needed():
    # the textbook case: d = 1 at 80% power needs 17 per group (two-sided t, alpha 0.05)
    assert stats.trials_needed(1.0, 1.0) == 17
    assert stats.power(17, 1.0, 1.0) >= 0.8 > stats.power(16, 1.0, 1.0)
    assert stats.trials_needed(2.0, 5.0) < stats.trials_needed(5.0, 5.0)
    assert stats.trials_needed(0.0, 5.0) == 2


def test_work_conservation_has_no_value_where_the_owner_leaves_almost_nothing_idle():
    # alone the owner used 1.85 of 2 CPUs: 0.15 x 30 = 4.5 CPU-s idle, under a tenth of the host's 60
    assert math.isnan(pr.work_conservation(3.0, 37.0, 20, 30, 2))
    assert pr.work_conservation(3.0, 37.0, 20, 30, 2, least_idle=0.05) == pytest.approx(3.0 / 4.5)


def test_pooled_p99_rests_on_every_request_and_its_interval_on_whole_trials():
    import numpy as np
    rng = np.random.default_rng(1)
    alone = [rng.normal(20, 1, 300) for _ in range(6)]
    same = [rng.normal(20, 1, 300) for _ in range(6)]
    slower = [x * 1.5 for x in same]
    est, lo, hi = pr.pooled_lat_imp(alone, same, 99)
    assert lo <= 0 <= hi and abs(est) < 5
    est, lo, hi = pr.pooled_lat_imp(alone, slower, 99)
    assert 40 < lo <= est <= hi < 60
    assert est == pytest.approx(pr.lat_imp_pct(np.concatenate(alone), np.concatenate(slower), 99))
    assert pr.pooled_lat_imp(alone, slower, 99) == (est, lo, hi)              # seeded: the same figures again
    one = pr.pooled_lat_imp(alone[:1], slower[:1], 99)
    assert math.isfinite(one[0]) and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in pr.pooled_lat_imp([], [], 99))
    # one trial with a stall: the interval over trials widens to take it in
    stalled = [x.copy() for x in same]
    stalled[0][:10] = 200.0
    _, lo2, hi2 = pr.pooled_lat_imp(alone, stalled, 99)
    assert hi2 - lo2 > 50
