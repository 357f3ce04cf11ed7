"""The headroom controller (llm_psi.control.headroom): its control law on fake inputs, and its reading and
writing on fake v2 and v1 cgroup trees with an injected clock."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from llm_psi.control import headroom as hr

LAW = dict(cpus=2.0, headroom=0.4, floor=0.5, stall_limit=5.0, ramp=0.5)


def test_law_sets_the_quota_from_demand_plus_headroom():
    assert hr.decide(1.3, 0.3, 0.0, **LAW) == pytest.approx(1.3)        # 2 - 0.3 - 0.4
    assert hr.decide(1.6, 0.3, 0.0, **LAW) == pytest.approx(1.3)        # falls at once
    assert hr.decide(0.5, 0.3, 0.0, **LAW) == pytest.approx(1.0)        # rises by the ramp
    assert hr.decide(1.0, 1.9, 0.0, **LAW) == pytest.approx(0.5)        # never below the floor
    assert hr.decide(0.5, 0.0, None, **LAW) == pytest.approx(1.0)       # no pressure file: demand alone


def test_law_cuts_hard_when_the_owner_stalls():
    assert hr.decide(1.3, 0.3, 5.0, **LAW) == 0.5
    assert hr.decide(1.3, None, 50.0, **LAW) == 0.5
    assert hr.decide(1.3, None, None, **LAW) == 1.3                     # nothing known: unchanged


def _put(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _read(path):
    with open(path) as f:
        return f.read().strip()


PSI = "some avg10=0.00 avg60=0.00 avg300=0.00 total={}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


def tree(tmp_path, mode):
    """(root, llm quota file, owner usage file and its format, owner pressure file) of a fake tree."""
    root = str(tmp_path / mode)
    if mode == "v2":
        _put(f"{root}/cgroup.controllers", "cpu memory\n")
        _put(f"{root}/llm/cpu.max", "max 100000\n")
        _put(f"{root}/llm/cpu.idle", "0\n")
        return root, f"{root}/llm/cpu.max", (f"{root}/owner/cpu.stat", "usage_usec {}\n"), f"{root}/owner/cpu.pressure"
    _put(f"{root}/cpu/cpu.cfs_quota_us", "-1\n")
    _put(f"{root}/memory/memory.limit_in_bytes", "9223372036854771712\n")
    _put(f"{root}/cpu/llm/cpu.cfs_quota_us", "-1\n")
    _put(f"{root}/cpu/llm/cpu.cfs_period_us", "100000\n")
    if mode == "hybrid":                           # v1 cpu.idle exists on recent kernels; pure v1 here lacks it
        _put(f"{root}/cpu/llm/cpu.idle", "0\n")
    if mode == "hybrid":
        _put(f"{root}/unified/cgroup.controllers", "\n")
        return (root, f"{root}/cpu/llm/cpu.cfs_quota_us", (f"{root}/unified/owner/cpu.stat", "usage_usec {}\n"),
                f"{root}/unified/owner/cpu.pressure")
    return root, f"{root}/cpu/llm/cpu.cfs_quota_us", (f"{root}/cpu/owner/cpuacct.usage", "{}000\n"), None


class Clock:
    t = 10.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("mode", ["v2", "hybrid", "v1"])
def test_controller_on_a_fake_tree(tmp_path, mode):
    root, quota_file, (usage_file, usage_fmt), psi = tree(tmp_path, mode)
    clock, lines = Clock(), []

    def owner(usage_us, stall_us):
        os.makedirs(own["cpu"], exist_ok=True)
        _put(usage_file, usage_fmt.format(usage_us))
        if psi:
            _put(psi, PSI.format(stall_us))
    llm, own = hr.info_of("llm", root), hr.info_of("owner", root)
    ctl = hr.Headroom(llm, hr.OwnerReader(own, clock), cpus=2, log=lines.append, clock=clock)
    assert _read(quota_file).split()[0] == "50000"                       # starts at the floor,
    idle_file = os.path.join(os.path.dirname(quota_file), "cpu.idle")
    assert ctl.idle == (mode != "v1") and (mode == "v1" or _read(idle_file) == "1")   # idle: the owner unknown
    assert ctl.step() == 1.0 and "from demand" in lines[-1]               # no owner cgroup yet: it uses 0
    owner(0, 0)
    assert ctl.step() == 1.5                                              # first owner reading: demand still 0
    for k in range(1, 4):                                                 # the owner uses 0.3 CPU, no stall
        clock.t += 1.0
        owner(300000 * k, 0)
        q = ctl.step()
    assert q == pytest.approx(1.3)                                        # 2 - 0.3 - 0.4
    said = len(lines)
    clock.t += 1.0                                                        # a demand 0.001 CPU higher: no change
    owner(300000 * 3 + 301000, 0)
    assert ctl.step() == pytest.approx(1.3) and len(lines) == said
    assert _read(quota_file).split()[0] == "130000"
    assert ctl.use_idle == (mode != "v1")
    if ctl.use_idle:                                                      # above the floor: SCHED_IDLE
        assert _read(idle_file) == "1" and lines[-1].split(" (")[0].endswith("CPUs, idle")
    if psi:                                                               # the owner stalls 50% of a second
        clock.t += 1.0
        owner(300000 * 4, 500000)
        assert ctl.step() == 0.5 and _read(quota_file).split()[0] == "50000"
        assert "owner stalls: cut" in lines[-1]
        assert _read(idle_file) == "1"                                    # a cut keeps the LLM idle
        for k in range(5, 10):                                            # held at the floor 5 steps, no stall
            clock.t += 1.0
            owner(300000 * k, 500000)
            assert ctl.step() == 0.5
        clock.t += 1.0
        owner(300000 * 10, 500000)
        assert ctl.step() == 1.0 and "from demand" in lines[-1] and _read(idle_file) == "1"
    clock.t += 1.0                                                        # the owner fills the host
    usage = int(_read(usage_file).split()[-1].replace("000", "", 1) if mode == "v1" else _read(usage_file).split()[1])
    owner(usage + 2000000, 500000 if psi else 0)
    assert ctl.step() == 0.5 and _read(quota_file).split()[0] == "50000"
    if ctl.use_idle:                                                      # at the floor: the default weight
        assert _read(idle_file) == "0"
    assert all(" headroom: quota " in line and line[:4].isdigit() for line in lines)


@pytest.mark.parametrize("mode", ["v2", "hybrid"])
def test_an_owner_there_before_the_first_reading_finds_the_llm_idle(tmp_path, mode):
    root, quota_file, (usage_file, usage_fmt), psi = tree(tmp_path, mode)
    clock, lines = Clock(), []
    llm, own = hr.info_of("llm", root), hr.info_of("owner", root)
    os.makedirs(own["cpu"])
    _put(usage_file, usage_fmt.format(0))
    _put(psi, PSI.format(0))
    ctl = hr.Headroom(llm, hr.OwnerReader(own, clock), cpus=2, log=lines.append, clock=clock)
    idle_file = os.path.join(os.path.dirname(quota_file), "cpu.idle")
    assert ctl.step() == 0.5 and not lines                                # one reading: no demand known yet
    assert _read(idle_file) == "1" and _read(quota_file).split()[0] == "50000"
    clock.t += 1.0                                                        # the owner fills the host and stalls
    _put(usage_file, usage_fmt.format(2000000))
    _put(psi, PSI.format(500000))
    assert ctl.step() == 0.5 and _read(idle_file) == "0" and "owner stalls: cut" in lines[-1]


def test_cli_help_states_the_law_and_refuses_a_missing_cgroup(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, CGROUP_ROOT=tree(tmp_path, "v2")[0])
    out = subprocess.run([sys.executable, "-m", "llm_psi.control.headroom", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    assert out.returncode == 0 and "cut hard: the owner waits" in out.stdout
    out = subprocess.run([sys.executable, "-m", "llm_psi.control.headroom", "--llm", "nope", "--seconds", "1"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no cgroup" in out.stderr
