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


def test_a_stopped_capacity_run_counts_its_requests_over_the_limit(tmp_path):
    from bench.sharing_report import throughput
    out = tmp_path / "x_alone.csv"
    pd.DataFrame({"status": ["ok", "ok", "failed"], "t_submit_s": [0.0, 0.0, 0.0], "t_end_s": [1.0, 2.0, 2.0],
                  "t_dequeue_s": 0.0, "t_admit_s": 0.0, "t_start_s": 0.0, "t_first_token_s": 0.5,
                  "output_tokens": 4}).to_csv(out, index=False)
    assert throughput(str(out)) == pytest.approx(1.0)                    # 2 ok over a 2 s span
    (tmp_path / "x_alone.timeout").write_text("100\n")
    assert throughput(str(out)) == pytest.approx(0.02)                   # 2 ok within the 100 s limit
    assert throughput(str(tmp_path / "y_alone.csv")) != throughput(str(tmp_path / "y_alone.csv"))   # NaN


def test_bounded_counts_the_limit_from_the_started_file(tmp_path):
    import sys
    import time
    flag = tmp_path / "cell.json"
    slow_start = f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(flag)!r}).touch(); time.sleep(30)"
    t0 = time.monotonic()
    rc, late = sharing.bounded([sys.executable, "-c", slow_start], 0.5, started=str(flag))
    assert late and flag.exists() and time.monotonic() - t0 >= 1.5       # the 0.5 s began after the file
    never = tmp_path / "never.json"
    assert sharing.bounded([sys.executable, "-c", "pass"], 30, started=str(never)) == (0, False)


def test_report_names_the_runs_stopped_at_their_limit(tmp_path):
    from bench.sharing_report import stopped_runs
    (tmp_path / "trials").mkdir()
    assert stopped_runs(str(tmp_path)) == []
    for name in ("idle_t2_cotenant.timeout", "idle_t1_cotenant.timeout", "idle_t1_cotenant.csv"):
        (tmp_path / "trials" / name).write_text("120\n")
    assert stopped_runs(str(tmp_path)) == ["idle_t1_cotenant", "idle_t2_cotenant"]
