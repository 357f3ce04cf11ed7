"""The protection study's owner (llm_psi.load.owner): its spec, its open-loop schedule, its FIFO service with
latency counted from the due time (a fake clock), and a real phase of each kind in the co-tenant's cgroup."""
import csv
import io
import os

import pandas as pd
import pytest

from conftest import real_cgroups
from llm_psi.load import owner


def test_parse():
    assert owner.parse("interactive:20:15") == ("interactive", (20.0, 15.0))
    assert owner.parse("batch:2") == ("batch", 2)
    for bad in ("interactive:20:50", "interactive:0:1", "batch:0", "cpu:2", "interactive:x:1", ""):
        with pytest.raises(ValueError):
            owner.parse(bad)


def test_due_times_are_a_clock_at_the_rate():
    assert owner.due_times(4, 1.0) == [0.125, 0.375, 0.625, 0.875]
    assert len(owner.due_times(20, 30)) == 600


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_serve_is_open_loop_and_fifo():
    """A request that takes longer than its period makes the next ones queue: their latency counts from their
    due time, not from when they started."""
    clock, buf = FakeClock(), io.StringIO()
    costs = iter([0.6, 0.1, 0.1, 0.1])     # the first request is stalled (e.g. starved) for 0.6 s

    def work(_):
        clock.t += next(costs)
    n = owner.serve(4, 100, 1.0, csv.writer(buf), clock=clock, sleep=clock.sleep, work=work)
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert n == 4
    lat = [float(r[4]) for r in rows]
    assert lat == pytest.approx([600.0, 450.0, 300.0, 150.0])   # 0.725 -> 0.825 for the one due at 0.375, ...


def test_serve_stops_at_the_end_of_its_phase():
    clock, buf = FakeClock(), io.StringIO()

    def work(_):
        clock.t += 0.9
    assert owner.serve(4, 100, 1.0, csv.writer(buf), clock=clock, sleep=clock.sleep, work=work) == 1


def test_cli_refuses_a_cost_that_does_not_fit():
    with pytest.raises(SystemExit) as e:
        owner.main(["--rate", "20", "--cost-ms", "60", "--csv", "x.csv"])
    assert e.value.code == 2


def _run_phase(tmp_path, spec, seconds):
    path = str(tmp_path / "owner.csv")
    # a name of its own: other tests' co-tenants (llm_cotenant) may run on the other xdist worker
    with owner.Owner(spec, seconds, path, name=f"llm_owner_test_{os.getpid()}", log=lambda m: None) as o:
        rec = o.finish()
    return rec, pd.read_csv(path)


@pytest.mark.slow
@real_cgroups
def test_interactive_phase_in_its_cgroup(tmp_path):
    rec, df = _run_phase(tmp_path, "interactive:20:15", 2.0)
    assert list(df.columns) == owner.COLUMNS
    assert 35 <= len(df) <= 40                       # 40 due; a contended host may drop the last few
    assert (df["latency_ms"] >= 15 - 1).all()       # at least its cost
    assert rec["cpu_s"] > 0.3                       # ~0.6 CPU-s of requests, counted by its cgroup
    assert not os.path.exists(f"/sys/fs/cgroup/cpu/llm_owner_test_{os.getpid()}")


@pytest.mark.slow
@real_cgroups
def test_batch_phase_writes_its_seconds(tmp_path):
    rec, df = _run_phase(tmp_path, "batch:1", 2.0)
    assert list(df.columns) == owner.BATCH_COLUMNS and len(df) >= 1
    assert (df["units_per_s"] > 0).all() and rec["cpu_s"] > 0.5


def test_an_owner_without_a_cgroup_of_its_own_is_refused(tmp_path, monkeypatch):
    """Without its cgroup the owner has no counters and no pressure: the phase fails (the trial is recorded as not
    complete) instead of measuring nothing, and its processes are gone."""
    from llm_psi.cgroups import CgroupError

    def held(*a, **k):
        raise CgroupError("cgroup llm_cotenant is in use by a running experiment")
    monkeypatch.setattr(owner.cotenant.cgroups, "create", held)
    o = owner.Owner("batch:1", 1.0, str(tmp_path / "b.csv"), log=lambda m: None)
    with pytest.raises(RuntimeError, match="no cgroup of its own"):
        o.start()
    assert o.tenant.state == "stopped" and all(p.poll() is not None for p in o.tenant.procs)
