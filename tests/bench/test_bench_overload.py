"""The overload benchmark's harness: phases, the schedule, the per-phase summary, and a smoke run (tiny model,
seconds, no quota) that writes every output and refuses to overwrite them."""
import csv
import os

import pytest

from bench import overload as bench
from conftest import run_script


def test_phases_parse_and_refuse_bad_input():
    assert bench.parse_phases("0.7:60,1.5:30") == [(0.7, 60.0), (1.5, 30.0)]
    for bad in ("0.7", "x:1", "0:5", "1:-2"):
        with pytest.raises(ValueError):
            bench.parse_phases(bad)


def test_schedule_follows_the_phases():
    sched = bench.build_schedule([(1.0, 100.0), (3.0, 100.0)], 2.0, seed=1)
    first = [t for t, k in sched if k == 0]
    second = [t for t, k in sched if k == 1]
    assert all(0 <= t < 100 for t in first) and all(100 <= t < 200 for t in second)
    assert 150 < len(first) < 250 and 500 < len(second) < 700  # Poisson at 2 and 6 req/s
    assert sched == bench.build_schedule([(1.0, 100.0), (3.0, 100.0)], 2.0, seed=1)


def test_summary_counts_completions_in_their_phase_and_ttft_of_the_admitted():
    def row(phase, t_send, status, ttft=None, t_end=None):
        return {"setting": "s", "phase": phase, "t_send_s": t_send, "status": status, "ttft_s": ttft,
                "t_end_s": t_end}
    rows = [row(0, 1, "ok", 0.1, 2), row(0, 5, "ok", 3.0, 12), row(0, 6, "rejected"), row(1, 11, "ok", 0.2, 13),
            row(1, 12, "failed")]
    s0, s1 = bench.summarize(rows, [(1.0, 10.0), (2.0, 10.0)], capacity=0.5, service_s=1.0, slo_s=1.0, knobs={})
    assert (s0["sent"], s0["ok"], s0["refused"], s0["failed"]) == (3, 2, 1, 0)
    assert s0["throughput_rps"] == 0.1 and s0["throughput_ratio"] == 0.2  # one completion in [0, 10)
    assert s1["throughput_rps"] == 0.2 and s1["goodput_rps"] == 0.1  # the one sent at 5 s is late: no goodput
    assert s0["p99_ttft_s"] == pytest.approx(2.971) and s1["failed"] == 1


def test_bad_input_exits_2_and_the_quota_needs_root():
    r = run_script("bench.overload", "--phases", "1.5", "--no-quota")
    assert r.returncode == 2 and "MULTIPLE:SECONDS" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_script("bench.overload", "--settings", "fast", "--no-quota")
    assert r.returncode == 2 and "unknown setting" in r.stderr
    if os.geteuid() != 0:
        r = run_script("bench.overload", "--tiny")
        assert r.returncode == 2 and "--no-quota" in r.stderr


@pytest.mark.slow
def test_smoke_run_writes_every_output_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "overload"
    args = ["--tiny", "--no-quota", "--capacity-s", "2", "--phases", "0.7:2,1.5:2", "--max-new-tokens", "4",
            "--settings", "none,queue-delay", "--out", out, "--progress-s", "1"]
    r = run_script("bench.overload", *args, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(["summary.csv", "requests.csv", "summary.md", "overload.png",
                                              "server_capacity.log", "server_none.log", "server_queue-delay.log"])
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(x["setting"], x["phase"]) for x in rows] == [("none", "0"), ("none", "1"), ("queue-delay", "0"),
                                                         ("queue-delay", "1")]
    assert all(float(x["capacity_rps"]) > 0 and int(x["sent"]) == int(x["ok"]) + int(x["refused"]) + int(x["failed"])
               for x in rows)
    assert "sent" in r.stderr and "| setting |" in r.stdout  # progress lines, then the table
    again = run_script("bench.overload", *args)
    assert again.returncode == 2 and "--force" in again.stderr
