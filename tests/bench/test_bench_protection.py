"""bench.protection: the interleaved plan, the report from synthetic trial files (and its byte-for-byte rewrite),
the command line's one-line errors, and a --tiny --quick smoke run on real cgroups (root) that resumes nothing
twice."""
import csv
import json
import math
import os

import pytest

from llm_psi.load import arrivals

from conftest import real_cgroups, run_script
from bench.protection import report as rep
from bench.protection import run as runs


def test_plan_interleaves_rounds_and_keeps_its_order_in_parts():
    cells = [f"c{i}:interactive:saturated" for i in range(5)]
    full = runs.plan(cells, 3, seed=7)
    assert [k for k, _ in full] == [1] * 5 + [2] * 5 + [3] * 5
    assert all(a[1] != b[1] for a, b in zip(full, full[1:]))
    assert runs.plan(cells, 3, seed=7, first=2) == full[5:]
    assert runs.plan(cells, 3, seed=8) != full


def _write_rows(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)


def synthetic_trial(d, config, k, with_latency_ms, llm_cpu_s):
    """An interactive owner at 10 req/s for 4 s alone (10 ms each) and with the LLM (with_latency_ms each), the
    LLM saturated: 8 ok requests of 4 tokens in the 4 s phase."""
    st = rep.stem(d, config, "interactive", "saturated", k)
    os.makedirs(os.path.dirname(st), exist_ok=True)
    for which, lat in (("alone", 10.0), ("with", with_latency_ms)):
        rows = [(i, (i + .5) / 10, (i + .5) / 10, (i + .5) / 10 + lat / 1000, lat) for i in range(40)]
        _write_rows(f"{st}_{which}_owner.csv", ["request", "t_due_s", "t_start_s", "t_end_s", "latency_ms"], rows)
    _write_rows(f"{st}_llm.csv", ["trial", "status", "output_tokens", "t_submit_s", "t_dequeue_s", "t_admit_s",
                                  "t_start_s", "t_first_token_s", "t_end_s"],
                [(1, "ok", 4, i * .5, i * .5, i * .5, i * .5, i * .5 + .1, i * .5 + .4) for i in range(8)])
    rec = {"config": config, "owner": "interactive", "llm_load": "saturated", "trial": k, "complete": True,
           "owner_spec": "interactive:10:5", "alone_s": 4, "with_s": 4, "cpus": 2,
           "alone": {"seconds": 4.0, "cpu_s": 0.2}, "with": {"seconds": 4.0, "cpu_s": 0.2, "llm_cpu_s": llm_cpu_s}}
    with open(st + ".json", "w") as f:
        json.dump(rec, f)


def test_report_from_synthetic_trials_and_its_rewrite(tmp_path):
    d = str(tmp_path)
    for k, (lat, cpu) in enumerate([(11.0, 3.8), (12.0, 3.8), (13.0, 3.8)], 1):
        synthetic_trial(d, "headroom", k, lat, cpu)
    synthetic_trial(d, "baseline", 1, 20.0, 7.0)
    with open(rep.stem(d, "baseline", "interactive", "saturated", 2) + ".json", "w") as f:
        json.dump({"config": "baseline", "owner": "interactive", "llm_load": "saturated", "trial": 2,
                   "complete": False}, f)
    text = rep.report(d)
    assert "left out, not complete: baseline_interactive_saturated_t2" in text
    with open(os.path.join(d, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == rep.COLUMNS
    got = {(r["config"], r["metric"]): r for r in rows}
    assert [r["config"] for r in rows][0] == "baseline"                     # the study's order of configurations
    assert float(got["headroom", "lat_imp_p99_pct"]["mean"]) == pytest.approx(20.0)   # 10 -> 11, 12, 13 ms
    assert got["headroom", "lat_imp_p99_pct"]["n_trials"] == "3"
    assert float(got["headroom", "isol_mean_pct"]["mean"]) == pytest.approx(100.0)
    assert float(got["headroom", "owner_cpu_share"]["mean"]) == pytest.approx(1.0)
    # 2 CPUs x 4 s - 0.2 CPU-s of the owner = 7.8 CPU-s left idle
    assert float(got["headroom", "llm_work_conservation"]["mean"]) == pytest.approx(3.8 / 7.8)
    assert float(got["headroom", "llm_tokens_per_s"]["mean"]) == pytest.approx(8.0)
    assert float(got["baseline", "llm_goodput_rps"]["mean"]) == pytest.approx(2.0)
    assert math.isnan(float(got["baseline", "lat_imp_p99_pct"]["ci_lo"] or "nan"))   # one trial: no interval
    with open(os.path.join(d, "power.csv")) as f:
        power = {r["metric"]: r for r in csv.DictReader(f)}
    assert float(power["lat_imp_p99_pct"]["sd_pooled"]) == pytest.approx(10.0)
    first = open(os.path.join(d, "summary.csv"), "rb").read()
    rep.report(d)
    assert open(os.path.join(d, "summary.csv"), "rb").read() == first
    plan = runs.power_plan(d, 3)
    assert plan["trials"] == next(r["trials_for_80pct"] for r in plan["metrics"] if r["metric"] == "lat_imp_p99_pct")


def test_differences_between_configurations_with_welch_intervals(tmp_path):
    d = str(tmp_path)
    for k, lat in enumerate([11.0, 12.0, 13.0], 1):        # lat-imp 10, 20, 30
        synthetic_trial(d, "headroom", k, lat, 3.8)
    for k, lat in enumerate([10.5, 11.0, 11.5], 1):        # 5, 10, 15
        synthetic_trial(d, "idle", k, lat, 3.8)
    for k, lat in enumerate([20.0, 20.5, 21.0], 1):        # 100, 105, 110
        synthetic_trial(d, "baseline", k, lat, 7.0)
    synthetic_trial(d, "weight1", 1, 10.0, 3.8)             # one trial: no interval, no row
    assert "differences.csv" in rep.report(d)
    with open(os.path.join(d, "differences.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == rep.DIFF_COLUMNS
    p99 = {(r["config_a"], r["config_b"]): r for r in rows if r["metric"] == "lat_imp_p99_pct"}
    assert set(p99) == {("baseline", "idle"), ("baseline", "headroom"), ("idle", "headroom")}   # the study's order
    assert float(p99["idle", "headroom"]["diff"]) == pytest.approx(-10.0)
    assert p99["idle", "headroom"]["resolved"] == "False"   # Welch: 10 +- 3.2 x 6.45
    assert float(p99["baseline", "idle"]["diff"]) == pytest.approx(95.0) and p99["baseline", "idle"]["resolved"] == "True"
    assert float(p99["baseline", "idle"]["ci_lo"]) > 0 and p99["baseline", "idle"]["n_a"] == "3"
    assert not any(r["metric"] == "llm_send_lateness_max_ms" for r in rows)
    assert {r["owner"] for r in rows} == {"interactive"} and {r["llm_load"] for r in rows} == {"saturated"}
    first = open(os.path.join(d, "differences.csv"), "rb").read()
    rep.report(d)
    assert open(os.path.join(d, "differences.csv"), "rb").read() == first


def test_a_closed_loops_goodput_counts_from_the_send(tmp_path):
    """The saturated load is a closed loop: its requests enter the generator's queue at once (t_submit_s 0) and
    go out as a worker takes each (t_dequeue_s). Timed from the send, all 6 meet a 5 s TTFT; timed from the
    queue, only the first 4 would (the pilot's defect)."""
    path = tmp_path / "llm.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["status", "output_tokens", "t_submit_s", "t_dequeue_s", "t_admit_s", "t_start_s",
                    "t_first_token_s", "t_end_s"])
        for i in range(6):
            sent = 3.0 * (i // 2)                   # two workers, 3 s a request
            w.writerow(["ok", 32, 0.0, sent, sent, sent, sent + 1.0, sent + 3.0])
    slo = arrivals.parse_slo("ttft:5000,e2e:15000")
    assert rep.llm_rates(str(path), 30.0, slo, closed_loop=True) == pytest.approx((6 / 30, 6 * 32 / 30))
    assert rep.llm_rates(str(path), 30.0, slo)[0] == pytest.approx(4 / 30)   # TTFT 1, 1, 4, 4, 7, 7 s from the queue


def test_one_line_errors(tmp_path, capsys):
    from bench.protection.__main__ import main
    for args in (["--configs", "nope"], ["--interactive", "interactive:20:60"], ["--force", "--resume"]):
        with pytest.raises(SystemExit) as e:
            main(["--report-only", "--results-dir", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
    assert main(["--report-only", "--results-dir", str(tmp_path)]) == 0
    assert "no complete trials" in capsys.readouterr().out


@pytest.mark.slow
@real_cgroups
def test_quick_smoke_run_resume_and_report_only(tmp_path):
    d = str(tmp_path / "p")
    service = f"llm_ptest_service_{os.getpid()}"
    args = ["--tiny", "--quick", "--results-dir", d, "--configs", "headroom", "--owners", "interactive,batch",
            "--loads", "interactive", "--trials", "1",
            # names of its own, so that its last check sees only its own cgroups
            "--owner-cgroup", f"llm_ptest_owner_{os.getpid()}", "--cgroup-name", service]
    p = run_script("bench.protection", *args, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    plan = json.load(open(os.path.join(d, "plan.json")))      # both calibrations: the quota's, and no limit's
    assert plan["quota_capacity_rps"] > 0 and plan["rate_rps"] == pytest.approx(0.5 * plan["quota_capacity_rps"])
    assert plan["llm_alone_tokens_per_s"] > 0 and 0 < plan["llm_alone_cpu_per_s"] <= len(os.sched_getaffinity(0))
    assert os.path.exists(os.path.join(d, "calibration_alone_llm.csv"))
    assert os.path.exists(os.path.join(d, "differences.csv"))
    trials = sorted(f for f in os.listdir(os.path.join(d, "trials")) if f.endswith("_t1.json"))
    assert trials == ["headroom_batch_interactive_t1.json", "headroom_interactive_interactive_t1.json"]
    for name in trials:
        rec = json.load(open(os.path.join(d, "trials", name)))
        assert rec["complete"] and rec["git_commit"] and rec["with"]["llm_cpu_s"] > 0 and rec["alone"]["cpu_s"] > 0
        assert rec["with"]["client_cpu_s"] > 0                  # the load generator's own CPU, recorded
    with open(os.path.join(d, "summary.csv")) as f:
        metrics = {r["metric"] for r in csv.DictReader(f)}
    assert {"isol_mean_pct", "isol_p01_pct", "lat_imp_p99_pct", "owner_cpu_share", "llm_work_conservation",
            "llm_tokens_per_s", "llm_goodput_rps", "llm_send_lateness_max_ms"} <= metrics
    # the controller ran beside the service in each trial: its law line, naming the service's cgroup. Whether
    # the quota moves in a 6 s trial is the owner's doing (an owner that stalls every second keeps the quota at
    # its floor, as the law says), so the changes themselves are tested on a fake tree (tests/control)
    logs = [open(os.path.join(d, "trials", f"headroom_{o}_interactive_t1_headroom.log")).read()
            for o in ("batch", "interactive")]
    assert all(f"headroom: {service} from" in log for log in logs)
    first = open(os.path.join(d, "summary.csv"), "rb").read()
    p = run_script("bench.protection", "--report-only", "--results-dir", d)
    assert p.returncode == 0 and open(os.path.join(d, "summary.csv"), "rb").read() == first
    p = run_script("bench.protection", *args, "--resume", timeout=120)
    assert p.returncode == 0 and "0 trial(s) run" in p.stderr
    # its own cgroups are gone (other workers' tests may hold cgroups of their own names meanwhile)
    assert not [l for l in os.popen(f"find /sys/fs/cgroup -maxdepth 3 -name 'llm_ptest_*_{os.getpid()}'")]
