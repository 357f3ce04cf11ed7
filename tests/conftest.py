"""Shared fixtures: run the suite's scripts as a user would, with the tiny GPT-2 config."""
import functools
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_script(script, *args, cwd=None, timeout=300, env=None):
    """Run ``python <script> args`` (a root script such as ``llm_server.py``) or ``python -m <module> args``
    (a dotted module such as ``bench.collapse``) from the repo; return the CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [os.path.join(ROOT, script)] if script.endswith(".py") else ["-m", script]
    if not script.endswith(".py"):
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *cmd, *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def read_cell(csv_path):
    """The cell's rows and metadata."""
    stem = os.path.splitext(str(csv_path))[0]
    with open(stem + ".json") as f:
        return pd.read_csv(csv_path), json.load(f)


@pytest.fixture
def generate(tmp_path):
    """Run the request generator with the tiny model; returns (proc, csv_path)."""
    def _run(*args, name="cell.csv", tiny=True, check=True):
        out = tmp_path / name
        extra = ["--tiny"] if tiny else []
        proc = run_script("request_generator.py", *extra, "--quiet", "--output", out, *args)
        if check:
            assert proc.returncode == 0, proc.stderr[-2000:]
        return proc, out
    return _run


@functools.lru_cache(maxsize=None)
def real_cgroups_reason():
    """Why this host's cgroups cannot be used for real (None if they can): a probe cgroup is made and removed."""
    from llm_psi import cgroups
    if os.geteuid() != 0:
        return "not root: cannot create cgroups"
    try:
        _, made = cgroups.create(f"probe_{os.getpid()}", 50, 100000, None, root="/sys/fs/cgroup",
                                    log=lambda _: None)
        cgroups.remove(made, print)
    except cgroups.CgroupError as e:
        return f"no usable cgroups here: {e}"
    return None


def real_cgroups(test):
    """For a test that needs root and this host's real cgroups: marked ``root``, and skipped with the reason
    where they cannot be used."""
    reason = real_cgroups_reason()
    return pytest.mark.root(pytest.mark.skipif(reason is not None, reason=str(reason))(test))


PRESSURE = "some avg10={avg10:.2f} avg60={avg10:.2f} avg300={avg10:.2f} total={total}\n"
NO_FULL_PRESSURE = "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


class FakeCgroupfs:
    """A fake cgroup v2 tree: root (cgroup.controllers, cpu.max unlimited, cpu.stat, cpu.pressure) and this
    process's own cgroup (the 0:: line of /proc/self/cgroup: cpu.max 50% of one CPU, memory.max max, cpu.stat,
    cpu.pressure; written after the root's).
    With $CGROUP_ROOT pointing at it, cgroup_lib reads it in place of /sys/fs/cgroup, and the system-wide
    pressure from root/cpu.pressure in place of /proc/pressure/cpu. Where this process runs in the root
    cgroup (0::/), own == root and the two pressure files are one."""

    def __init__(self, root):
        with open("/proc/self/cgroup") as f:
            rel = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "/")
        self.root, self.own = root, root / rel.lstrip("/")
        self.env = {"CGROUP_ROOT": str(root)}
        self.own.mkdir(parents=True, exist_ok=True)
        (root / "cgroup.controllers").write_text("cpu memory\n")
        (root / "cpu.max").write_text("max 100000\n")
        (root / "cpu.stat").write_text("usage_usec 1000\n")
        (self.own / "cpu.max").write_text("50000 100000\n")
        (self.own / "memory.max").write_text("max\n")
        (self.own / "cpu.stat").write_text("usage_usec 100\nnr_periods 5\nnr_throttled 1\nthrottled_usec 10\n")
        self.set_pressure("system", 0.0)
        self.set_pressure("cgroup", 0.0)

    def pressure_file(self, where):
        """root/cpu.pressure for "system", own/cpu.pressure for "cgroup"."""
        return {"system": self.root, "cgroup": self.own}[where] / "cpu.pressure"

    def set_pressure(self, where, avg10, total=0):
        """Write cpu.pressure of "system" or "cgroup": some avg10=avg60=avg300=avg10 total=total, full zero."""
        self.pressure_file(where).write_text(PRESSURE.format(avg10=avg10, total=total) + NO_FULL_PRESSURE)


@pytest.fixture
def fake_cgroupfs(tmp_path, monkeypatch):
    """A FakeCgroupfs in tmp_path with $CGROUP_ROOT set (child processes inherit it; .env holds it)."""
    root = tmp_path / "cgroupfs"
    root.mkdir()
    fake = FakeCgroupfs(root)
    monkeypatch.setenv("CGROUP_ROOT", str(root))
    return fake


@pytest.fixture
def fake_quota(fake_cgroupfs):
    """fake_cgroupfs (this process's cgroup has a quota of 50% of one CPU, so that a limited configuration can run
    without root), as its env."""
    return fake_cgroupfs.env


@pytest.fixture(scope="module")
def shared_server():
    """One default `llm_server.py serve --tiny` for a module's tests that only send it requests and assert
    nothing of its counters or its life (per module, and per xdist worker)."""
    from helpers import Server
    s = Server()
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture
def server():
    """server(*args, env=None): a started `llm_server.py serve --tiny` (helpers.Server), killed at the end."""
    from helpers import Server
    started = []

    def _start(*args, env=None):
        s = Server(*args, env=env)
        started.append(s)
        s.wait_ready()
        return s
    yield _start
    for s in started:
        s.stop()


REAL_CGROUPS_LOCK = "/tmp/llm_psi_tests_real_cgroups.lock"


def uses_host_cgroups(item) -> bool:
    """Marked ``root`` (real_cgroups) or ``host_cgroups``: the test uses the host's real cgroups as root."""
    return bool(item.get_closest_marker("root") or item.get_closest_marker("host_cgroups"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """With ``--dist loadgroup`` (pyproject's addopts): the tests that use the host's real cgroups go to one
    xdist worker, so that the lock below never leaves the other worker waiting. xdist marks a group by a
    suffix ``@group`` on the node id, set through ``item._nodeid``, which pytest 9 no longer reads: its groups
    are silently ignored. This sets the suffix where pytest 9 keeps the id (best effort: without it, the lock
    still keeps these tests apart, only slower)."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:
        return
    for item in items:
        if uses_host_cgroups(item) and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@real_cgroups")


@pytest.fixture(autouse=True)
def one_host_cgroups_test_at_a_time(request):
    """Every test that uses the host's real cgroups runs alone among them, one after another, as in a serial
    run, whichever xdist worker (``-n 2``, pyproject's addopts) has it: an exclusive flock held for the test.
    They share fixed cgroup names (the co-tenant's ``llm_cotenant``, the service's default ``llm_service``) and
    some start CPU burners. Tests marked ``host_cgroups`` join them: they run without root too, but as root
    they take the same names (a co-tenant started through the request generator is ``llm_cotenant``).
    The hook above sends them to one worker where it can."""
    if not uses_host_cgroups(request.node):
        yield
        return
    import fcntl
    with open(REAL_CGROUPS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
