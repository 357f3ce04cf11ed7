"""--deadline-s: a trial ends at its deadline as a complete measurement, the requests in flight recorded as 'cut'."""
import threading

import pytest

from conftest import read_cell
from llm_psi.analysis import metrics
from llm_psi.config import RunConfig
from llm_psi.load.trial import Trial
from llm_psi.service.lifecycle import Interrupted, Outcome


class Client:
    """Answers its first ``quick`` requests at once; the others run until their stop event is set."""

    def __init__(self, quick):
        self.quick, self.sent, self.lock = quick, 0, threading.Lock()

    def send(self, prompt, max_tokens, seed, stop):
        import time
        with self.lock:
            self.sent += 1
            n = self.sent
        t = time.monotonic()
        if n <= self.quick:
            return Outcome(status="ok", output_tokens=max_tokens, t_admit=t, t_start=t, t_first_token=t, t_end=t), None
        assert stop.wait(10), "the deadline never stopped the request"
        raise Interrupted("stopped")

    def state(self):
        return {}


class Sink(list):
    def write(self, row):
        self.append(row)


class Bar:
    def update(self, n):
        pass


def run(cfg, times, quick):
    import time
    sink, client = Sink(), Client(quick)
    t = Trial(cfg, client, ["a prompt"], sink, 1, threading.Event(), Bar(), times)
    t.t0 = time.monotonic()
    t.run()
    return t, sink, client


def test_closed_loop_deadline_cuts_the_requests_in_flight_and_sends_no_more():
    cfg = RunConfig(concurrency=2, num_requests=10, spacing_ms=0, deadline_s=0.3)
    t, rows, client = run(cfg, [0.0] * 10, quick=3)
    status = sorted(r["status"] for r in rows)
    assert status == ["cut", "cut", "ok", "ok", "ok"] and client.sent == 5
    assert t.cut and t.counts == {"ok": 3, "rejected": 0, "failed": 0, "cut": 2}
    cut = [r for r in rows if r["status"] == "cut"]
    assert all(r["t_end_s"] == pytest.approx(0.3) and r["output_tokens"] == 0 for r in cut)


def test_a_deep_closed_loop_hands_the_pool_no_more_than_its_workers(monkeypatch):
    """A saturating plan (100000 requests cut by a deadline) is queued a request per free worker, not all at
    once; each row's t_submit is still the plan's time (0 here), its wait for a worker in t_dequeue."""
    import concurrent.futures as cf
    submitted, submit = [], cf.ThreadPoolExecutor.submit

    def counting(self, fn, *args, **kwargs):
        submitted.append(args[0])
        return submit(self, fn, *args, **kwargs)
    monkeypatch.setattr(cf.ThreadPoolExecutor, "submit", counting)
    import time

    class Slow(Client):                                   # each answered request takes 20 ms
        def send(self, *args):
            time.sleep(0.02)
            return super().send(*args)
    cfg = RunConfig(concurrency=2, num_requests=100000, spacing_ms=0, deadline_s=0.3)
    sink, client = Sink(), Slow(7)
    t = Trial(cfg, client, ["a prompt"], sink, 1, threading.Event(), Bar(), [0.0] * 100000)
    t.t0 = time.monotonic()
    t.run()
    assert client.sent == 9 and len(submitted) <= 9 + 2                  # 7 answered, 2 cut, at most 2 more queued
    assert sorted(r["status"] for r in sink) == ["cut"] * 2 + ["ok"] * 7
    assert max(r["t_submit_s"] for r in sink) < 0.01 and max(r["t_dequeue_s"] for r in sink) > 0.05


def test_open_loop_sends_nothing_at_or_after_the_deadline():
    cfg = RunConfig(arrival="constant", rate=10, duration=2, deadline_s=0.35)
    t, rows, client = run(cfg, [i / 10 for i in range(20)], quick=100)
    assert [r["request_id"] for r in rows] == [0, 1, 2, 3] and all(r["status"] == "ok" for r in rows)
    assert t.cut and client.sent == 4


def test_without_a_deadline_every_request_finishes():
    t, rows, _ = run(RunConfig(concurrency=2, num_requests=4, spacing_ms=0), [0.0] * 4, quick=4)
    assert len(rows) == 4 and not t.cut


def test_cut_rows_count_in_the_span_so_throughput_is_ok_over_the_deadline():
    import pandas as pd
    df = pd.DataFrame([dict(trial=1, status="ok", t_submit_s=0.0, t_dequeue_s=0.0, t_admit_s=0.0, t_start_s=0.0,
                            t_first_token_s=1.0, t_end_s=2.0, output_tokens=5),
                       dict(trial=1, status="cut", t_submit_s=0.0, t_dequeue_s=0.0, t_end_s=10.0, output_tokens=0)])
    s = metrics.summarize(df)
    assert s["n_ok"] == 1 and s["n_cut"] == 1 and s["throughput_rps"] == pytest.approx(0.1)


@pytest.mark.slow
def test_generator_deadline_ends_a_complete_cell(generate):
    _, out = generate("--concurrency", 2, "--num-requests", 500, "--max-new-tokens", 40, "--spacing-ms", 0,
                      "--deadline-s", 1.5)
    df, meta = read_cell(out)
    assert meta["complete"] is True and meta["trials"][0]["deadline_hit"] is True
    assert meta["config"]["deadline_s"] == 1.5 and len(df) < 500
    assert (df.status == "cut").sum() == 2 and (df.loc[df.status == "cut", "t_end_s"] == 1.5).all()
    assert (df.loc[df.status == "ok", "output_tokens"] == 40).all()
