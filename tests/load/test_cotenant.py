"""cotenant: spec parsing, burners and their counters, stop on every exit path, the cgroup (fake tree; real
where this host allows it), the sampler and the CLI. Behaviour, not timings: waits poll until a deadline."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llm_psi import cgroups
from conftest import ROOT, real_cgroups, run_script
from llm_psi.load.cotenant import Cotenant, ThroughputSampler, parse_spec

NAME = f"cot_test_{os.getpid()}"
CLI_NAME = "cot_test_cli"          # a subprocess locks it in /run/lock: one fixed name, one lock file
REAL = "/sys/fs/cgroup"
SCRIPT = """import faulthandler, json, os, signal, sys, time
faulthandler.register(signal.SIGUSR1)                      # the test asks for its stack if it does not exit
signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C -> KeyboardInterrupt even if inherited ignored
sys.path.insert(0, {root!r})
from llm_psi.cgroups import cell
from llm_psi.load import cotenant
cell.LOCK_DIR = {locks!r}
co = cotenant.Cotenant({spec!r}, name={name!r}, log=lambda m: None)
co.start()
print(json.dumps(co.describe()), flush=True)
time.sleep(60)
"""


def alive(pid):
    """The process exists and is not a zombie (a reparented child may wait a while for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def eventually(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def children(pid):
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


@pytest.fixture(autouse=True)
def locks(tmp_path, monkeypatch):
    """The name locks in tmp_path, not /run/lock."""
    monkeypatch.setattr(cgroups.cell, "LOCK_DIR", str(tmp_path))
    return str(tmp_path)


@pytest.mark.parametrize("text, want", [("cpu:1", ("cpu", 1)), (" CPU:4 ", ("cpu", 4)),
                                        ("stress-ng --cpu 2", ("command", "stress-ng --cpu 2")),
                                        ("sleep 30", ("command", "sleep 30"))])
def test_parse_spec_good(text, want):
    assert parse_spec(text) == want


@pytest.mark.parametrize("text", ["cpu:0", "cpu:x", "", "   ", "cpu:", "cpu:-1", "cpu:1.5", "cpu:99999", None])
def test_parse_spec_bad(text):
    with pytest.raises(ValueError) as e:
        parse_spec(text)
    assert "\n" not in str(e.value)


def test_constructor_rejects_bad_numbers():
    for kwargs in ({"quota_pct": 0}, {"quota_pct": float("nan")}, {"period_us": 10}, {"name": "a/b"}):
        with pytest.raises(ValueError):
            Cotenant("cpu:1", **kwargs)


def test_burner_counts_in_the_fake_cgroup_and_stop_cleans_up(fake_quota):
    said = []
    co = Cotenant("cpu:1", name=NAME, quota_pct=25, log=said.append).start()
    d = os.path.join(fake_quota["CGROUP_ROOT"], NAME)
    try:
        pids = co.describe()["pids"]
        assert len(pids) == 1 and alive(pids[0])
        assert eventually(lambda: co.units() > 0)
        first = co.units()
        assert eventually(lambda: co.units() > first)
        desc = co.describe()
        assert desc["cgroup_dirs"] == [d] and desc["cgroup_mode"] == "v2" and desc["cgroup_error"] is None
        with open(os.path.join(d, "cpu.max")) as f:
            assert f.read().split() == ["25000", "100000"]
        assert desc["limits"]["cpu_quota_us"] == 25000
        assert cgroups.procs(d) == pids                # it joined before doing work
        assert co.cpu_usage_s() is None                    # a fake tree has no cpu.stat
    finally:
        co.stop()
    assert not os.path.exists(d)
    assert not alive(pids[0])
    final = co.units()
    co.stop()                                              # idempotent
    assert co.units() == final and co.describe()["state"] == "stopped" and co.describe()["errors"] == []
    with pytest.raises(RuntimeError):
        co.start()


def test_without_cgroups_it_still_runs_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CGROUP_ROOT", str(tmp_path / "empty"))
    said = []
    with Cotenant("cpu:2", name=NAME, log=said.append) as co:
        assert eventually(lambda: co.units() > 0)
        desc = co.describe()
    assert desc["cgroup_dirs"] == [] and desc["cgroup_mode"] is None
    assert "no usable cgroup" in desc["cgroup_error"]
    assert len([s for s in said if "warning" in s]) == 1
    assert co.cpu_usage_s() is None
    assert not any(alive(p) for p in desc["pids"])


def test_command_cotenant_is_killed_by_stop(fake_quota):
    with Cotenant("sleep 30", name=NAME, log=lambda m: None) as co:
        pid = co.describe()["pids"][0]
        assert co.units() is None and alive(pid)
        with open(f"/proc/{pid}/comm") as f:
            assert f.read().strip() == "sleep"             # no shell in between: the death signal reaches it
    assert eventually(lambda: not alive(pid))
    assert not os.path.exists(os.path.join(fake_quota["CGROUP_ROOT"], NAME))


def test_shell_command_process_group_is_killed(fake_quota):
    co = Cotenant("sleep 31 & sleep 32 & wait", name=NAME, log=lambda m: None).start()
    shell = co.describe()["pids"][0]
    assert eventually(lambda: len(children(shell)) == 2)
    kids = children(shell)
    co.stop()
    assert eventually(lambda: not any(alive(p) for p in [shell, *kids]))


def test_sampler_rows(fake_quota):
    with Cotenant("cpu:1", name=NAME, log=lambda m: None) as co:
        sampler = ThroughputSampler(co, t0=time.monotonic() - 5, interval_s=0.2).start()
        assert eventually(lambda: len(sampler.rows()) >= 3)
        rows = sampler.stop()
    assert rows and all(set(r) == {"t_s", "units", "units_per_s", "cpu_s", "cpu_share"} for r in rows)
    assert rows[0]["t_s"] >= 5 and [r["t_s"] for r in rows] == sorted(r["t_s"] for r in rows)
    assert any(r["units_per_s"] > 0 for r in rows) and all(r["cpu_share"] is None for r in rows)
    assert sampler.stop() == rows                          # stopping again changes nothing


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_parent_leaves_no_burner(sig, fake_quota, locks):
    code = SCRIPT.format(root=ROOT, locks=locks, spec="cpu:2", name=NAME)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        desc = json.loads(p.stdout.readline())
        pids = desc["pids"]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        p.send_signal(sig)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:                  # where it hangs, for the failure's message
            p.send_signal(signal.SIGUSR1)
            time.sleep(1)
            p.kill()
            pytest.fail(f"the parent did not exit in 60 s after {sig!r}; its stack:\n{p.communicate()[1][-3000:]}")
    finally:
        p.kill()
        p.communicate()
    assert eventually(lambda: not any(alive(pid) for pid in pids))
    if sig == signal.SIGINT:                               # atexit ran stop(): the cgroup is gone too
        assert not os.path.exists(desc["cgroup_dirs"][0])


@pytest.mark.slow
def test_cli_prints_json(fake_quota, tmp_path):
    out = tmp_path / "ref.json"
    p = run_script("llm_psi.load.cotenant", "--antagonist", "cpu:1", "--seconds", "1.5", "--name", CLI_NAME, "--json", out,
                   timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result == json.loads(out.read_text())
    assert result["units"] > 0 and result["units_per_s"] > 0 and result["interrupted"] is False
    assert result["series"] and all("units_per_s" in r for r in result["series"])
    assert result["cotenant"]["spec"] == "cpu:1" and result["cotenant"]["state"] == "stopped"
    assert not os.path.exists(os.path.join(fake_quota["CGROUP_ROOT"], CLI_NAME))


@pytest.mark.parametrize("args", [["--antagonist", "cpu:0"], ["--antagonist", "cpu:x"], ["--antagonist", ""],
                                  ["--seconds", "nan"], ["--seconds", "0"], ["--antagonist-quota", "-5"],
                                  ["--antagonist-period-us", "10"], ["--name", "a/b"],
                                  ["--json", "/nonexistent/dir/x.json"]])
def test_cli_bad_input_is_one_line_exit_2(args):
    p = run_script("llm_psi.load.cotenant", *args, timeout=30)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("cotenant.py: error: ") and p.stderr.count("\n") == 1


def test_cli_missing_program_is_one_line_exit_2(fake_quota):
    p = run_script("llm_psi.load.cotenant", "--antagonist", "no-such-program-xyz --x", "--seconds", "1",
                   "--name", CLI_NAME, timeout=30)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines()[-1].startswith("cotenant.py: error: cannot start")


# ---- the real cgroupfs of this host --------------------------------------------------------------

@pytest.fixture
def real_root(monkeypatch):
    monkeypatch.delenv("CGROUP_ROOT", raising=False)
    yield
    mode = cgroups.detect_mode(REAL)
    leftover = [d for d in cgroups.cgroup_dirs(cgroups.cgroup_info(mode, REAL, NAME, NAME, NAME)) if os.path.isdir(d)]
    if leftover:
        cgroups.cleanup(NAME, root=REAL, log=print)
    assert not leftover, f"cgroups left behind: {leftover}"


@real_cgroups
def test_real_burners_run_in_their_cgroup(real_root):
    with Cotenant("cpu:2", name=NAME, quota_pct=50, log=lambda m: None) as co:
        desc = co.describe()
        mode = desc["cgroup_mode"]
        assert desc["cgroup_error"] is None and len(desc["cgroup_dirs"]) == {"v2": 1, "hybrid": 3, "v1": 2}[mode]
        for d in desc["cgroup_dirs"]:
            assert set(desc["pids"]) <= set(cgroups.procs(d)), d
        assert desc["limits"]["cpu_quota_us"] == 50000
        if mode != "v1":
            assert desc["cpu_pressure"] and os.path.exists(desc["cpu_pressure"])
        assert eventually(lambda: (co.cpu_usage_s() or 0) > 0)
    assert not any(os.path.exists(d) for d in desc["cgroup_dirs"])
    assert not any(alive(p) for p in desc["pids"])
    assert co.cpu_usage_s() > 0                            # read before the cgroup went


@real_cgroups
def test_real_sigkilled_parent_leftover_is_removed_by_next_start(real_root, locks):
    code = SCRIPT.format(root=ROOT, locks=locks, spec="cpu:1", name=NAME)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    desc = json.loads(p.stdout.readline())
    p.kill()
    p.communicate()
    assert eventually(lambda: not any(alive(pid) for pid in desc["pids"]))
    assert all(os.path.isdir(d) for d in desc["cgroup_dirs"])      # a SIGKILL leaves the (empty) cgroup
    said = []
    with Cotenant("cpu:1", name=NAME, log=said.append) as co:
        assert co.describe()["cgroup_dirs"] == desc["cgroup_dirs"]
    assert any("leftover" in s for s in said)
