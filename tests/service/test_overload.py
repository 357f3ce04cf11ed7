"""Overload by queueing delay (--max-queue-delay-ms): the control law on a fake clock, the Service's refusals
(predicted and observed) with a fake engine, the abandoned counter, and the option."""
import logging
import threading
import time

import httpx
import pytest

from conftest import run_script
from llm_psi import control as pa
from llm_psi.engine.loop import Interrupted
from llm_psi.service.lifecycle import Service, ServiceConfig
from llm_psi.service.overload import DelayShedder
from helpers import FakeEngine


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def serve_one(shed, clock, service_s):
    """One request through the shedder: it arrives, starts at once and leaves after service_s."""
    assert shed.arrive() is None
    shed.started()
    clock.t += service_s
    shed.leave(started=True)


def test_nothing_is_predicted_before_a_departure_after_the_warm_up():
    clock = Clock()
    shed = DelayShedder(0.5, clock=clock)
    serve_one(shed, clock, 30.0)  # the cold first request: no sample
    for _ in range(10):
        assert shed.arrive() is None
    assert shed.gap_s is None and shed.predicted_wait() == 0.0 and shed.queued == 10


def test_predicted_wait_is_the_queue_times_the_gap_between_departures():
    clock = Clock()
    shed = DelayShedder(2.5, clock=clock, alpha=1.0)
    serve_one(shed, clock, 30.0)
    serve_one(shed, clock, 1.0)
    assert shed.gap_s == pytest.approx(1.0)
    for _ in range(3):  # 0, 1 and 2 queued ahead: waits 0, 1 and 2 s, all within 2.5 s
        assert shed.arrive() is None
    assert shed.predicted_wait() == pytest.approx(3.0)
    retry = shed.arrive()  # 3 s > 2.5 s: refused; the queue needs 0.5 s to shrink to 2.5 s
    assert retry == pytest.approx(0.5) and shed.queued == 3 and shed.refused == 1


def test_idle_time_is_not_counted_between_departures():
    clock = Clock()
    shed = DelayShedder(1.0, clock=clock, alpha=1.0)
    serve_one(shed, clock, 30.0)
    serve_one(shed, clock, 0.2)
    clock.t += 100.0  # idle
    serve_one(shed, clock, 0.3)
    assert shed.gap_s == pytest.approx(0.3)


def test_the_gap_is_an_ewma():
    clock = Clock()
    shed = DelayShedder(1.0, clock=clock, alpha=0.5)
    serve_one(shed, clock, 30.0)
    serve_one(shed, clock, 1.0)
    serve_one(shed, clock, 3.0)
    assert shed.gap_s == pytest.approx(2.0)


def test_one_log_line_per_state_change(caplog):
    clock = Clock()
    shed = DelayShedder(0.5, clock=clock, alpha=1.0)
    serve_one(shed, clock, 30.0)
    serve_one(shed, clock, 1.0)
    with caplog.at_level(logging.INFO, logger="overload"):
        assert shed.arrive() is None  # wait 0
        assert [shed.arrive() for _ in range(5)] == [pytest.approx(0.5)] * 5  # wait 1 s each: refused
        shed.started()
        clock.t += 0.5
        shed.leave(started=True)  # nothing queued, but a refusal 0.5 s ago: still shedding
        assert shed.arrive() is None and shed.shedding
        shed.leave(started=False)
        clock.t += 1.0
        assert shed.arrive() is None and not shed.shedding
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("shedding") and lines[1].startswith("admitting")
    assert "5 refused while shedding" in lines[1]


def test_bad_limit_is_refused():
    with pytest.raises(ValueError):
        DelayShedder(0)


def test_limit_gives_up_at_its_timeout_and_keeps_its_queue_in_order():
    lim = pa.Limit(1)
    lim.admit()
    assert lim.admit(timeout=0.01).decision == "expired"
    assert lim.state()["waiting"] == 0
    lim.release()
    assert lim.admit(timeout=0.01).decision == "admitted"


def test_service_refuses_a_predicted_wait_with_its_retry_after():
    clock = Clock()
    svc = Service(ServiceConfig(max_queue_delay_ms=500), FakeEngine())
    svc.overload = DelayShedder(0.5, clock=clock, alpha=1.0)
    serve_one(svc.overload, clock, 30.0)
    serve_one(svc.overload, clock, 1.0)
    svc.overload.arrive()  # one queued ahead (1 s): a request arriving now would wait 1 s
    out = svc.submit("a b", 3)
    assert out.status == "rejected" and out.decision == "overloaded" and out.t_start is None
    assert out.retry_after_s == pytest.approx(0.5) and "predicted wait 1000 ms" in out.error
    assert svc.counts["overloaded"] == 1 and svc.overload.queued == 1


def test_service_refuses_a_request_that_waited_past_the_limit():
    hold = threading.Event()
    svc = Service(ServiceConfig(admission="limit", max_queue_delay_ms=20), FakeEngine(hold), pa.Limit(1))
    first = threading.Thread(target=svc.submit, args=("a", 2))
    first.start()
    deadline = time.monotonic() + 5
    while svc.running == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    out = svc.submit("b", 2)  # the slot is held: this one waits, and is refused once it has waited 20 ms
    hold.set()
    first.join()
    assert out.status == "rejected" and out.decision == "overloaded" and "for admission" in out.error
    assert out.retry_after_s is not None and out.retry_after_s >= 0
    assert svc.counts["overloaded"] == 1 and svc.counts["ok"] == 1
    assert svc.overload.queued == 0 and svc.overload.in_system == 0 and svc.waiting == 0


def test_service_with_the_limit_serves_and_measures_departures():
    svc = Service(ServiceConfig(max_queue_delay_ms=1000), FakeEngine())
    for _ in range(3):  # the first is the warm-up: the next two are samples
        assert svc.submit("a b", 2).status == "ok"
    assert svc.overload.gap_s is not None and svc.overload.queued == 0 and svc.overload.in_system == 0
    assert set(svc.state()) >= {"queue_delay_predicted_s", "queue_delay_shedding"}


def test_abandoned_requests_are_counted_and_leave_the_queue():
    stop = threading.Event()
    stop.set()
    svc = Service(ServiceConfig(max_queue_delay_ms=1000), FakeEngine())
    with pytest.raises(Interrupted):
        svc.submit("a", 3, stop=stop)
    assert svc.counts["abandoned"] == 1 and svc.overload.queued == 0 and svc.overload.in_system == 0


def test_serve_help_states_the_control_law_and_bad_values_exit_2():
    r = run_script("llm_server.py", "serve", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "--max-queue-delay-ms" in text and "Retry-After = wait - T" in text
    r = run_script("llm_server.py", "serve", "--max-queue-delay-ms", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_http_refusal_is_503_with_retry_after_and_the_service_goes_on(server):  # noqa: F811
    s = server("--admission", "limit", "--max-queue-delay-ms", 50)
    results = []

    def post():
        results.append(httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 200},
                                  timeout=120))
    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if r.status_code == 503]
    assert refused and any(r.status_code == 200 for r in results)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    err = refused[0].json()["error"]
    assert err["admission"] == "overloaded" and "max_queue_delay_ms 50" in err["message"]
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert f"llm_requests_overloaded_total {float(len(refused))}" in httpx.get(f"{s.url}/metrics").text
