"""The Service's request lifecycle, with a fake engine: admission, overload, counts, interruption."""
import threading
import time

import pytest

from llm_psi import control as pa
from helpers import FakeEngine
from llm_psi.engine.loop import Interrupted
from llm_psi.service.lifecycle import Service, ServiceConfig


def test_ok_request_timestamps_in_order_and_tokens_streamed():
    seen = []
    svc = Service(ServiceConfig(), FakeEngine())
    out = svc.submit("a b c", 4, on_token=lambda i, t: seen.append(i))
    assert out.status == "ok" and out.output_tokens == 4 and seen == [0, 1, 2, 3]
    assert out.t_arrive <= out.t_admit <= out.t_start <= out.t_first_token <= out.t_end
    assert svc.counts["ok"] == 1 and svc.counts["admitted"] == 1 and svc.running == 0


def test_gate_rejection_is_counted_and_never_generates():
    gate = pa.Gate(pa.Detector(lambda: 100.0, 95.0, "fake"), 0.001, 2, on_timeout="reject")
    svc = Service(ServiceConfig(admission="gate"), FakeEngine(), gate)
    out = svc.submit("a b", 3)
    assert out.status == "rejected" and out.decision == "rejected" and out.t_start is None
    assert out.prompt_tokens == 2 and svc.counts["rejected"] == 1 and svc.counts["deferred"] == 1


def test_max_waiting_refuses_only_when_it_would_wait():
    hold = threading.Event()
    svc = Service(ServiceConfig(admission="limit", max_waiting=0), FakeEngine(hold), pa.Limit(1))
    first = threading.Thread(target=svc.submit, args=("a", 3))
    first.start()
    deadline = time.monotonic() + 5
    while svc.running == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    refused = svc.submit("b", 3)  # the only slot is taken: it would wait, and 0 may wait
    assert refused.status == "rejected" and refused.decision == "overloaded"
    hold.set()
    first.join()
    assert svc.submit("c", 3).status == "ok"  # a free slot: admitted though max_waiting is 0
    assert svc.counts["overloaded"] == 1 and svc.counts["ok"] == 2


def test_interrupted_request_propagates_and_frees_the_slot():
    stop = threading.Event()
    stop.set()
    limit = pa.Limit(1)
    svc = Service(ServiceConfig(admission="limit"), FakeEngine(), limit)
    with pytest.raises(Interrupted):
        svc.submit("a", 3, stop=stop)
    assert svc.running == 0 and limit.state()["waiting"] == 0 and svc.submit("a", 2).status == "ok"


def test_closed_service_refuses():
    svc = Service(ServiceConfig(), FakeEngine())
    svc.close()
    out = svc.submit("a", 2)
    assert out.status == "rejected" and out.error == "draining"
