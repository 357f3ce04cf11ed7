"""bench/sharing.py: the interleaved plan, the refusals, and (as root, where cgroups work) a smoke run whose
summary has the promised columns, phases and metrics."""
import os

import pandas as pd
import pytest

from bench import sharing
from bench.sharing_report import COLUMNS, METRICS
from conftest import real_cgroups, run_script


def test_plan_interleaves_every_configuration_and_switches():
    configs = ["a", "b", "c"]
    for seed in range(20):
        runs = sharing.plan(configs, 3, seed)
        assert sorted(runs) == sorted((k, c) for k in (1, 2, 3) for c in configs)
        assert [k for k, _ in runs] == [1, 1, 1, 2, 2, 2, 3, 3, 3]           # round k before round k+1
        assert all(a[1] != b[1] for a, b in zip(runs, runs[1:]))            # never the same one twice in a row
    assert sharing.plan(configs, 3, 1) == sharing.plan(configs, 3, 1)


def test_quick_shortens_but_explicit_options_win():
    a = sharing.parse_args(["--quick", "--max-new-tokens", "7"])
    assert a.schedule == "off:4,on:6,off:4" and a.max_new_tokens == 7 and a.capacity_requests == 4


@pytest.mark.parametrize("args,msg", [(["--configs", "nope"], "unknown configuration"),
                                      (["--schedule", "on:x"], "bad schedule item"),
                                      (["--probe", "probe:10:20"], "bad probe spec")])
def test_bad_options_exit_2_in_one_line(args, msg):
    p = run_script("bench.sharing", *args)
    assert p.returncode == 2 and msg in p.stderr and p.stderr.count("\n") == 1


def test_refuses_to_overwrite_without_force(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("not root: the run is refused before it looks at the results")
    (tmp_path / "plan.json").write_text("{}")
    p = run_script("bench.sharing", "--results-dir", tmp_path, "--tiny", "--quick")
    assert p.returncode == 2 and "--force replaces them" in p.stderr
    assert (tmp_path / "plan.json").read_text() == "{}"


@pytest.mark.slow
@real_cgroups
def test_smoke_run_writes_the_summary(tmp_path):
    p = run_script("bench.sharing", "--tiny", "--quick", "--results-dir", tmp_path, "--configs", "share",
                   "--trials", "1", "--schedule", "off:3,on:4,off:3", "--cgroup-name", f"shr_bench_{os.getpid()}",
                   timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    s = pd.read_csv(tmp_path / "summary.csv")
    assert list(s.columns) == COLUMNS and set(s.metric) <= set(METRICS)
    assert {"capacity", "reference", "before", "with", "after"} <= set(s.phase)
    got = {(r.phase, r.metric) for r in s.itertuples()}
    assert {("capacity", "capacity_alone_rps"), ("capacity", "capacity_cotenant_rps"), ("with", "cotenant_share"),
            ("with", "goodput_rps"), ("with", "probe_p99_ms")} <= got
    assert (tmp_path / "timeline_share.png").exists() and (tmp_path / "frontier.png").exists()
    assert "calibration:" in p.stderr and "[1/1] trial 1 share: phases" in p.stderr


def test_bounded_stops_a_run_past_its_limit(tmp_path):
    import sys
    rc, late = sharing.bounded([sys.executable, "-c", "import time; time.sleep(30)"], 0.5)
    assert late and rc != 0
    assert sharing.bounded([sys.executable, "-c", "pass"], 30) == (0, False)


def test_capacity_counts_ok_requests_over_the_span_to_the_deadline_of_complete_cells(tmp_path):
    import json
    from bench.sharing_report import throughput
    out = tmp_path / "x_alone.csv"
    pd.DataFrame({"status": ["ok", "ok", "cut"], "t_submit_s": [0.0, 0.0, 0.0], "t_end_s": [1.0, 2.0, 100.0],
                  "t_dequeue_s": 0.0, "t_admit_s": 0.0, "t_start_s": 0.0, "t_first_token_s": 0.5,
                  "output_tokens": 4}).to_csv(out, index=False)
    meta = tmp_path / "x_alone.json"
    meta.write_text(json.dumps({"complete": False}))
    assert throughput(str(out)) != throughput(str(out))                  # NaN: an incomplete cell is left out
    meta.write_text(json.dumps({"complete": True}))
    assert throughput(str(out)) == pytest.approx(0.02)                   # 2 ok over the 100 s to the deadline
    assert throughput(str(tmp_path / "y_alone.csv")) != throughput(str(tmp_path / "y_alone.csv"))   # NaN


def test_capacity_runs_carry_their_deadline():
    a = sharing.parse_args(["--capacity-limit-s", "90", "--schedule", "off:10,on:20,off:10"])
    cap = sharing.generator(a, "idle", "x.csv")
    assert cap[cap.index("--deadline-s") + 1] == "90"
    phased = sharing.generator(a, "idle", "x.csv", rate=0.1, schedule=a.schedule)
    assert phased[phased.index("--deadline-s") + 1] == "130"


def test_report_names_the_incomplete_runs(tmp_path):
    from bench.sharing_report import incomplete_runs
    d = tmp_path / "trials"
    d.mkdir()
    assert incomplete_runs(str(tmp_path)) == []
    for name in ("idle_t1_cotenant", "idle_t2_cotenant", "idle_t1_alone", "idle_t1_phases"):
        (d / f"{name}.csv").write_text("x\n")
    (d / "idle_t1_phases_timeline.csv").write_text("x\n")
    (d / "idle_t1_alone.json").write_text('{"complete": true}')
    (d / "idle_t1_phases.json").write_text('{"complete": true}')
    (d / "idle_t2_cotenant.json").write_text('{"complete": false}')
    assert incomplete_runs(str(tmp_path)) == ["idle_t1_cotenant", "idle_t2_cotenant"]
