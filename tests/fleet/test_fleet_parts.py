"""The fleet's parts without a fleet: HAProxy's generated configuration (and haproxy -c on it), the owners'
schedule, CPU lists and cpuset pinning on a fake v2 tree, the agent line's weight, the bench's report."""
import json
import os
import shutil

import pandas as pd
import pytest

from llm_psi.cgroups import cpuset
from llm_psi.fleet import haproxy
from llm_psi.fleet.fleet import host_cpus
from llm_psi.fleet.hosts import agent_weight
from llm_psi.fleet.owners import Schedule, busy

SERVERS = [{"name": "h0", "port": 8001, "agent_port": 8101}, {"name": "h1", "port": 8002, "agent_port": 8102}]


@pytest.mark.parametrize("balancer", haproxy.BALANCERS)
def test_the_generated_config_names_every_server_and_its_balancer(balancer, tmp_path):
    text = haproxy.config(balancer, SERVERS, 8080)
    servers = [ln.split() for ln in text.splitlines() if ln.strip().startswith("server ")]
    assert [s[1:3] for s in servers] == [["h0", "127.0.0.1:8001"], ["h1", "127.0.0.1:8002"]]
    assert ("agent-check" in text) == (balancer == "agent")
    if balancer == "agent":
        assert all(s[s.index("agent-port") + 1] == str(p["agent_port"]) for s, p in zip(servers, SERVERS))
        assert "agent-inter 500ms" in text and "balance roundrobin" in text
    else:
        assert f"balance {balancer}" in text
    if haproxy.binary():
        path = tmp_path / "h.cfg"
        path.write_text(text)
        haproxy.check(str(path))


def test_a_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown balancer"):
        haproxy.config("random", SERVERS, 8080)
    with pytest.raises(ValueError, match="at least one"):
        haproxy.config("agent", [], 8080)


def test_owners_take_turns():
    assert [busy(0, t, 10) for t in (0, 9.9, 10, 25)] == [True, True, False, True]
    assert [busy(1, t, 10) for t in (0, 9.9, 10, 25)] == [False, False, True, False]
    assert [busy(i, 0, 10) for i in range(4)] == [True, False, True, False]     # any N: every other host


class Owner:
    def __init__(self):
        self.paused, self.calls = False, []

    def pause(self):
        self.paused = True
        self.calls.append("pause")

    def resume(self):
        self.paused = False
        self.calls.append("resume")


def test_the_schedule_moves_each_owner_once_per_change():
    a, b = Owner(), Owner()
    s = Schedule([a, b], 10, t0=0)
    for t in (0, 1, 5, 10, 11, 20):
        s.apply(t)
    assert a.calls == ["resume", "pause", "resume"] and b.calls == ["pause", "resume", "pause"]
    assert s.transitions[:2] == [(0, 0, True), (0, 1, False)]


def test_host_cpus_wrap_around_the_machine():
    assert host_cpus(2, 1, cpu_count=2) == ["0", "1"]
    assert host_cpus(3, 1, cpu_count=2) == ["0", "1", "0"]
    assert host_cpus(2, 2, cpu_count=4) == ["0,1", "2,3"]


def test_cpuset_pins_a_v2_cgroup(fake_cgroupfs):
    d = fake_cgroupfs.root / "llm_fleet_0"
    d.mkdir()
    info = {"mode": "v2", "cpu": str(d)}
    assert cpuset.pin(info, "llm_fleet_0", "1") == []
    assert (d / "cpuset.cpus").read_text() == "1"
    assert "+cpuset" in (fake_cgroupfs.root / "cgroup.subtree_control").read_text()
    assert cpuset.parse_cpus("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="bad CPU list"):
        cpuset.pin(info, "llm_fleet_0", "one")


def test_cpuset_makes_a_v1_cpuset_cgroup(tmp_path):
    base = tmp_path / "cpuset"
    base.mkdir()
    (base / "cpuset.mems").write_text("0\n")
    info = {"mode": "hybrid", "cpu": str(tmp_path / "cpu" / "x")}
    made = cpuset.pin(info, "x", "0", root=str(tmp_path))
    assert made == [str(base / "x")] and (base / "x" / "cpuset.cpus").read_text() == "0"
    assert (base / "x" / "cpuset.mems").read_text() == "0"


def test_agent_weight_reads_haproxys_words():
    assert agent_weight("ready 75% maxconn:3") == 75
    assert agent_weight("drain") == 0
    assert agent_weight(None) is None and agent_weight("up") is None


def write_trial(d, balancer, k, instances, t_submit, e2e_s):
    stem = d / "trials" / f"{balancer}_t{k}"
    rows = [{"trial": k, "request_id": i, "status": "ok", "output_tokens": 4, "t_submit_s": t, "t_dequeue_s": t, "t_admit_s": t,
             "t_start_s": t, "t_first_token_s": t + e2e_s / 2, "t_end_s": t + e2e_s, "instance": h}
            for i, (h, t) in enumerate(zip(instances, t_submit))]
    pd.DataFrame(rows).to_csv(f"{stem}.csv", index=False)
    rec = {"balancer": balancer, "trial": k, "complete": True, "slo": "e2e:1500", "phase_s": 10, "duration_s": 20,
           "hosts": [{"name": "h0"}, {"name": "h1"}], "owners": {"h0": {"delay_p99_ms": 5.0 + k},
                                                                "h1": {"delay_p99_ms": 7.0}}}
    with open(f"{stem}.json", "w") as f:
        json.dump(rec, f)


def test_the_report_summarises_and_rewrites_byte_for_byte(tmp_path):
    from bench.fleet.report import report
    (tmp_path / "trials").mkdir()
    for k in (1, 2):
        # roundrobin: half the requests to the busy host (h0 busy 0-10 s, h1 10-20 s); agent: none
        write_trial(tmp_path, "roundrobin", k, ["h0", "h1", "h0", "h1"], [1, 2, 11, 12], 2.0)
        write_trial(tmp_path, "agent", k, ["h1", "h1", "h0", "h0"], [1, 2, 11, 12], 1.0)
    report(str(tmp_path))
    first = (tmp_path / "summary.csv").read_bytes()
    s = pd.read_csv(tmp_path / "summary.csv").set_index(["balancer", "metric"])
    assert list(s.columns) == ["mean", "ci_lo", "ci_hi", "n_trials"]
    assert s.loc[("roundrobin", "busy_share"), "mean"] == 0.5 and s.loc[("agent", "busy_share"), "mean"] == 0
    assert s.loc[("agent", "goodput_rps"), "mean"] > 0 and s.loc[("roundrobin", "goodput_rps"), "mean"] == 0
    assert s.loc[("agent", "owner_h0_p99_ms"), "mean"] == 6.5 and s.loc[("agent", "p95_e2e_ms"), "n_trials"] == 2
    report(str(tmp_path))
    assert (tmp_path / "summary.csv").read_bytes() == first
    assert (tmp_path / "timeline.png").stat().st_size > 0
