"""cgroup_lib: v2 against a fake cgroupfs tree; v1/hybrid/v2 for real where this host allows it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llm_psi import cgroups
from conftest import real_cgroups
from llm_psi.cgroups import CgroupError

from conftest import ROOT  # noqa: E402
LIB = os.path.join(ROOT, "cgroup_lib.py")
REAL = "/sys/fs/cgroup"
GIB4 = 4294967296


def _put(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _get(path):
    with open(path) as f:
        return f.read().strip()


@pytest.fixture
def v2(tmp_path):
    """A directory laid out like a pure v2 cgroupfs root."""
    root = tmp_path / "v2"
    _put(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    _put(root / "cgroup.subtree_control", "")
    return str(root)


@pytest.fixture
def v1(tmp_path):
    """A directory laid out like a pure v1 cgroupfs root (cpu and memory hierarchies)."""
    root = tmp_path / "v1"
    _put(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _put(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    return str(root)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """In-process locks in tmp_path; the real cgroupfs for subprocesses."""
    monkeypatch.setattr(cgroups.cell, "LOCK_DIR", str(tmp_path))
    monkeypatch.delenv("CGROUP_ROOT", raising=False)


def test_detect_modes(v2, v1):
    assert cgroups.detect_mode(v2) == "v2"
    assert cgroups.detect_mode(v1) == "v1"
    _put(os.path.join(v1, "unified", "cgroup.controllers"), "")
    assert cgroups.detect_mode(v1) == "hybrid"


def test_detect_fails_clearly(tmp_path):
    with pytest.raises(CgroupError, match="no usable cgroup"):
        cgroups.detect_mode(str(tmp_path))
    _put(tmp_path / "cgroup.controllers", "io pids\n")
    with pytest.raises(CgroupError, match="lacks the controllers cpu memory"):
        cgroups.detect_mode(str(tmp_path))


def test_create_v2_writes_limits_and_enables_controllers(v2):
    info, created = cgroups.create("svc", 50, 100000, 4 << 30, root=v2, log=print)
    d = os.path.join(v2, "svc")
    assert created == [d]
    assert _get(os.path.join(v2, "cgroup.subtree_control")) == "+cpu +memory"
    assert _get(os.path.join(d, "cpu.max")) == "50000 100000"
    assert _get(os.path.join(d, "memory.max")) == str(GIB4)
    assert info == {"mode": "v2", "cpu": d, "memory": d, "unified": d,
                    "pressure": os.path.join(d, "cpu.pressure")}
    assert cgroups.read_limits(info) == {"cpu_quota_us": 50000, "cpu_period_us": 100000,
                                            "memory_max_bytes": GIB4}


def test_create_v2_keeps_enabled_controllers_and_other_values(v2):
    _put(os.path.join(v2, "cgroup.subtree_control"), "cpu memory\n")
    info, _ = cgroups.create("svc", 150, 200000, None, root=v2, log=print)
    assert _get(os.path.join(v2, "cgroup.subtree_control")) == "cpu memory"
    assert _get(os.path.join(info["cpu"], "cpu.max")) == "300000 200000"
    assert _get(os.path.join(info["memory"], "memory.max")) == "max"
    assert cgroups.cpu_quota_cores(info) == 1.5


def test_create_v2_unlimited(v2):
    info, _ = cgroups.create("svc", None, 100000, None, root=v2, log=print)
    assert _get(os.path.join(info["cpu"], "cpu.max")) == "max 100000"
    assert _get(os.path.join(info["memory"], "memory.max")) == "max"
    assert cgroups.read_limits(info) == {"cpu_quota_us": None, "cpu_period_us": 100000,
                                            "memory_max_bytes": None}


def test_create_v1_writes_limits(v1):
    info, created = cgroups.create("svc", 50, 100000, 4 << 30, root=v1, log=print)
    assert created == [os.path.join(v1, "cpu", "svc"), os.path.join(v1, "memory", "svc")]
    assert _get(os.path.join(info["cpu"], "cpu.cfs_quota_us")) == "50000"
    assert _get(os.path.join(info["cpu"], "cpu.cfs_period_us")) == "100000"
    assert _get(os.path.join(info["memory"], "memory.limit_in_bytes")) == str(GIB4)
    assert info["unified"] is None and info["pressure"] is None


def test_leftover_without_processes_is_removed(v2):
    os.mkdir(os.path.join(v2, "svc"))
    said = []
    cgroups.create("svc", 50, 100000, 4 << 30, root=v2, log=said.append)
    assert any("leftover" in s and "earlier run that did not clean up" in s for s in said)


def test_leftover_with_processes_is_refused(v2):
    _put(os.path.join(v2, "svc", "cgroup.procs"), "12345\n")
    with pytest.raises(CgroupError, match=r"still has processes \[12345\].*cleanup --name svc"):
        cgroups.create("svc", 50, 100000, 4 << 30, root=v2, log=print)
    assert _get(os.path.join(v2, "svc", "cgroup.procs")) == "12345"


def test_remove_writes_cgroup_kill(v2, monkeypatch):
    """v2 (and hybrid's unified cgroup): the processes are killed through cgroup.kill, no signal loop."""
    d = os.path.join(v2, "svc")
    sleeper = subprocess.Popen(["sleep", "60"])
    _put(os.path.join(d, "cgroup.procs"), f"{sleeper.pid}\n")
    _put(os.path.join(d, "cgroup.kill"), "")
    written, said = [], []

    def kernel(path, value):                  # the fake kernel: kill everyone, drop the interface files
        written.append((path, value))
        sleeper.kill()
        sleeper.wait()
        for f in ("cgroup.procs", "cgroup.kill"):
            os.remove(os.path.join(d, f))

    monkeypatch.setattr(cgroups.cell, "_write", kernel)
    try:
        cgroups.remove([d], said.append)
    finally:
        sleeper.kill()
    assert written == [(os.path.join(d, "cgroup.kill"), 1)]
    assert not os.path.exists(d) and not any("SIGTERM" in s for s in said)


def test_merge_meta_appends_to_cgroup_runs(tmp_path):
    meta = tmp_path / "cell.json"
    meta.write_text(json.dumps({"keep": 1}))
    for trial in (1, 2):
        cgroups.merge_meta(str(meta), {"exit_status": 0, "trial": trial}, print)
    assert json.loads(meta.read_text()) == {"keep": 1, "cgroup_runs": [{"exit_status": 0, "trial": 1},
                                                                       {"exit_status": 0, "trial": 2}]}
    assert os.listdir(tmp_path) == ["cell.json"]           # written via tmp + os.replace


def test_merge_meta_reports_a_missing_file_and_makes_none(tmp_path):
    said = []
    cgroups.merge_meta(str(tmp_path / "absent.json"), {"exit_status": 1}, said.append)
    assert len(said) == 1 and "absent.json does not exist" in said[0]
    assert os.listdir(tmp_path) == []


def test_own_cell_cgroup(monkeypatch):
    info = {"mode": "v2", "cpu": "/sys/fs/cgroup/cell_a", "memory": "/sys/fs/cgroup/cell_a"}
    monkeypatch.delenv(cgroups.CELL_ENV, raising=False)
    assert cgroups.own_cell_cgroup(info) is None
    monkeypatch.setenv(cgroups.CELL_ENV, "cell_a")
    assert cgroups.own_cell_cgroup(info) == "cell_a"
    monkeypatch.setenv(cgroups.CELL_ENV, "cell_b")              # e.g. inherited by a process elsewhere
    assert cgroups.own_cell_cgroup(info) is None


@pytest.mark.parametrize("args,flag", [
    (["--cpu-quota", "nan"], "--cpu-quota"), (["--cpu-quota", "inf"], "--cpu-quota"),
    (["--cpu-quota", "-5"], "--cpu-quota"), (["--cpu-quota", "0"], "--cpu-quota"),
    (["--cpu-period-us", "0"], "--cpu-period-us"), (["--cpu-period-us", "nan"], "--cpu-period-us"),
    (["--memory-max", "-1G"], "--memory-max"), (["--memory-max", "0"], "--memory-max"),
    (["--memory-max", "nan"], "--memory-max"), (["--unlimited", "--cpu-quota", "50"], "--unlimited"),
    (["--unlimited", "--memory-max", "max"], "--unlimited"), (["--cpus", "one"], "--cpus"),
    (["--cpus", "1-"], "--cpus"), (["--cpus", "4096"], "--cpus")])
def test_cli_rejects_bad_numbers_in_one_line(v2, args, flag):
    p = subprocess.run([sys.executable, LIB, "run", "--name", "svc", *args, "--", "true"], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, CGROUP_ROOT=v2))
    assert p.returncode == 2
    assert p.stderr.startswith("cgroup_lib.py run: error: ") and flag in p.stderr
    assert p.stderr.count("\n") == 1
    assert not os.path.exists(os.path.join(v2, "svc"))


def test_bad_name_is_refused(v2):
    with pytest.raises(CgroupError, match="bad cgroup name"):
        cgroups.create("../etc", 50, 100000, None, root=v2, log=print)


def test_read_counters_v2(v2):
    d = os.path.join(v2, "svc")
    _put(os.path.join(d, "cpu.stat"), "usage_usec 900\nuser_usec 800\nsystem_usec 100\n"
         "nr_periods 10\nnr_throttled 4\nthrottled_usec 2500\n")
    _put(os.path.join(d, "memory.peak"), "123456\n")
    _put(os.path.join(d, "memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    info = cgroups.cgroup_info("v2", v2, "svc", "svc", "svc")
    assert cgroups.read_counters(info) == {
        "nr_periods": 10, "nr_throttled": 4, "throttled_usec": 2500, "usage_usec": 900,
        "memory_peak_bytes": 123456, "oom_kill": 1}


def test_read_counters_and_limits_hybrid(tmp_path):
    root = str(tmp_path)
    _put(tmp_path / "cpu" / "svc" / "cpu.stat", "nr_periods 7\nnr_throttled 5\nthrottled_time 3000999\n")
    _put(tmp_path / "cpu" / "svc" / "cpu.cfs_quota_us", "-1\n")
    _put(tmp_path / "cpu" / "svc" / "cpu.cfs_period_us", "100000\n")
    _put(tmp_path / "memory" / "svc" / "memory.max_usage_in_bytes", "777\n")
    _put(tmp_path / "memory" / "svc" / "memory.limit_in_bytes", "9223372036854771712\n")
    _put(tmp_path / "memory" / "svc" / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    _put(tmp_path / "unified" / "svc" / "cpu.stat", "usage_usec 4242\n")
    info = cgroups.cgroup_info("hybrid", root, "svc", "svc", "svc")
    assert cgroups.read_counters(info) == {
        "nr_periods": 7, "nr_throttled": 5, "throttled_usec": 3000, "usage_usec": 4242,
        "memory_peak_bytes": 777, "oom_kill": 2}
    assert cgroups.read_limits(info) == {"cpu_quota_us": None, "cpu_period_us": 100000,
                                            "memory_max_bytes": None}
    assert cgroups.cpu_quota_cores(info) is None


def test_own_cgroup_from_proc_file(v2, tmp_path):
    proc = tmp_path / "proc_cgroup"
    _put(proc, "0::/system.slice/llm.service\n")
    info = cgroups.own_cgroup(v2, str(proc))
    assert info["cpu"] == os.path.join(v2, "system.slice", "llm.service")
    assert info["pressure"] is None                      # no cpu.pressure file in the fake tree
    hy = tmp_path / "hy"
    _put(hy / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _put(hy / "memory" / "memory.limit_in_bytes", "1\n")
    _put(hy / "unified" / "cgroup.controllers", "")
    _put(hy / "unified" / "svc" / "cpu.pressure", "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    _put(proc, "4:memory:/svc\n2:cpu,cpuacct:/svc\n1:name=systemd:/\n0::/svc\n")
    info = cgroups.own_cgroup(str(hy), str(proc))
    assert info == {"mode": "hybrid", "cpu": str(hy / "cpu" / "svc"), "memory": str(hy / "memory" / "svc"),
                    "unified": str(hy / "unified" / "svc"), "pressure": str(hy / "unified" / "svc" / "cpu.pressure")}


@pytest.mark.parametrize("hybrid", [True, False])
def test_pressure_path_hybrid_and_v2(tmp_path, hybrid):
    proc = tmp_path / "cgroup"
    _put(proc, "4:memory:/x\n1:cpu:/\n0::/llm_service\n" if hybrid else "0::/llm_service\n")
    root = tmp_path / "root"
    d = root / ("unified" if hybrid else "") / "llm_service"
    _put(d / "cpu.pressure", "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert cgroups.pressure_path("cpu", str(root), str(proc)) == str(d / "cpu.pressure")
    assert cgroups.pressure_path("io", str(root), str(proc)) is None
    assert cgroups.pressure_path("cpu", str(root), str(tmp_path / "missing")) is None
    _put(proc, "4:memory:/x\n1:cpu:/\n")                          # pure v1: no 0:: line
    assert cgroups.pressure_path("cpu", str(root), str(proc)) is None


def test_system_pressure_path_follows_the_injected_root(tmp_path, monkeypatch):
    assert cgroups.system_pressure_path("cpu") == "/proc/pressure/cpu"       # a real run
    assert cgroups.system_pressure_path("io", str(tmp_path)) == str(tmp_path / "io.pressure")
    _put(tmp_path / "unified" / "cpu.pressure", "")                             # hybrid: the unified root's
    monkeypatch.setenv("CGROUP_ROOT", str(tmp_path))
    assert cgroups.system_pressure_path("cpu") == str(tmp_path / "unified" / "cpu.pressure")


def test_fake_cgroupfs_is_what_the_library_finds(fake_cgroupfs):
    info = cgroups.own_cgroup()
    assert info["cpu"] == str(fake_cgroupfs.own) and info["pressure"] == str(fake_cgroupfs.pressure_file("cgroup"))
    assert cgroups.pressure_path("cpu") == info["pressure"]
    assert cgroups.system_pressure_path("cpu") == str(fake_cgroupfs.pressure_file("system"))
    assert cgroups.cpu_quota_cores() == 0.5


def test_probe_counts_only_a_cell_of_its_own(fake_cgroupfs, monkeypatch):
    monkeypatch.delenv(cgroups.CELL_ENV, raising=False)
    probe = cgroups.CgroupProbe()
    assert probe.counters() is None and "no counters" in probe.note and probe.error is None
    assert probe.describe()["own"] is False and probe.describe()["limits"]["cpu_quota_us"] == 50000
    monkeypatch.setenv(cgroups.CELL_ENV, fake_cgroupfs.own.name)
    probe = cgroups.CgroupProbe()
    assert probe.own and probe.note is None and probe.counters()["nr_throttled"] == 1
    monkeypatch.setenv("CGROUP_ROOT", str(fake_cgroupfs.root / "missing"))
    probe = cgroups.CgroupProbe()
    assert probe.counters() is None and probe.error.startswith("CgroupError: ")


def test_parse_bytes_and_delta():
    assert cgroups.parse_bytes("4G") == GIB4
    assert cgroups.parse_bytes("512m") == 512 << 20
    assert cgroups.parse_bytes("1000") == 1000
    assert cgroups.parse_bytes("max") is None
    with pytest.raises(ValueError):
        cgroups.parse_bytes("4 GB")
    before = {"nr_periods": 5, "memory_peak_bytes": 10, "oom_kill": None}
    after = {"nr_periods": 9, "memory_peak_bytes": 7, "oom_kill": 0}
    assert cgroups.counter_delta(before, after) == {"nr_periods": 4, "memory_peak_bytes": 7, "oom_kill": 0}
    assert cgroups.counter_delta(None, after) is None and cgroups.counter_delta(before, None) is None
    assert cgroups.counter_delta({}, after) is None
    assert cgroups.counter_delta({"usage_usec": 5, "peak_in_flight": 9}, {"usage_usec": None, "peak_in_flight": 3}
                                    ) == {"usage_usec": None, "peak_in_flight": 3}


def test_lock_refuses_a_second_holder():
    fd = cgroups.lock("svc")
    try:
        with pytest.raises(CgroupError, match=f"in use by a running experiment \\(pid {os.getpid()}\\)"):
            cgroups.lock("svc")
    finally:
        os.close(fd)
    os.close(cgroups.lock("svc"))


@pytest.mark.root
def test_non_root_is_refused(tmp_path):
    if not shutil.which("setpriv") or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run as nobody")
    p = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        sys.executable, LIB, "run", "--name", "cgl_test_nonroot", "--", "true"],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert p.returncode == 2
    assert "must run as root" in p.stderr
    assert p.stderr.count("\n") == 1


# ---- the real cgroupfs of this host --------------------------------------------------------------

real = real_cgroups
NAME = f"cgl_test_{os.getpid()}"
BURN = "import time\nt = time.time()\nwhile time.time() - t < {s}: pass\n"
SHOW_AND_BURN = "print(open('/proc/self/cgroup').read(), flush=True)\n" + BURN


def _real_dirs():
    mode = cgroups.detect_mode(REAL)
    return cgroups.cgroup_dirs(cgroups.cgroup_info(mode, REAL, NAME, NAME, NAME))


def _runner(*cmd, meta=None, limits=()):
    args = [sys.executable, LIB, "run", "--name", NAME, *limits]
    args += ["--meta", str(meta)] if meta else []
    return subprocess.Popen(args + ["--", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_procs(timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for d in _real_dirs() for p in cgroups.procs(d)]
        if pids:
            return pids
        time.sleep(0.05)
    raise AssertionError("no process appeared in the test cgroup")


@pytest.fixture
def real_cleanup():
    yield
    leftover = [d for d in _real_dirs() if os.path.isdir(d)]
    if leftover:
        cgroups.cleanup(NAME, root=REAL, log=print)
    assert not leftover, f"cgroups left behind: {leftover}"


@real
def test_real_run_places_process_and_records_counters(tmp_path, real_cleanup):
    meta = tmp_path / "cell.json"
    meta.write_text(json.dumps({"keep": 1}))
    p = _runner(sys.executable, "-c", SHOW_AND_BURN.format(s=0.5), meta=meta)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    mode = cgroups.detect_mode(REAL)
    lines = out.splitlines()
    if mode != "v1":
        assert f"0::/{NAME}" in lines
    if mode != "v2":
        assert any(line.endswith(f":cpu:/{NAME}") or f"cpu,cpuacct:/{NAME}" in line for line in lines)
        assert any(line.endswith(f":memory:/{NAME}") for line in lines)
    cell = json.loads(meta.read_text())
    assert cell["keep"] == 1 and len(cell["cgroup_runs"]) == 1
    rec = cell["cgroup_runs"][0]
    assert rec["limits"] == {"cpu_quota_us": 50000, "cpu_period_us": 100000, "memory_max_bytes": GIB4}
    assert rec["counters"]["nr_throttled"] > 0 and rec["counters"]["throttled_usec"] > 0
    assert rec["counters"]["memory_peak_bytes"] > 0 and rec["counters"]["oom_kill"] == 0
    assert rec["exit_status"] == 0
    assert f"cgroup: {mode} {NAME}: cpu 50000/100000 us, memory {GIB4} bytes" in err
    assert not any(os.path.exists(d) for d in _real_dirs())


@real
def test_real_unlimited_cell_knows_it_is_its_own(real_cleanup):
    code = (f"import json, sys\nsys.path.insert(0, {ROOT!r})\nfrom llm_psi import cgroups\n"
            "info = cgroups.own_cgroup()\n"
            "print(json.dumps([cgroups.own_cell_cgroup(info), cgroups.read_limits(info)]))\n")
    p = _runner(sys.executable, "-c", code, limits=["--unlimited"])
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert json.loads(out) == [NAME, {"cpu_quota_us": None, "cpu_period_us": 100000, "memory_max_bytes": None}]
    assert "cpu max/100000 us, memory max bytes" in err
    assert cgroups.own_cell_cgroup() is None                  # this process: no cell of its own


@real
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_mid_cell_tears_down(sig, tmp_path, real_cleanup):
    meta = tmp_path / "cell.json"
    meta.write_text("{}")
    p = _runner(sys.executable, "-c", BURN.format(s=60), meta=meta)
    child = _wait_for_procs()
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == -sig, err
    assert f"stopped by {sig.name}" in err
    assert json.loads(meta.read_text())["cgroup_runs"][0]["stopped_by"] == sig.name
    assert not any(os.path.exists(d) for d in _real_dirs())
    assert not os.path.exists(f"/proc/{child[0]}")


@pytest.mark.slow
@real
def test_real_child_ignoring_signals_is_killed(real_cleanup):
    code = ("import signal, time\nfor s in (signal.SIGINT, signal.SIGTERM):\n"
            "    signal.signal(s, signal.SIG_IGN)\ntime.sleep(60)\n")
    p = _runner(sys.executable, "-c", code)
    _wait_for_procs()
    time.sleep(0.2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGTERM
    assert "via cgroup.kill" in err or "sending SIGKILL" in err     # cgroup.kill: v2 and hybrid, kernel >= 5.14
    assert time.monotonic() - t0 < cgroups.STOP_GRACE_S + 10


@real
def test_real_cpus_pin_the_cell_and_go_with_it(tmp_path, real_cleanup):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to tell a pinned cell from an unpinned one")
    meta = tmp_path / "cell.json"
    meta.write_text("{}")
    mode = cgroups.detect_mode(REAL)
    pinned_dir = os.path.join(REAL, "cpuset", NAME)       # v1 and hybrid: a cpuset cgroup of the cell's name
    p = _runner(sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))", meta=meta,
                limits=["--unlimited", "--cpu-idle", "--cpus", str(cpus[-1])])
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == f"[{cpus[-1]}]"
    assert f"idle, cpus {cpus[-1]}" in err
    rec = json.loads(meta.read_text())["cgroup_runs"][0]
    assert rec["cpus"] == str(cpus[-1]) and rec["sharing"]["cpu_idle"] == 1
    assert (pinned_dir in rec["dirs"]) == (mode != "v2")
    assert not os.path.exists(pinned_dir) and not any(os.path.exists(d) for d in _real_dirs())


@real
def test_real_cleanup_removes_a_leftover_cpuset(real_cleanup):
    if cgroups.detect_mode(REAL) == "v2":
        pytest.skip("v2 pins the cell's own cgroup: no cpuset cgroup to leave behind")
    pinned_dir = os.path.join(REAL, "cpuset", NAME)
    os.mkdir(pinned_dir)
    p = subprocess.run([sys.executable, LIB, "cleanup", "--name", NAME], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(pinned_dir) and f"cleaning up {pinned_dir}" in p.stderr


@real
def test_real_leftovers_and_cleanup(real_cleanup):
    for d in _real_dirs():
        os.mkdir(d)
    p = _runner("true")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "of an earlier run that did not clean up" in err
    # a leftover with a process in it and no run holding the name (a killed run's orphan): the next run
    # stops the process and removes it; so does `cleanup`
    for command in ("run", "cleanup"):
        for d in _real_dirs():
            os.mkdir(d)
        sleeper = subprocess.Popen(["sleep", "60"])
        for d in _real_dirs():
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(sleeper.pid))
        argv = ["run", "--name", NAME, "--", "true"] if command == "run" else ["cleanup", "--name", NAME]
        c = subprocess.run([sys.executable, LIB, *argv], capture_output=True, text=True, timeout=30)
        assert c.returncode == 0, c.stderr
        assert sleeper.wait(timeout=10) in (-signal.SIGTERM, -signal.SIGKILL)
        if command == "run":
            assert f"no live run holds {NAME}: stopping its processes [{sleeper.pid}]" in c.stderr
        assert not any(os.path.exists(d) for d in _real_dirs())


@real
def test_real_second_run_and_cleanup_leave_a_live_run_alone(real_cleanup):
    p = _runner(sys.executable, "-c", "import time; time.sleep(60)")
    _wait_for_procs()
    for cmd in (["run", "--name", NAME, "--", "true"], ["cleanup", "--name", NAME]):
        q = subprocess.run([sys.executable, LIB, *cmd], capture_output=True, text=True, timeout=30)
        assert q.returncode == 2 and "in use by a running experiment" in q.stderr
    assert all(os.path.isdir(d) for d in _real_dirs())
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGTERM
