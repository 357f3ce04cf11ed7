"""The adaptive concurrency limit: AIMD on pressure and latency, FIFO, floor of 1, never drops."""
import threading
import time
import types

import pytest

from llm_psi.control.adaptive import AdaptiveLimit, build


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(pressures, **kw):
    it = iter(pressures)
    clock = Clock()
    ctl = AdaptiveLimit(lambda: next(it), clock=clock, start=False, **kw)
    return ctl, clock


def queue_waiters(ctl, n):
    """n threads waiting at the limit (the limit's slots are taken first)."""
    threads = [threading.Thread(target=ctl.admit, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(ctl._queue) < n - ctl.limit + ctl._in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads


def test_hold_at_one_under_moderate_pressure():
    ctl, _ = make([50.0] * 5, max_limit=8)
    ctl.admit()
    queue_waiters(ctl, 3)
    assert [ctl.step() for _ in range(5)] == [1] * 5


def test_additive_increase_when_pressure_is_low_and_requests_wait():
    ctl, _ = make([5.0] * 4, max_limit=3)
    ctl.admit()
    queue_waiters(ctl, 4)
    assert [ctl.step() for _ in range(4)] == [2, 3, 3, 3]  # capped at max_limit


def test_no_increase_without_waiting_requests():
    ctl, _ = make([5.0, 5.0])
    assert [ctl.step(), ctl.step()] == [1, 1]


def test_multiplicative_decrease_on_high_pressure_with_floor():
    ctl, _ = make([95.0] * 4, initial=8)
    assert [ctl.step() for _ in range(4)] == [4, 2, 1, 1]


def test_decrease_when_latency_grows_past_tolerance():
    ctl, clock = make([50.0, 50.0], initial=4, tolerance=1.5)
    clock.t = 110.0
    ctl.admit(); ctl.release(1.0)          # the no-load latency
    ctl.admit(); ctl.release(1.2)          # within tolerance
    assert ctl.step() == 4
    ctl.admit(); ctl.release(3.0)
    ctl.admit(); ctl.release(3.0)          # median 3.0 / min 1.0 = 3x
    assert ctl.step() == 2


def test_latency_samples_reset_after_a_change():
    ctl, clock = make([95.0, 50.0], initial=4)
    clock.t = 110.0
    ctl.admit(); ctl.release(1.0)
    ctl.admit(); ctl.release(5.0)
    assert ctl.step() == 2                 # pressure
    clock.t = 112.0
    ctl.admit(); ctl.release(5.0)          # started at 107, before the change at 110: not counted
    assert ctl._since_change == []
    assert ctl.step() == 2


def test_fifo_and_increase_wakes_waiters():
    ctl, _ = make([5.0], max_limit=4)
    order, lock = [], threading.Lock()
    ctl.admit()                            # hold the only slot

    def worker(i):
        ctl.admit()
        with lock:
            order.append(i)

    threads = []
    for i in range(3):
        t = threading.Thread(target=worker, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        while len(ctl._queue) < i + 1:
            time.sleep(0.005)
    assert order == []
    ctl.step()                             # 1 -> 2 frees one slot: the first in line goes
    threads[0].join(timeout=5)
    assert order == [0]
    for _ in range(2):
        ctl.release(None)
    for t in threads:
        t.join(timeout=5)
    assert order == [0, 1, 2]


def test_bad_parameters():
    with pytest.raises(ValueError):
        AdaptiveLimit(lambda: 0.0, initial=0, start=False)
    with pytest.raises(ValueError):
        AdaptiveLimit(lambda: 0.0, low_pct=50, high_pct=40, start=False)
    with pytest.raises(ValueError):
        AdaptiveLimit(lambda: 0.0, tolerance=1.0, start=False)


def test_background_loop_runs_and_closes():
    ctl = AdaptiveLimit(lambda: 95.0, initial=4, interval_s=0.01, settle_s=0.0)
    deadline = time.monotonic() + 5
    while ctl.limit != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    ctl.close()
    assert ctl.limit == 1 and not ctl._thread.is_alive()


def test_build_adapts_to_the_fake_cgroup_pressure(fake_cgroupfs):
    cfg = types.SimpleNamespace(batching="off", max_batch=8, concurrency=4, adaptive_low_pct=20.0,
                                adaptive_high_pct=90.0, adaptive_tolerance=1.5, psi_interval_ms=500)
    fake_cgroupfs.set_pressure("cgroup", 0.0, total=1000)
    ctl = build(cfg, max_limit=4)
    try:
        assert ctl.pressure.read.__self__.path == str(fake_cgroupfs.pressure_file("cgroup"))
        assert ctl.max_limit == 4 and ctl.step() == 1 and ctl.last_pressure == 0.0   # a still total: no stall
    finally:
        ctl.close()
