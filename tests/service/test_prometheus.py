"""The Prometheus export: each family once with conventional names (the collector on a fake probe), Prometheus'
own `promtool check metrics` on a live /metrics, and a real Prometheus scraping the service (deploy/)."""
import os
import re
import shutil
import subprocess
import threading
import time
import types

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from llm_psi.analysis.metrics import SERVER_SPANS as SPANS
from llm_psi.service.prometheus import Exporter
from helpers import free_port, promtool_problems

PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
READING = {"sys_cpu_some_avg10": 12.5, "sys_cpu_some_total_us": 3_000_000, "sys_cpu_some_pct": 4.0,
           "cg_cpu_some_avg10": 50.0, "cg_cpu_some_total_us": 1_500_000, "cg_cpu_some_pct": None,
           "nr_periods": 10, "nr_throttled": 4, "throttled_usec": 2_000_000, "usage_usec": 500_000}


class Probe:
    def read(self):
        return dict(READING)


def exposition(service=None) -> str:
    state = types.SimpleNamespace(service=service, probe=Probe())
    exp = Exporter(state, SPANS)
    exp.observe({"ttft_s": 0.2, "e2e_s": 1.5, "other_s": 3.0})
    body, media_type = exp.render()
    assert media_type.startswith("text/plain")
    return body.decode()


def test_each_family_is_declared_once_with_base_units():
    text = exposition()
    helps = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# HELP")]
    assert len(helps) == len(set(helps))
    assert not [n for n in helps if n.endswith("_us") or "_total_" in n]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("llm_psi_cpu_some_avg10_ratio", (("source", "system"),))] == pytest.approx(0.125)
    assert samples[("llm_psi_cpu_some_avg10_ratio", (("source", "cgroup"),))] == pytest.approx(0.5)
    assert samples[("llm_psi_cpu_some_stall_seconds_total", (("source", "system"),))] == pytest.approx(3.0)
    assert samples[("llm_cgroup_cpu_throttled_seconds_total", ())] == pytest.approx(2.0)
    assert samples[("llm_cgroup_cpu_throttled_periods_total", ())] == 4
    assert samples[("llm_requests_abandoned_total", ())] == 0
    assert samples[("llm_request_e2e_seconds_count", ())] == 1
    assert not [k for k in samples if k[0].startswith("llm_request_other")]


@pytest.mark.slow
@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_live_metrics(server):  # noqa: F811
    s = server("--admission", "limit", "--max-queue-delay-ms", 5000)
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    text = httpx.get(f"{s.url}/metrics").text
    assert "llm_overload_predicted_wait_seconds" in text and "llm_admission_limit" in text
    assert promtool_problems(PROMTOOL, text) == []   # vLLM's colon names (test_agent.py) aside


def doc_examples() -> list[str]:
    """The PromQL lines of docs/SERVICE.md's ```promql block."""
    text = open(os.path.join(ROOT, "docs", "SERVICE.md")).read()
    block = text.split("```promql\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_the_docs_promql_examples_name_exported_families():
    families = {ln.split()[2] for ln in exposition().splitlines() if ln.startswith("# HELP")}
    families |= {f"{f}_{x}" for f in families for x in ("bucket", "sum", "count")}
    names = {w for ln in doc_examples() for w in re.findall(r"\bllm_\w+", ln)}
    assert len(doc_examples()) >= 8 and names and names <= families, names - families


def _query(url: str, promql: str) -> list:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    if r.status_code == 503:   # Prometheus is still starting (its TSDB not ready): nothing to read yet
        return []
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    return r.json()["data"]["result"]


def _until(fn, timeout_s: float, what: str, proc):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited: {proc.stdout.read()}"
        try:
            result = fn()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout_s} s")


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus)")
def test_prometheus_scrapes_the_service_with_the_shipped_config(server, tmp_path):  # noqa: F811
    s = server()
    shipped = open(os.path.join(ROOT, "deploy", "prometheus.yml")).read()
    assert '"127.0.0.1:8000"' in shipped and "scrape_interval: 5s" in shipped
    config = tmp_path / "prometheus.yml"
    config.write_text(shipped.replace("127.0.0.1:8000", f"127.0.0.1:{s.port}").replace("5s", "1s"))
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address={url[7:]}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()

    def load():  # requests while Prometheus scrapes, so that the latency histograms move
        while not stop.is_set():
            httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
            stop.wait(0.2)
    sender = threading.Thread(target=load)
    sender.start()
    try:
        up = _until(lambda: [r for r in _query(url, 'up{job="llm-service"}') if r["value"][1] == "1"], 90,
                    "successful scrape", proc)
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{s.port}"
        psi = _until(lambda: _query(url, "llm_psi_cpu_some_avg10_ratio"), 30, "PSI gauge", proc)
        assert {r["metric"]["source"] for r in psi} >= {"system"}
        assert all(0 <= float(r["value"][1]) <= 1 for r in psi)
        rate = _until(lambda: [r for r in _query(url, "rate(llm_request_e2e_seconds_count[10s])")
                               if float(r["value"][1]) > 0], 60, "positive request rate", proc)
        assert rate[0]["metric"]["job"] == "llm-service"
        p99 = _query(url, "histogram_quantile(0.99, sum by (le) (rate(llm_request_e2e_seconds_bucket[10s])))")
        assert p99 and float(p99[0]["value"][1]) > 0
        for promql in doc_examples():  # the docs' examples are valid PromQL over families that exist
            _query(url, promql)
    finally:
        stop.set()
        sender.join()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_client_that_hangs_up_is_counted_as_abandoned(server):  # noqa: F811
    s = server("--admission", "limit")
    with httpx.stream("POST", f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 250, "stream": True},
                      timeout=60) as r:
        next(r.iter_lines())  # the first token; then hang up: the request stops at its next token
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "llm_requests_abandoned_total 1.0" not in httpx.get(f"{s.url}/metrics").text:
        time.sleep(0.1)
    text = httpx.get(f"{s.url}/metrics").text
    assert "llm_requests_abandoned_total 1.0" in text and "llm_requests_running 0.0" in text
