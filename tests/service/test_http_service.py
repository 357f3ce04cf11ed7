"""The resident service over HTTP: llm_server.py serve, its routes, overload, drain, and the generator as client."""
import json
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import read_cell, run_script


@pytest.mark.slow
def test_completion_stream_health_and_metrics(server):
    s = server()
    assert s.health_seen[-1] == 200 and set(s.health_seen[:-1]) <= {503}   # 503 while the model loads, then 200
    r = httpx.post(f"{s.url}/v1/completions", json={"model": "gpt2", "prompt": "Hello", "max_tokens": 5}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    t = body["timings"]
    assert 0 <= t["admit_s"] <= t["start_s"] <= t["first_token_s"] <= t["end_s"]
    assert t["service_s"] == pytest.approx(t["end_s"] - t["start_s"])
    with httpx.stream("POST", f"{s.url}/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 4, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert len(chunks) == 5 and chunks[-1]["usage"]["completion_tokens"] == 4
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{s.url}/metrics").text)}
    assert families["llm_request_e2e_seconds"].type == "histogram"
    assert "llm_requests_running" in families and "llm_requests_waiting" in families
    assert [x.value for x in families["llm_requests_admitted"].samples if x.name.endswith("_total")] == [2.0]


@pytest.mark.parametrize("body, message", [
    ({"prompt": "", "max_tokens": 3}, "prompt must be a non-empty string"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"prompt": "Hi", "temperature": 1.3}, "samples at temperature 0.7"),
    ({"prompt": "Hi", "seed": -1}, "seed must be an integer >= 0"),
])
@pytest.mark.slow
def test_bad_requests_get_400(shared_server, body, message):
    r = httpx.post(f"{shared_server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


@pytest.mark.slow
def test_overload_is_503_with_retry_after_and_sigterm_drains(server, fake_quota):
    s = server("--config", "limit1", "--max-waiting", 0, env=fake_quota)
    results = []

    def post():
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 60}, timeout=120)
        results.append(r)
    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if r.status_code == 503]
    assert refused and all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert refused[0].json()["error"]["admission"] == "overloaded"
    assert any(r.status_code == 200 for r in results)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=10) == 0


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(server):
    s = server()
    box = {}
    t = threading.Thread(target=lambda: box.update(r=httpx.post(
        f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 200}, timeout=120)))
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "llm_requests_running 1.0" not in httpx.get(f"{s.url}/metrics").text:
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert box["r"].status_code == 200 and box["r"].json()["usage"]["completion_tokens"] == 200
    assert s.proc.wait(timeout=10) == 0


@pytest.mark.slow
def test_disconnected_client_frees_its_slot(server, fake_quota):
    s = server("--config", "limit1", env=fake_quota)
    with httpx.stream("POST", f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 250, "stream": True},
                      timeout=60) as r:
        next(r.iter_lines())  # the first token: the request holds the only slot; then hang up
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    text = httpx.get(f"{s.url}/metrics").text
    assert "llm_requests_running 0.0" in text
    # the abandoned request never finished: had it kept its slot, the second (which waited for the only slot)
    # would have found it admitted and done; only the second one counts
    admitted = {f.name: f for f in text_string_to_metric_families(text)}["llm_requests_admitted"]
    assert [x.value for x in admitted.samples if x.name.endswith("_total")] == [1.0]
    s.stop()
    log = s.proc.stdout.read()
    assert "client disconnected after" in log and "Traceback" not in log and "ERROR" not in log


@pytest.mark.slow
def test_generator_as_client_writes_rows(shared_server, tmp_path):
    s = shared_server
    out = tmp_path / "cell.csv"
    proc = run_script("request_generator.py", "--target", s.url, "--concurrency", 2, "--num-requests", 3,
                      "--max-new-tokens", 5, "--quiet", "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df, meta = read_cell(out)
    assert (df.status == "ok").sum() == 3 and (df.output_tokens == 5).all()
    assert df.srv_start_s.notna().all() and (df.t_first_token_s >= df.t_submit_s).all()
    assert meta["mode"] == "service" and meta["service"]["config"]["config"] == "baseline"
    # a client only: it never imported torch (its thread counts are None), yet the versions are recorded
    env = meta["environment"]
    assert env["torch_threads"] is None and env["torch_interop_threads"] is None
    assert env["versions"]["torch"].startswith("2.") and env["versions"]["transformers"]


@pytest.mark.slow
def test_generator_refuses_a_service_of_another_config(shared_server, tmp_path):
    s = shared_server
    proc = run_script("request_generator.py", "--target", s.url, "--config", "psi", "--num-requests", 1,
                      "--quiet", "--output", tmp_path / "c.csv")
    assert proc.returncode == 2 and "serves config 'baseline', not 'psi'" in proc.stderr
    assert not (tmp_path / "c.csv").exists()


def test_serve_bad_input_exit_2():
    for args, message in ((["--port", "70000"], "--port"), (["--config", "nope"], "unknown config"),
                          (["--config", "cgroups"], "no CPU quota")):
        proc = run_script("llm_server.py", "serve", "--tiny", *args, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_health_writes_a_reading_not_yet_made_as_null():
    """A controller's reading that is not yet made (NaN, e.g. --sharing share before its first second) is null
    in /health's JSON, not a 500 (JSON has no NaN)."""
    import asyncio
    from types import SimpleNamespace
    from llm_psi.service.http_app import Api
    st = SimpleNamespace(load_error=None, draining=False, about={"model": "gpt2"},
                         service=SimpleNamespace(state=lambda: {"share_others_pct": float("nan"), "running": 0}),
                         probe=SimpleNamespace(read=lambda: {"cpu_some_avg10": 1.5}))
    r = asyncio.run(Api.health(SimpleNamespace(app=SimpleNamespace(state=st)), None))
    body = json.loads(r.body)
    assert r.status_code == 200 and body["state"] == {"share_others_pct": None, "running": 0, "cpu_some_avg10": 1.5}
