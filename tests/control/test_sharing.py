"""Sharing a host (issue 21): the kernel's sharing controls in the cgroups layer (fake v2 and v1 trees, and for
real where this host allows it), the sharing configurations, the probe co-tenant and its schedule, the phase
analysis, and our sharing controller (a fake cgroup tree, an injected signal and clock)."""
import json
import logging
import math
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, real_cgroups
from llm_psi import cgroups, config
from llm_psi.analysis import phases
from llm_psi.control import sharing
from llm_psi.load import cotenant, probe, runner

LIB = os.path.join(ROOT, "cgroup_lib.py")


def _put(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _get(path):
    with open(path) as f:
        return f.read().strip()


@pytest.fixture
def v2(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups.cell, "LOCK_DIR", str(tmp_path))
    root = tmp_path / "v2"
    _put(root / "cgroup.controllers", "cpu memory\n")
    _put(root / "cgroup.subtree_control", "")
    return str(root)


@pytest.fixture
def v1(tmp_path):
    root = tmp_path / "v1"
    _put(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _put(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    return str(root)


# ---- the kernel's controls in the cgroups layer ----------------------------------------------------------

def test_create_v2_writes_weight_idle_and_burst(v2):
    info, _ = cgroups.create("svc", 50, 100000, None, root=v2, log=print, cpu_weight=33, cpu_burst_us=20000)
    assert _get(os.path.join(v2, "svc", "cpu.weight")) == "33"
    assert _get(os.path.join(v2, "svc", "cpu.max.burst")) == "20000"
    assert cgroups.read_sharing(info) == {"cpu_weight": 33, "cpu_shares": None, "cpu_idle": None,
                                          "cpu_burst_us": 20000}
    info, _ = cgroups.create("idle", None, 100000, None, root=v2, log=print, cpu_idle=True)
    assert _get(os.path.join(v2, "idle", "cpu.idle")) == "1" and _get(os.path.join(v2, "idle", "cpu.max")) == "max 100000"
    assert not os.path.exists(os.path.join(v2, "idle", "cpu.weight"))     # untouched: the kernel's default


def test_create_v1_maps_weight_to_shares_as_systemd(v1):
    info, _ = cgroups.create("svc", 50, 100000, 1 << 30, root=v1, log=print, cpu_weight=10, cpu_burst_us=50000)
    assert _get(os.path.join(v1, "cpu", "svc", "cpu.shares")) == "102"
    assert _get(os.path.join(v1, "cpu", "svc", "cpu.cfs_burst_us")) == "50000"
    assert cgroups.read_sharing(info)["cpu_weight"] == 10
    assert [cgroups.weight_to_shares(w) for w in (1, 100, 10000)] == [10, 1024, 102400]
    assert cgroups.weight_to_shares(0) == 2


@pytest.mark.parametrize("kw,match", [
    (dict(cpu_weight=0), "from 1 to 10000"), (dict(cpu_weight=10001), "from 1 to 10000"),
    (dict(cpu_weight=10, cpu_idle=True), "exclude each other"), (dict(cpu_burst_us=-1), ">= 0"),
    (dict(cpu_burst_us=60000), "exceeds the quota"), (dict(cpu_burst_us=10, quota=None), "needs a CPU quota")])
def test_bad_sharing_values_are_refused_before_any_cgroup(v2, kw, match):
    quota = kw.pop("quota", 50)
    with pytest.raises(ValueError, match=match):
        cgroups.create("svc", quota, 100000, None, root=v2, log=print, **kw)
    assert not os.path.exists(os.path.join(v2, "svc"))


@pytest.mark.parametrize("args,flag", [
    (["--cpu-weight", "0"], "--cpu-weight"), (["--cpu-weight", "nan"], "--cpu-weight"),
    (["--cpu-weight", "20000"], "--cpu-weight"), (["--cpu-burst-us", "-5"], "--cpu-burst-us"),
    (["--cpu-burst-us", "60000"], "--cpu-burst-us"), (["--unlimited", "--cpu-burst-us", "10"], "--cpu-burst-us"),
    (["--cpu-idle", "--cpu-weight", "5"], "--cpu-idle")])
def test_cli_rejects_bad_sharing_values_in_one_line(v2, args, flag):
    p = subprocess.run([sys.executable, LIB, "run", "--name", "svc", *args, "--", "true"], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, CGROUP_ROOT=v2))
    assert p.returncode == 2
    assert p.stderr.startswith("cgroup_lib.py run: error: ") and flag in p.stderr and p.stderr.count("\n") == 1


# ---- the configurations and wrap() ----------------------------------------------------------------------

def test_sharing_configs_preset_cgroup_settings_not_service_options():
    assert config.cgroup_settings("weight") == {"weight": 33}
    assert "cgroup" not in config.preset("weight") and config.preset("share")["sharing"] == "share"
    assert [config.is_limited(c) for c in ("weight", "idle", "burst", "share", "share_batch")] == \
           [False, False, True, False, False]
    assert config.needs_own_cgroup("idle") and not config.needs_own_cgroup("baseline")


def test_wrap_applies_a_configs_cgroup_settings():
    def tail(label, root):
        argv = runner.wrap(["x"], label, root=root, python="py")
        return argv[argv.index("run") + 1:] if "run" in argv else argv
    assert tail("weight", True) == ["--name", "llm_service", "--unlimited", "--cpu-weight", "33", "--", "x"]
    assert tail("idle", False)[2:] == ["--unlimited", "--cpu-idle", "--", "x"]   # needs root: cgroup_lib says so
    assert tail("burst", True)[2:] == ["--cpu-quota", "50", "--cpu-period-us", "100000", "--memory-max", "4G",
                                       "--cpu-burst-us", "50000", "--", "x"]
    assert tail("share", False)[2:] == ["--unlimited", "--", "x"]
    assert tail("baseline", False) == ["x"]
    assert "--cpu-weight" in runner.wrap(["x"], False, root=True, cpu_weight=5)
    last = str(max(os.sched_getaffinity(0)))
    assert tail("pinned", False)[2:] == ["--unlimited", "--cpu-idle", "--cpus", last, "--", "x"]
    assert tail("idle", True)[-4:] == ["--unlimited", "--cpu-idle", "--", "x"]       # no cpuset unless asked


def test_check_limits_refuses_a_weight_config_outside_its_cgroup(fake_cgroupfs):
    from llm_psi.cli import UsageError
    from llm_psi.service import lifecycle
    with pytest.raises(UsageError, match="weight 33"):
        lifecycle.check_limits("weight")
    (fake_cgroupfs.own / "cpu.weight").write_text("33\n")
    with pytest.raises(UsageError, match="no cgroup made for it"):   # the weight, but not a cell of its own
        lifecycle.check_limits("weight")
    lifecycle.check_limits("baseline")


def test_check_limits_refuses_pinned_unless_on_one_cpu(fake_cgroupfs, monkeypatch):
    from llm_psi.cli import UsageError
    from llm_psi.service import lifecycle
    (fake_cgroupfs.own / "cpu.idle").write_text("1\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(UsageError, match="lacks cpus last"):
        lifecycle.check_limits("pinned")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    with pytest.raises(UsageError, match="no cgroup made for it"):   # pinned, but not in a cell of its own
        lifecycle.check_limits("pinned")


# ---- the probe co-tenant and its schedule ----------------------------------------------------------------

def test_cotenant_specs_combine_burners_and_a_probe():
    assert cotenant.parse_spec("cpu:2") == ("cpu", 2)
    assert cotenant.parse_spec("cpu:2+probe:100:10") == ("mix", {"cpu": 2, "probe": (100.0, 10.0)})
    assert cotenant.parse_spec("probe:50:5") == ("mix", {"cpu": 0, "probe": (50.0, 5.0)})
    assert cotenant.parse_spec("stress-ng --cpu 2") == ("command", "stress-ng --cpu 2")
    for bad in ("probe:10:10", "probe:100", "probe:x:1", "cpu:2+cpu:1", "cpu:0+probe:100:10"):
        with pytest.raises(ValueError):
            cotenant.parse_spec(bad)


def test_probe_ring_and_summary():
    ring = probe.ProbeRing()
    try:
        for i in range(1, 101):
            ring.write(float(i), i * 1000, 2 * i * 1000)
        got, n = ring.since(95)
        assert n == 100 and got == [(float(i), float(i), 2.0 * i) for i in range(96, 101)]
        assert len(ring.new()) == 100 and ring.new() == []
        s = probe.summarize(ring.since(0)[0])
        assert s["n"] == 100 and s["wake_p50_ms"] == 50.5 and s["delay_p99_ms"] == pytest.approx(198.02)
        assert math.isnan(probe.summarize([])["delay_p99_ms"])
    finally:
        ring.close_fd()


def test_probe_samples_are_written_as_csv_and_recompute_the_summary(tmp_path):
    """The per-period samples behind a probe summary go to a CSV (gzip for .gz), appended per trial with one
    header, times from the run's t0; their percentiles are the summary's."""
    records = [(100.0 + i / 10, i / 7, i / 3) for i in range(50)]
    for name in ("p.csv", "p.csv.gz"):
        path = str(tmp_path / name)
        probe.write_samples(path, records[:20], t0=100.0, trial=1)
        probe.write_samples(path, records[20:], t0=100.0, trial=2)
        got = pd.read_csv(path)
        assert list(got.columns) == probe.SAMPLES and len(got) == 50 and list(got["trial"].unique()) == [1, 2]
        assert got["t_s"].iloc[10] == pytest.approx(1.0)
        again = probe.summarize(list(zip(got["t_s"], got["wake_ms"], got["delay_ms"])))
        assert again == pytest.approx(probe.summarize(records))


def test_the_reference_run_writes_its_throughput_and_probe_samples(tmp_path):
    series = [{"t_s": 1.0, "units": 900, "units_per_s": 900.0, "cpu_s": 2.0, "cpu_share": 2.0},
              {"t_s": 2.0, "units": 1900, "units_per_s": 1000.0, "cpu_s": None, "cpu_share": None}]
    stem = str(tmp_path / "x_reference")
    cotenant.write_samples(stem, series, [(5.5, 0.1, 10.2), (5.6, 0.2, 11.0)], t0=5.0)
    tp = pd.read_csv(stem + "_throughput.csv")
    assert list(tp["units"]) == [900, 1900] and tp["cpu_s"].isna().tolist() == [False, True]
    pr = pd.read_csv(stem + "_probe.csv")
    assert pr["delay_ms"].tolist() == [10.2, 11.0] and pr["t_s"].tolist() == pytest.approx([0.5, 0.6])
    cotenant.write_samples(stem, series, [(5.7, 0.3, 12.0)], t0=5.0)  # a re-run replaces, never appends
    assert pd.read_csv(stem + "_probe.csv")["delay_ms"].tolist() == [12.0]
    os.remove(stem + "_probe.csv")
    cotenant.write_samples(stem, series, None, t0=5.0)  # burners alone: no probe file
    assert not os.path.exists(stem + "_probe.csv")


def test_probe_cotenant_records_delays_and_pauses(fake_cgroupfs):
    co = cotenant.Cotenant("cpu:1+probe:20:2", name="shr_test_probe", log=lambda m: None)
    with co:
        deadline = time.monotonic() + 20
        while co.probe_records()[1] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert co.probe_records()[1] >= 5
        co.pause()
        n, units = co.probe_records()[1], co.units()      # on return every process is stopped: nothing after
        assert {open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] for p in co.procs} == {"T"}
        time.sleep(0.3)
        assert co.probe_records()[1] == n and co.units() == units      # stopped: no work, no records
        co.resume()
        deadline = time.monotonic() + 20
        while co.probe_records()[1] <= n and time.monotonic() < deadline:
            time.sleep(0.05)
        records = co.probe_records(n)[0]
        assert records and max(r[1] for r in records) < 300          # the pause is not counted as delay
    assert co.describe()["probe"] == {"period_ms": 20.0, "work_ms": 2.0}


def test_generator_refuses_a_bad_schedule(generate):
    proc, _ = generate("--antagonist-schedule", "off:5", check=False)
    assert proc.returncode == 2 and "needs --antagonist" in proc.stderr
    proc, _ = generate("--antagonist", "cpu:1", "--antagonist-schedule", "off:5,maybe:3", check=False)
    assert proc.returncode == 2 and "--antagonist-schedule: bad schedule item 'maybe:3'" in proc.stderr
    assert proc.stderr.count("\n") == 1


# ---- the phase analysis -----------------------------------------------------------------------------------

SCHEDULE = [("off", 45.0), ("on", 60.0), ("off", 45.0)]


def test_schedule_and_phases():
    assert phases.parse_schedule("off:45,on:60,off:45") == SCHEDULE
    for bad in ("", "off:0", "on:-1", "off:x", "sometimes:3", "off:inf"):
        with pytest.raises(ValueError):
            phases.parse_schedule(bad)
    assert [phases.phase_of(t, SCHEDULE) for t in (0, 44.9, 45, 104.9, 105, 500)] == \
           ["before", "before", "with", "with", "after", "after"]
    assert phases.phase_of(1, [("on", 10.0)]) == "with"
    assert phases.changes(SCHEDULE) == {"arrive": 45.0, "leave": 105.0}
    df = pd.DataFrame({"t_submit_s": [1.0, 50.0, 60.0, 110.0]})
    assert {p: len(rows) for p, rows in phases.split_rows(df, SCHEDULE).items()} == {"before": 1, "with": 2, "after": 1}


def test_reaction_times_cross_halfway():
    t = [i * 1.0 for i in range(150)]
    quota = [2.0 if s < 47 else 0.5 if s < 108 else 1.0 if s < 109 else 2.0 for s in t]
    assert phases.reaction_time(t, quota, 45.0, settle_s=60) == 2.0     # 2 -> 0.5: below 1.25 at t=47
    got = phases.reaction_times(pd.DataFrame({"t_s": t, "share_quota_cores": quota}), SCHEDULE)
    assert got == {"react_arrive_s": 2.0, "react_leave_s": 4.0}       # 0.5 -> 2: 1.0 is below 1.25; 2.0 at 109
    flat = pd.DataFrame({"t_s": t, "share_quota_cores": [1.0] * 150})
    assert all(math.isnan(v) for v in phases.reaction_times(flat, SCHEDULE).values())


# ---- our controller ----------------------------------------------------------------------------------------

def test_control_law():
    law = dict(floor_us=50000, ceiling_us=200000, high_pct=10.0, low_pct=3.0)
    assert sharing.decide(200000, 50.0, **law) == 100000
    assert sharing.decide(60000, 50.0, **law) == 50000                  # not below the floor
    assert sharing.decide(50000, 1.0, **law) == 100000
    assert sharing.decide(150000, 0.0, **law) == 200000                 # not above the ceiling
    assert sharing.decide(100000, 5.0, **law) == 100000                 # between: hold
    assert sharing.decide(100000, None, **law) == 100000


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_controller_cuts_when_others_stall_and_raises_when_they_leave(tmp_path, caplog):
    d = tmp_path / "svc"
    _put(d / "cpu.max", "max 100000\n")
    info = {"mode": "v2", "cpu": str(d), "memory": str(d), "unified": str(d)}
    readings = iter([50.0, 50.0, 50.0, 5.0, 0.0, 0.0, 0.0])
    c = sharing.ShareController(info, lambda: next(readings), floor_pct=50, high_pct=10, low_pct=3,
                                clock=FakeClock(), cpus=2)
    assert _get(d / "cpu.max") == "200000 100000"                     # starts at the ceiling: every CPU
    caplog.set_level(logging.INFO, logger="sharing")
    got = [c.step() for _ in range(7)]
    assert got == [100000, 50000, 50000, 50000, 100000, 200000, 200000]
    assert _get(d / "cpu.max") == "200000 100000"
    assert len([r for r in caplog.records if "share: quota" in r.getMessage()]) == 4   # one line per change
    assert c.state() == {"share_quota_cores": 2.0, "share_others_pct": 0.0}


def test_controller_writes_the_v1_quota(tmp_path):
    d = tmp_path / "cpu" / "svc"
    _put(d / "cpu.cfs_quota_us", "-1\n")
    _put(d / "cpu.cfs_period_us", "100000\n")
    info = {"mode": "v1", "cpu": str(d), "memory": str(d), "unified": None}
    c = sharing.ShareController(info, lambda: 90.0, floor_pct=25, cpus=4)
    assert _get(d / "cpu.cfs_quota_us") == "400000"
    c.step()
    assert _get(d / "cpu.cfs_quota_us") == "200000"


def test_signal_system_minus_throttle(tmp_path):
    sys_p, cg = tmp_path / "cpu.pressure", tmp_path / "svc"
    _put(cg / "cpu.stat", "throttled_usec 0\n")
    info = {"mode": "v2", "cpu": str(cg), "memory": str(cg), "unified": str(cg)}
    clock = FakeClock()
    sig = sharing.SystemMinusThrottle(info, str(sys_p), clock)
    _put(sys_p, "some avg10=0 avg60=0 avg300=0 total=0\n")
    assert sig() is None
    clock.t += 1.0                                      # 1 s: system stalled 0.6 s, the service throttled 0.4 s
    _put(sys_p, "some avg10=0 avg60=0 avg300=0 total=600000\n")
    _put(cg / "cpu.stat", "throttled_usec 400000\n")
    assert sig() == pytest.approx(20.0)
    clock.t += 1.0                                      # its own throttling only: nobody else waits
    _put(sys_p, "some avg10=0 avg60=0 avg300=0 total=1100000\n")
    _put(cg / "cpu.stat", "throttled_usec 1000000\n")
    assert sig() == 0.0


def test_signal_siblings_takes_the_largest_other_cgroup(tmp_path):
    for name in ("svc", "a", "b"):
        _put(tmp_path / name / "cpu.pressure", "some avg10=0 avg60=0 avg300=0 total=0\n")
    clock = FakeClock()
    sig = sharing.SiblingPressure(str(tmp_path / "svc"), clock)
    assert sig() is None
    clock.t += 2.0
    _put(tmp_path / "svc" / "cpu.pressure", "some avg10=0 avg60=0 avg300=0 total=2000000\n")   # ours: ignored
    _put(tmp_path / "a" / "cpu.pressure", "some avg10=0 avg60=0 avg300=0 total=100000\n")
    _put(tmp_path / "b" / "cpu.pressure", "some avg10=0 avg60=0 avg300=0 total=600000\n")
    assert sig() == pytest.approx(30.0)
    assert sharing.make_signal("auto", {"unified": None, "cpu": "x"})[1] == "system"
    with pytest.raises(ValueError):
        sharing.make_signal("siblings", {"unified": None, "cpu": "x"})


def test_share_needs_a_cgroup_of_its_own(fake_cgroupfs):
    cfg = config.ServiceConfig(config="share", sharing="share")
    with pytest.raises(ValueError, match="needs a cgroup made for it"):
        sharing.build(cfg)
    assert sharing.build(config.ServiceConfig()) is None


# ---- for real on this host (root, a usable cgroupfs) -----------------------------------------------------

REAL = "/sys/fs/cgroup"
NAME = f"shr_test_{os.getpid()}"


def _cpu_dir():
    mode = cgroups.detect_mode(REAL)
    return cgroups.cgroup_info(mode, REAL, NAME, NAME, NAME)["cpu"], mode


@real_cgroups
@pytest.mark.parametrize("args,files,recorded", [
    (["--cpu-weight", "10"], {"v2": ("cpu.weight", "10"), "v1": ("cpu.shares", "102")}, {"cpu_weight": 10}),
    (["--unlimited", "--cpu-idle"], {"v2": ("cpu.idle", "1"), "v1": ("cpu.idle", "1")}, {"cpu_idle": 1}),
    (["--cpu-burst-us", "20000"], {"v2": ("cpu.max.burst", "20000"), "v1": ("cpu.cfs_burst_us", "20000")},
     {"cpu_burst_us": 20000})])
@pytest.mark.slow
def test_real_sharing_controls_show_in_the_files_and_the_meta(tmp_path, args, files, recorded):
    meta = tmp_path / "cell.json"
    meta.write_text("{}")
    p = subprocess.Popen([sys.executable, LIB, "run", "--name", NAME, *args, "--meta", str(meta), "--", "sleep", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        d, mode = _cpu_dir()
        name, want = files["v2" if mode == "v2" else "v1"]
        deadline, seen = time.monotonic() + 10, None
        while time.monotonic() < deadline and not cgroups.procs(d):
            time.sleep(0.05)
        seen = _get(os.path.join(d, name))
    finally:
        _, err = p.communicate(timeout=30)
        if os.path.isdir(_cpu_dir()[0]):
            cgroups.cleanup(NAME, root=REAL, log=print)
    assert p.returncode == 0, err
    assert seen == want
    rec = json.loads(meta.read_text())["cgroup_runs"][0]["sharing"]
    assert {k: rec[k] for k in recorded} == recorded


def test_metrics_show_the_controllers_state():
    from types import SimpleNamespace
    from llm_psi.service.prometheus import ServiceCollector

    class Controller:
        def state(self):
            return {"share_quota_cores": 0.5, "share_others_pct": 42.0}
    svc = SimpleNamespace(counts={}, running=0, waiting=0, admission=None, overload=None, sharing=Controller(),
                          cfg=SimpleNamespace(model=None, batching="off", max_batch=1, max_waiting=None))
    probe_reading = SimpleNamespace(read=lambda: {})
    families = {f.name: f.samples[0].value for f in ServiceCollector(SimpleNamespace(service=svc, probe=probe_reading, draining=False,
                                                                             host_cpu=SimpleNamespace(share=None))).collect()
                if f.samples}
    assert families["llm_share_quota_cores"] == 0.5 and families["llm_share_others_stall_ratio"] == 0.42


@pytest.mark.slow
def test_a_probe_cell_records_its_delays_in_json_and_timeline(generate, fake_cgroupfs):
    from conftest import read_cell
    _, out = generate("--arrival", "poisson", "--rate", "4", "--duration", "3", "--max-new-tokens", "4",
                      "--antagonist", "cpu:1+probe:50:5", "--antagonist-schedule", "off:1,on:2")
    _, meta = read_cell(out)
    co = meta["trials"][0]["cotenant"]
    assert co["probe"]["n"] > 0 and co["probe"]["delay_p99_ms"] >= co["probe"]["delay_p50_ms"] >= 0
    assert co["probe_phases"]["before"]["n"] == 0 and co["probe_phases"]["with"]["n"] > 0
    tl = pd.read_csv(str(out)[:-4] + "_timeline.csv")
    assert set(tl["cotenant_on"]) == {0, 1}
    assert tl.loc[tl["cotenant_on"] == 1, "probe_delay_p99_ms"].notna().any()
    assert tl.loc[tl["t_s"] < 0.9, "probe_delay_p99_ms"].isna().all()
    samples = pd.read_csv(str(out)[:-4] + "_probe.csv")  # the raw samples beside the cell recompute the JSON's
    assert len(samples) == co["probe"]["n"] and set(samples["trial"]) == {1}
    from llm_psi.analysis import phases
    schedule = phases.parse_schedule("off:1,on:2")
    with_phase = samples[[phases.phase_of(t, schedule) == "with" for t in samples["t_s"]]]
    assert probe.percentile(list(with_phase["delay_ms"]), 99) == pytest.approx(co["probe_phases"]["with"]["delay_p99_ms"])


@pytest.mark.slow
def test_a_trial_lasts_its_whole_schedule_however_few_its_requests(generate, fake_cgroupfs):
    from conftest import read_cell
    _, out = generate("--num-requests", "1", "--max-new-tokens", "2", "--antagonist", "cpu:1",
                      "--antagonist-schedule", "off:1,on:1.5")
    _, meta = read_cell(out)
    assert meta["trials"][0]["complete"] and meta["trials"][0]["wall_s"] >= 2.5   # one request, then the schedule
    tl = pd.read_csv(str(out)[:-4] + "_timeline.csv")
    assert set(tl["cotenant_on"]) == {0, 1} and tl["t_s"].max() >= 2.2


def test_a_cells_probe_samples_belong_to_the_cell(tmp_path):
    """--force replaces the probe samples with the cell, and a leftover one counts as the cell existing."""
    from types import SimpleNamespace
    from llm_psi.load.cell_files import CellFiles, probe_path
    cfg = SimpleNamespace(output=str(tmp_path / "x_c1.csv"), stem=str(tmp_path / "x_c1"), trial=None, trials=2,
                          force=True, resume=False)
    probe.write_samples(probe_path(cfg.stem), [(1.0, 0.1, 10.0)], t0=0.0, trial=1)
    cell = CellFiles(cfg)
    assert cell.existing() == [str(tmp_path / "x_c1_probe.csv")] and cell.plan() == [1, 2]
    cell.open({"start_wall": 0, "argv": []})
    assert not os.path.exists(probe_path(cfg.stem))


def test_signal_siblings_without_siblings_reads_zero_after_the_first(tmp_path):
    """With no sibling cgroup (nobody else on the host), nobody else stalls: 0 after the first reading, not None
    for ever (which kept the quota still and the service's /health failing on its NaN; issue 32)."""
    _put(tmp_path / "svc" / "cpu.pressure", "some avg10=0 avg60=0 avg300=0 total=0\n")
    clock = FakeClock()
    sig = sharing.SiblingPressure(str(tmp_path / "svc"), clock)
    assert sig() is None
    clock.t += 1.0
    assert sig() == 0.0
