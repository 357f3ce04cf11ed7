"""The service's headroom for balancers: the agent's law and line, the ORCA report, the vLLM-named gauges; a
live service's agent port (one line in HAProxy's syntax; drain after SIGTERM while a request finishes), its
ORCA header, and promtool on its /metrics with the vLLM gauges."""
import math
import re
import shutil
import signal
import socket
import subprocess
import threading
import types

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port, promtool_problems
from llm_psi.service import agent, headroom
from llm_psi.service.overload import DelayShedder
from llm_psi.service.prometheus import Exporter

LINE = re.compile(r"^(ready \d{1,3}%( maxconn:\d+)?|drain)$")
PROMTOOL = shutil.which("promtool")


class Sharing:
    def __init__(self, others_pct):
        self.others_pct = others_pct

    def state(self):
        return {"share_quota_cores": 1.0, "share_others_pct": self.others_pct}


class Probe:
    def __init__(self, avg10=None, own=True):
        self.avg10, self.cgroup = avg10, types.SimpleNamespace(own=own)

    def read(self):
        return {"cg_cpu_some_avg10": self.avg10}


def app_state(sharing=None, avg10=None, shed=None, limit=2, max_waiting=None, running=1, draining=False,
              others_cpu=None):
    adm = types.SimpleNamespace(state=lambda: {"limit": limit}) if limit else None
    cfg = types.SimpleNamespace(batching="off", max_batch=8, max_waiting=max_waiting, model=None)
    svc = types.SimpleNamespace(sharing=sharing, overload=shed, admission=adm, cfg=cfg, running=running, waiting=0, counts={})
    return types.SimpleNamespace(service=svc, probe=Probe(avg10), draining=draining,
                                 host_cpu=types.SimpleNamespace(share=others_cpu))


def test_the_law():
    assert headroom.weight_pct(0, 0) == 100
    assert headroom.weight_pct(0.5, 0) == 50
    assert headroom.weight_pct(0.5, 0.5) == 25
    assert headroom.weight_pct(1.0, 0) == 0 and headroom.weight_pct(0, 2.0) == 0
    assert headroom.weight_pct(0.12, 0) == 90          # steps of 5%
    assert headroom.weight_pct(math.nan, None) == 100  # nothing known: full weight


def test_the_line_follows_the_sharing_controller_before_the_probe():
    st = app_state(sharing=Sharing(40.0), avg10=90.0, max_waiting=3)
    h = headroom.read(st)
    assert (h["line"], h["source"]) == ("ready 60% maxconn:5", "share_others")
    st.service.sharing = None
    assert headroom.read(st)["line"] == "ready 10% maxconn:5"
    st.probe = Probe(90.0, own=False)    # a cgroup shared with other work (a login session's) says nothing
    assert headroom.read(st)["line"] == "ready 100% maxconn:5"
    st.probe = Probe(None)
    assert headroom.read(st)["line"] == "ready 100% maxconn:5"
    st.service.admission = None
    assert headroom.read(st)["line"] == "ready 100%"   # nothing bounds the requests: no maxconn


def test_an_owner_busy_on_the_services_cpus_lowers_the_weight_while_the_service_idles():
    st = app_state(avg10=0.0, others_cpu=0.7)
    assert (headroom.read(st)["line"], headroom.read(st)["source"]) == ("ready 30% maxconn:2", "others_cpu")
    st.probe = Probe(90.0)                          # the larger reading wins
    assert headroom.read(st)["weight_pct"] == 10
    st.host_cpu.share = 1.0                         # every CPU taken: 1%, never 0 (0 would empty the balancer)
    assert headroom.read(st)["line"] == "ready 1% maxconn:2"
    st.service.sharing = Sharing(0.0)               # the sharing controller's reading comes first
    assert headroom.read(st)["weight_pct"] == 100


def test_others_cpu_counts_busy_time_on_the_services_cpus_minus_its_own(tmp_path):
    from llm_psi.control import hostcpu
    stat, t, own = tmp_path / "stat", [0.0], [0.0]
    hz = round(1 / hostcpu.TICK_S)

    def write(busy0, busy1):   # user nice system idle iowait irq softirq steal, in ticks
        stat.write_text(f"cpu  0 0 0 0 0 0 0 0\ncpu0 {busy0} 0 0 999 5 0 0 0\ncpu1 {busy1} 0 0 999 0 0 0 0\n")
    write(0, 0)
    m = hostcpu.OthersCpu(stat=str(stat), cpus={0}, clock=lambda: t[0], own=lambda: own[0])
    t[0], own[0] = 2.0, 0.5
    write(2 * hz, 2 * hz)                           # CPU 0 busy for 2 s, 0.5 s of it ours; CPU 1 not ours
    assert m.sample() == pytest.approx(0.75)
    assert m.sample() == pytest.approx(0.75)        # no time passed: the last value


def test_the_weight_falls_as_the_queueing_delay_nears_the_shedding_limit():
    clock = [0.0]
    shed = DelayShedder(1.0, clock=lambda: clock[0])
    st = app_state(shed=shed)
    assert headroom.read(st)["weight_pct"] == 100
    shed.gap_s, shed.queued = 0.25, 2          # predicted wait 0.5 s of a 1 s limit
    assert headroom.read(st)["weight_pct"] == 50
    shed.queued = 5
    assert headroom.read(st)["line"] == "ready 0% maxconn:2"


def test_the_agent_logs_each_change_once(caplog):
    st = app_state(avg10=0.0)
    a = agent.Agent(st)
    with caplog.at_level("INFO", logger="agent"):
        lines = [a.answer(), a.answer()]
        st.probe = Probe(50.0)
        lines.append(a.answer())
        st.draining = True
        lines.append(a.answer())
    assert lines == ["ready 100% maxconn:2", "ready 100% maxconn:2", "ready 50% maxconn:2", "drain"]
    changes = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert len(changes) == 3 and "ready 100% maxconn:2 -> ready 50% maxconn:2" in changes[1]


def test_the_agent_answers_one_line_on_a_socket():
    srv = agent.start(app_state(avg10=20.0), "127.0.0.1", 0)
    try:
        assert ask(srv.server_address[1]) == "ready 80% maxconn:2"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("fmt", ["TEXT", "JSON", "text"])
def test_the_orca_report_parses(fmt):
    h = headroom.read(app_state(avg10=30.0, running=1))
    value = headroom.orca_header(fmt, h)
    assert value.startswith(fmt.upper() + " ")
    report = headroom.parse_orca(value)
    assert report["cpu_utilization"] == pytest.approx(0.3)
    assert report["application_utilization"] == pytest.approx(0.3)    # weight 70%
    assert report["named_metrics"]["kv_cache_usage_perc"] == pytest.approx(0.5)
    assert headroom.orca_header("BIN", h) is None


def test_the_gateway_gauges_have_vllms_names():
    st = app_state(avg10=0.0, running=1, limit=4)
    text = Exporter(st, []).render()[0].decode()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["vllm:num_requests_running"].value == 1
    assert samples["vllm:num_requests_running"].labels == {"model_name": "gpt2"}
    assert samples["vllm:kv_cache_usage_perc"].value == pytest.approx(0.25)
    assert samples["llm_agent_weight_ratio"].value == 1.0
    assert "batch slot" in text


def ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\n")
        data = b""
        while chunk := s.recv(256):
            data += chunk
    text = data.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text.strip()


@pytest.mark.slow
def test_a_live_agent_drains_after_sigterm_while_a_request_finishes(server):  # noqa: F811
    port = free_port()
    s = server("--agent-port", port, "--admission", "limit", "--instance-name", "host-a", "--drain-timeout-s", 60)
    assert LINE.match(ask(port)) and ask(port).startswith("ready ")
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   headers={"endpoint-load-metrics-format": "TEXT"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-llm-psi-instance"] == "host-a"
    report = headroom.parse_orca(r.headers["endpoint-load-metrics"])
    assert 0 <= report["application_utilization"] <= 1 and "num_requests_waiting" in report["named_metrics"]
    done = {}

    def long_request():
        done["r"] = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 250}, timeout=120)
    t = threading.Thread(target=long_request)
    t.start()
    while "vllm:num_requests_running{model_name=\"gpt2\"} 1.0" not in httpx.get(f"{s.url}/metrics").text:
        assert t.is_alive()
    s.proc.send_signal(signal.SIGTERM)
    answers = []
    while t.is_alive():
        try:
            answers.append(ask(port))
        except OSError:
            break
    t.join()
    # an answer or two may come before the process has run its signal handler; from the first drain on, only drain
    assert done["r"].status_code == 200 and "drain" in answers
    assert set(answers[answers.index("drain"):]) == {"drain"}, answers
    assert s.proc.wait(timeout=60) == 0
    assert "agent: ready" in s.proc.stdout.read()   # each change logged


@pytest.mark.slow
@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_vllm_gauges(server):  # noqa: F811
    s = server("--admission", "limit")
    text = httpx.get(f"{s.url}/metrics").text
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= \
        {ln.split()[2] for ln in text.splitlines() if ln.startswith("# HELP")}
    assert promtool_problems(PROMTOOL, text) == []
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = (check.stdout + check.stderr).strip().splitlines()   # only vLLM's naming, a lint finding (exit 3)
    assert check.returncode == 3 and len(problems) == 3, problems
    ours = "\n".join(ln for ln in text.splitlines() if "vllm:" not in ln) + "\n"
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=ours, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_a_taken_agent_port_is_one_line_and_exit_2():
    import os
    import sys
    from conftest import ROOT
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "llm_server.py"), "serve", "--tiny", "--port",
                            str(free_port()), "--agent-port", str(taken.getsockname()[1])], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2 and "cannot answer HAProxy's agent check" in r.stderr.strip().splitlines()[-1]
