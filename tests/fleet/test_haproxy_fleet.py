"""The fleet with the real HAProxy and the tiny model: the agent's drain during a drain sends every new
request to the other instance; a weight of 0% sends nothing; a SIGKILLed fleet (and bench) leaves nothing
running. Skipped where haproxy is not installed (Debian: apt-get install haproxy)."""
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ROOT, real_cgroups
from llm_psi.fleet import haproxy
from llm_psi.fleet.fleet import Fleet
from llm_psi.fleet.hosts import ask_agent, cleanup

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(haproxy.binary() is None, reason="haproxy is not installed (apt-get install haproxy)")]
SERVE = ["--tiny", "--admission", "limit", "--drain-timeout-s", "60"]


def served_by(url, n, max_tokens=2):
    names = []
    for i in range(n):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": f"Hi {i}", "max_tokens": max_tokens}, timeout=60)
        assert r.status_code == 200, r.text
        names.append(r.headers["x-llm-psi-instance"])
    return names


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(2, "agent", SERVE, isolate=False, workdir=str(tmp_path), log=lambda m: None, ready_timeout_s=120)
    f.start()
    yield f
    f.stop()


@pytest.fixture
def slow_fleet(tmp_path):
    """Hosts whose 250-token request lasts seconds (the 124M architecture, our loop, one thread): the tiny model
    finishes it in half a second, before a drain can be watched."""
    serve = ["--engine", "loop", "--quantize", "none", "--torch-threads", "1", "--admission", "limit",
             "--drain-timeout-s", "60"]
    f = Fleet(2, "agent", serve, isolate=False, workdir=str(tmp_path), log=lambda m: None, ready_timeout_s=180)
    f.start()
    yield f
    f.stop()


@pytest.mark.model
def test_both_instances_serve_and_the_agent_drains_one_while_the_other_serves(slow_fleet):
    fleet = slow_fleet
    assert set(served_by(fleet.url, 6)) == {"h0", "h1"}
    h0 = fleet.hosts[0]
    long = {}
    t = threading.Thread(target=lambda: long.update(r=httpx.post(
        f"{h0.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 250}, timeout=120)))
    t.start()
    while "vllm:num_requests_running{model_name=\"gpt2\"} 1.0" not in httpx.get(f"{h0.url}/metrics").text:
        assert t.is_alive()
        time.sleep(0.05)
    h0.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)                                    # two agent intervals
    assert ask_agent(h0.agent_port) == "drain"
    during = served_by(fleet.url, 4)
    draining = t.is_alive()
    t.join()
    assert long["r"].status_code == 200                # the request in flight finished
    assert during == ["h1"] * 4 and draining


class Stub(socketserver.TCPServer):
    allow_reuse_address = True


def test_a_weight_of_zero_sends_nothing(fleet):
    class Zero(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"ready 0%\n")
    stub = Stub(("127.0.0.1", 0), Zero)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        fleet.hosts[0].agent_port = stub.server_address[1]   # h0's agent now answers 0%
        fleet.switch("agent")
        time.sleep(1.5)                                        # the first agent checks
        assert served_by(fleet.url, 8) == ["h1"] * 8
    finally:
        stub.shutdown()
        stub.server_close()


def descendants(pid):
    """Every process whose ancestry reaches pid (from /proc)."""
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        todo += kids
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: {f.read().replace(bytes(1), b' ').decode(errors='replace')[:120]}"
    except OSError:
        return f"{pid}: gone"


def sigkill_leaves_nothing(cmd, ready_line, tmp_path):
    log = open(tmp_path / "out.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while ready_line not in (tmp_path / "out.txt").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-2000:]
            time.sleep(0.2)
        deadline = time.monotonic() + 30      # two instances (behind their exec wrapper) and HAProxy at least
        while len(kids := descendants(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(kids) >= 3, [cmdline(k) for k in kids]
    finally:
        proc.kill()                           # the test's point, and no leftover where it failed before
        proc.wait()
    deadline = time.monotonic() + 40         # death signals pass down a chain (wrapper, service); a loaded host is slow
    while time.monotonic() < deadline and [k for k in kids if alive(k)]:
        time.sleep(0.1)
    left = [k for k in kids if alive(k)]
    assert not left, f"children outlived the SIGKILLed parent: {[cmdline(k) for k in left]}"


def test_a_sigkilled_fleet_leaves_nothing_running(tmp_path):
    sigkill_leaves_nothing([sys.executable, "-m", "llm_psi.fleet", "--hosts", "2", "--no-isolate", "--", *SERVE],
                           "behind HAProxy", tmp_path)


@real_cgroups
def test_a_sigkilled_bench_leaves_nothing_running(tmp_path):
    try:
        sigkill_leaves_nothing([sys.executable, "-m", "bench.fleet", "--quick", "--results-dir", str(tmp_path / "r")],
                               "calibration:", tmp_path)
    finally:
        for i in range(2):
            cleanup(i, log=lambda m: None)


def test_the_bench_runs_every_balancer_through_haproxy_and_reports(tmp_path):
    """The whole pipeline without cgroups (no owners): cells complete, rows name their instance, the report
    rewrites the summary byte for byte."""
    import json
    import pandas as pd
    d = tmp_path / "r"
    r = subprocess.run([sys.executable, "-m", "bench.fleet", "--tiny", "--no-isolate", "--trials", "1",
                        "--balancers", "roundrobin,agent", "--duration-s", "6", "--phase-s", "3", "--drain-s", "5",
                        "--rest-s", "0", "--calibration-requests", "2", "--results-dir", str(d)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for b in ("roundrobin", "agent"):
        assert json.loads((d / "trials" / f"{b}_t1.json").read_text())["complete"]
        rows = pd.read_csv(d / "trials" / f"{b}_t1.csv")
        assert set(rows["instance"]) == {"h0", "h1"}
    first = (d / "summary.csv").read_bytes()
    s = pd.read_csv(d / "summary.csv")
    assert set(s["balancer"]) == {"roundrobin", "agent"} and list(s.columns)[:2] == ["balancer", "metric"]
    assert subprocess.run([sys.executable, "-m", "bench.fleet", "--report-only", "--results-dir", str(d)], cwd=ROOT,
                          capture_output=True, timeout=120).returncode == 0
    assert (d / "summary.csv").read_bytes() == first


@real_cgroups
def test_the_agent_answers_less_when_the_hosts_owner_arrives(tmp_path):
    """One host pinned to one CPU with its owner (a burner on the same CPU): the agent's weight falls when the
    owner resumes, with the service idle (the busy-CPU share sees it; PSI alone would not)."""
    from llm_psi.fleet.hosts import Host, agent_weight
    h = Host(0, "1", SERVE, owner_spec="cpu:1", log=lambda m: None, log_dir=str(tmp_path))
    try:
        h.start()
        h.wait_ready(120)

        def settled():
            time.sleep(2.5)                      # two intervals of the meter
            return agent_weight(ask_agent(h.agent_port))
        idle = settled()
        h.owner.resume()
        busy = settled()
        assert busy <= 5 and idle > busy, (idle, busy)
        assert "others_cpu" in (tmp_path / "h0.log").read_text()   # the change is logged, with its source
    finally:
        h.stop()
