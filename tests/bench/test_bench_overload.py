"""The overload benchmark's harness: phases, the schedule, the interleaved run order, the per-phase summary with
its drain phase, the report rewritten byte for byte from the files, and a smoke run (tiny model, seconds, no
quota) that writes every output and refuses to overwrite them."""
import csv
import json
import os

import pytest

from bench import overload as bench
from bench import overload_report as report
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


def _row(phase, t_send, status, ttft=None, t_end=None):
    return {"setting": "s", "trial": 1, "phase": phase, "t_send_s": t_send, "status": status, "decision": "",
            "ttft_s": ttft, "e2e_s": None if t_end is None else t_end - t_send, "t_end_s": t_end, "error": ""}


ROWS = [_row(0, 1, "ok", 0.1, 2), _row(0, 5, "ok", 3.0, 12), _row(0, 6, "rejected"), _row(1, 11, "ok", 0.2, 13),
        _row(1, 12, "failed"), _row(1, 15, "ok", 9.0, 26.5)]


def test_summary_counts_every_completion_once_the_drain_included_and_ttft_of_the_admitted():
    s0, s1, drain = report.phase_rows(ROWS, [(1.0, 10.0), (2.0, 10.0)], capacity=0.5, slo_s=1.0)
    assert (s0["sent"], s0["ok"], s0["refused"], s0["failed"]) == (3, 2, 1, 0)
    assert s0["completed"] == 1 and s0["throughput_ratio"] == 0.2  # one completion in [0, 10)
    assert s1["completed"] == 2 and s1["good"] == 1  # the one sent at 5 s ends in phase 1, late: no goodput
    assert s0["p99_ttft_s"] == pytest.approx(2.971) and s1["failed"] == 1
    # the completion at 26.5 s falls after the schedule's 20 s: counted in the drain, which lasts until it
    assert (drain["phase"], drain["sent"], drain["completed"], drain["duration_s"]) == ("drain", 0, 1, 6.5)
    assert sum(r["completed"] for r in (s0, s1, drain)) == sum(r["status"] == "ok" for r in ROWS)


def test_trials_interleave_in_a_seeded_order():
    order = bench.run_order(["none", "max-waiting", "queue-delay"], 3, seed=0)
    assert [k for _, k in order] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(sorted(s for s, k in order if k == t) == sorted(bench.SETTINGS) for t in (1, 2, 3))
    assert order == bench.run_order(["none", "max-waiting", "queue-delay"], 3, seed=0)
    assert len({tuple(s for s, k in order if k == t) for t in (1, 2, 3)}) > 1  # not one order repeated


def _folder(tmp_path, complete=True):
    """A finished run's files without running it: plan, capacity rows, two trials of one setting."""
    out = tmp_path / "o"
    (out / "trials").mkdir(parents=True)
    phases = [[1.0, 10.0], [2.0, 10.0]]
    json.dump({"phases": phases, "settings": ["none"], "trials": 2, "seed": 0, "order": [["none", 1], ["none", 2]],
               "max_queue_delay_ms": 2000, "max_waiting": 2, "slo_ttft_s": 1.0}, open(out / "plan.json", "w"))
    with open(out / "capacity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, report.CAPACITY)
        w.writeheader()
        w.writerows([{"client": 0, "index": i, "t_send_s": 2.0 * i, "t_end_s": 2.0 * i + 2, "status": "ok",
                      "service_s": 1.5 + i / 10} for i in range(4)])
    for k in (1, 2):
        with open(out / "trials" / f"none_t{k}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, report.REQUESTS)
            w.writeheader()
            w.writerows({**r, "trial": k, "ttft_s": r["ttft_s"] and r["ttft_s"] * k} for r in ROWS)
        json.dump({"complete": complete or k == 1}, open(out / "trials" / f"none_t{k}.json", "w"))
    return out


def test_capacity_and_service_time_come_from_the_committed_rows(tmp_path):
    capacity, service = report.capacity_of(str(_folder(tmp_path) / "capacity.csv"))
    assert capacity == pytest.approx(4 / 8) and service == pytest.approx(1.65)


@pytest.mark.slow
def test_report_only_rewrites_the_summary_byte_for_byte(tmp_path):
    out = _folder(tmp_path)
    r = run_script("bench.overload", "--report-only", "--out", out)
    assert r.returncode == 0, r.stderr
    first = {f: (out / f).read_bytes() for f in ("summary.csv", "summary.md", "trials.csv")}
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(x["phase"], x["n_trials"], x["completed"]) for x in rows] == [("0", "2", "2"), ("1", "2", "4"),
                                                                         ("drain", "2", "2")]
    assert float(rows[0]["goodput_lo"]) <= float(rows[0]["goodput_ratio"]) <= float(rows[0]["goodput_hi"])
    assert run_script("bench.overload", "--report-only", "--out", out).returncode == 0
    assert {f: (out / f).read_bytes() for f in first} == first


def test_report_only_refuses_an_incomplete_trial(tmp_path):
    r = run_script("bench.overload", "--report-only", "--out", _folder(tmp_path, complete=False))
    assert r.returncode == 2 and "not complete" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
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
    args = ["--quick", "--trials", "1", "--phases", "0.7:2,1.5:2", "--settings", "none,queue-delay", "--out", out]
    r = run_script("bench.overload", *args, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(["plan.json", "capacity.csv", "capacity.json", "trials", "trials.csv",
                                              "summary.csv", "summary.md", "overload.png"])
    cells = [json.load(open(out / "trials" / f"{s}_t1.json")) for s in ("none", "queue-delay")]
    assert all(c["complete"] and c["counts"]["answered"] == c["counts"]["sent"] and
               "git_commit" in c["environment"] and "git_dirty" in c["environment"] for c in cells)
    assert json.load(open(out / "capacity.json"))["complete"]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(x["setting"], x["phase"]) for x in rows] == [(s, p) for s in ("none", "queue-delay")
                                                         for p in ("0", "1", "drain")]
    for k in (1,):  # every answered request is counted in exactly one phase, the drain included
        trial = [x for x in csv.DictReader(open(out / "trials.csv")) if x["trial"] == str(k)]
        ok = sum(x["status"] == "ok" for x in csv.DictReader(open(out / "trials" / f"none_t{k}.csv")))
        assert sum(int(x["completed"]) for x in trial if x["setting"] == "none") == ok
    assert "sent" in r.stderr and "| setting |" in r.stdout  # progress lines, then the table
    again = run_script("bench.overload", *args)
    assert again.returncode == 2 and "--force" in again.stderr
