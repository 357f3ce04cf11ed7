"""The engine's thread defaults: derived from a fake quota and cpuset (v2 and v1 trees), and in effect in the
processes the entry points start (OpenMP's own report of its settings, OMP_DISPLAY_ENV=VERBOSE)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from llm_psi import cgroups
from llm_psi.engine import threads


def test_derive_whole_cpus_under_quota_and_cpuset():
    assert threads.derive(None, None, 8) == 8
    assert threads.derive(0.5, None, 8) == 1              # the paper's quota: one thread
    assert threads.derive(1.5, [0, 1, 2, 3], 8) == 1      # whole CPUs, rounded down
    assert threads.derive(3.0, [0, 1], 8) == 2            # the cpuset caps the quota
    assert threads.derive(None, [2, 5, 7], 8) == 3


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def v2_tree(tmp_path, quota, cpuset):
    """A v2 tree with this process in /svc/cell: a quota on the parent, a cpuset on the cell."""
    root = tmp_path / "v2"
    write(root / "cgroup.controllers", "cpuset cpu memory")
    write(root / "svc" / "cpu.max", quota)
    write(root / "svc" / "cell" / "cpu.max", "max 100000")
    write(root / "svc" / "cell" / "cpu.weight", "50")
    write(root / "svc" / "cell" / "cpuset.cpus.effective", cpuset)
    write(tmp_path / "cgroup_v2", "0::/svc/cell")
    return str(root), str(tmp_path / "cgroup_v2")


def v1_tree(tmp_path, quota_us, cpuset):
    root = tmp_path / "v1"
    write(root / "cpu" / "cell" / "cpu.cfs_quota_us", str(quota_us))
    write(root / "cpu" / "cell" / "cpu.cfs_period_us", "100000")
    write(root / "cpu" / "cell" / "cpu.shares", "512")
    write(root / "cpu" / "cpu.cfs_quota_us", "-1")
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712")
    write(root / "cpuset" / "cpuset.cpus", "0-7")
    write(root / "cpuset" / "cell" / "cpuset.effective_cpus", cpuset)
    write(tmp_path / "cgroup_v1", "4:cpu,cpuacct:/cell\n3:cpuset:/cell\n2:memory:/cell\n0::/")
    return str(root), str(tmp_path / "cgroup_v1")


@pytest.mark.parametrize("tree", [v2_tree, v1_tree])
def test_auto_threads_from_fake_quota_and_cpuset(tmp_path, tree):
    quota = "250000 100000" if tree is v2_tree else 250000
    cpus = cgroups.read_cpus(*tree(tmp_path, quota, "0-3,6"))
    assert cpus["quota_cores"] == 2.5 and cpus["cpuset"] == [0, 1, 2, 3, 6] and cpus["cpu_weight"] == 50
    assert threads.resolve_threads("auto", cpus) == 2
    narrow = cgroups.read_cpus(*tree(tmp_path / "narrow", "max 100000" if tree is v2_tree else -1, "5"))
    assert narrow["quota_cores"] is None and threads.resolve_threads("auto", narrow) == 1
    assert threads.resolve_threads("default", cpus) is None and threads.resolve_threads("3", cpus) == 3


def test_wait_policy():
    assert threads.resolve_policy("auto", {}) == ("PASSIVE", "auto")
    assert threads.resolve_policy("auto", {"OMP_WAIT_POLICY": "active"}) == ("active", "environment")
    assert threads.resolve_policy("unset", {"OMP_WAIT_POLICY": "active"}) == (None, "unset")
    assert threads.resolve_policy("active", {}) == ("ACTIVE", "option")
    with pytest.raises(ValueError, match="omp wait policy"):
        threads.resolve_policy("spin", {})


def omp_report(text: str) -> dict:
    """OpenMP's settings as libgomp printed them at start (OMP_DISPLAY_ENV=VERBOSE)."""
    return {k.strip(): v.strip().strip("'") for line in text.splitlines() if " = " in line
            for k, v in [line.split(" = ", 1)] if k.strip() in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT")}


@pytest.mark.slow
@pytest.mark.parametrize("label, spin, recorded", [("baseline", "300000", None), ("cgroups_threads", "0", "PASSIVE")])
def test_generator_runs_with_the_policy_it_records(tmp_path, fake_quota, label, spin, recorded):
    """The paper's label runs with libgomp's default (spins 300000 rounds); any other label with PASSIVE (no
    spin) and one thread under the fake half-CPU quota, as OpenMP itself reports and the cell's JSON says."""
    out = tmp_path / "cell.csv"
    env = dict(os.environ, OMP_DISPLAY_ENV="VERBOSE", **fake_quota)
    env.pop("OMP_WAIT_POLICY", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "request_generator.py"), "--tiny", "--config", label,
                        "--num-requests", "1", "--max-new-tokens", "2", "--output", str(out), "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    omp = omp_report(r.stderr)
    assert omp["GOMP_SPINCOUNT"] == spin
    model = json.loads(out.with_suffix(".json").read_text())["environment"]["model"]
    assert model["omp_wait_policy"] == recorded and model["threading"]["settled_before_torch"]
    if recorded:
        assert omp["OMP_NUM_THREADS"] == "1" and model["torch_threads"] == 1 and model["engine"] == "loop"


@pytest.mark.slow
def test_service_runs_passive_with_the_threads_of_its_quota(server, fake_quota):
    s = server(env=dict(fake_quota, OMP_DISPLAY_ENV="VERBOSE"))
    s.stop()
    omp = omp_report(s.proc.stdout.read())
    assert omp == {"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "0"}
