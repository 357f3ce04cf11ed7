"""The analysis: exact percentiles and counts on synthetic cells, the ideal FIFO, the published table beside
ours, missing, incomplete and mislabelled cells, bad input, byte-identical outputs, the figures and the PDF
and where it goes."""
import dataclasses
import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import read_cell, run_script
from helpers import write_cell
from llm_psi.analysis import analyze as ar
from llm_psi.analysis import cells, summary, tables
from llm_psi.analysis import metrics
from llm_psi.load import generator as rg


def analyze(d, capsys=None, *extra):
    rc = ar.main(["--results-dir", str(d), "--no-figures", *extra])
    return rc, (capsys.readouterr() if capsys else None)


def pooled(d, config, c):
    s = pd.read_csv(os.path.join(d, "summary.csv"))
    return s[(s.config == config) & (s.concurrency == c) & (s.trial == "all")].iloc[0]


E2E = np.arange(1, 21, dtype=float)  # 1..20 s: numpy's p95 is 19.05 s, p50 10.5 s, p99 19.81 s


def test_percentiles_exact_and_pooled_equals_numpy(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 1, E2E, service_s=E2E / 2, trials=2)
    write_cell(tmp_path, "cgroups", 1, E2E * 3)
    rc, _ = analyze(tmp_path, capsys)
    assert rc == 0
    s = pd.read_csv(tmp_path / "summary.csv")
    t1 = s[(s.config == "baseline") & (s.trial == "1")].iloc[0]
    assert (t1.n_ok, t1.n_rejected, t1.n_failed) == (20, 0, 0)
    assert (t1.p50_e2e_ms, t1.p95_e2e_ms, t1.p99_e2e_ms) == pytest.approx((10500.0, 19050.0, 19810.0))
    assert t1.p95_service_ms == pytest.approx(9525.0)
    r = pooled(tmp_path, "baseline", 1)  # both trials: every value twice
    assert (r.n_ok, r.p95_e2e_ms, r.p99_e2e_ms) == (40, pytest.approx(19050.0), pytest.approx(20000.0))
    assert list(s.trial[s.config == "baseline"]) == ["1", "2", "all"]
    for _, row in s.iterrows():  # every row: numpy's percentile of that row's ok e2e_ms
        df = pd.read_csv(tmp_path / f"{row.config}_c{row.concurrency}.csv")
        df = df if row.trial == "all" else df[df.trial == int(row.trial)]
        assert row.p95_e2e_ms == np.percentile(df.e2e_ms[df.status == "ok"], 95)
        assert row.p95_e2e_iid_boot_low_ms <= row.p95_e2e_ms <= row.p95_e2e_iid_boot_high_ms
        assert bool(row.small_n_p95)  # 20 or 40 < 59
    assert pooled(tmp_path, "cgroups", 1).p95_e2e_ms == pytest.approx(3 * 19050.0)


def test_small_n_flag_and_bootstrap():
    assert metrics.min_samples_for(95) == 59
    v = np.arange(100.0)
    assert summary.bootstrap_ci(v) == summary.bootstrap_ci(v)  # fixed seed
    lo, hi = summary.bootstrap_ci(v)
    assert lo < np.percentile(v, 95) < hi
    assert np.isnan(summary.bootstrap_ci([])[0])


def test_rejected_and_failed_counted_not_in_latency(tmp_path, capsys):
    status = ["ok"] * 17 + ["rejected", "rejected", "failed"]
    gate = [("admitted", 1, 0.0)] * 10 + [("admitted", 3, 1.0)] * 5 + [("admitted_after_timeout", 10, 4.5)] * 2 + [
        ("rejected", 10, 4.5)] * 2 + [("admitted", 1, 0.0)]
    write_cell(tmp_path, "psi", 8, E2E, status=status, gate=gate)
    rc, out = analyze(tmp_path, capsys)
    assert rc == 0
    r = pooled(tmp_path, "psi", 8)
    assert (r.n, r.n_ok, r.n_rejected, r.n_failed) == (20, 17, 2, 1)
    assert r.p95_e2e_ms == pytest.approx(np.percentile(E2E[:17] * 1000, 95))
    assert r.gate_deferred_frac == pytest.approx(9 / 20)  # 5 held + 2 timeouts + 2 rejected
    assert r.gate_mean_checks == pytest.approx((10 + 15 + 20 + 20 + 1) / 20)
    assert r.gate_timeouts == 2
    table = (tmp_path / "table.md").read_text()
    assert tables.RULE in table and "(2 rejected, 1 failed)" in out.out


def test_published_beside_ours_and_missing_cells(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 1, E2E)
    write_cell(tmp_path, "limit1", 2, E2E)
    rc, out = analyze(tmp_path, capsys)
    assert rc == 0
    table = (tmp_path / "table.md").read_text()
    assert table == out.out
    pub = pd.read_csv(os.path.join(cells.HERE, "reference", "paper_table1.csv"))
    for v in pub.drop(columns="concurrency").to_numpy().ravel():
        assert f"{v:.1f}" in table
    assert f"{19050 / 4605.4:.3g}" in table  # ours / published, baseline c=1
    line = next(x for x in table.splitlines() if x.startswith("| 1 ") and "†" in x)
    assert line.count("—") >= 3  # cgroups-only, cgroups+PSI, speedup
    assert "Further configurations" in table and "limit1" in table
    assert "service time" in table and "end-to-end" in table
    assert "warning: missing cells" in out.err and "cgroups_c1" in out.err and "psi_c8" in out.err


def test_ideal_fifo_hand_computed():
    # one server, S = 2 s: ends at 2, 4, 6, then idle until 5.0 -> ends at 8 (no: 6 > 5, ends at 8)
    assert metrics.ideal_fifo([0, 0.1, 0.2, 5.0], 2.0) == pytest.approx([2.0, 3.9, 5.8, 3.0])
    assert metrics.ideal_fifo([5.0, 0.0], 1.0) == pytest.approx([1.0, 1.0])  # input order kept
    assert metrics.ideal_fifo([0, 0], [1.0, 3.0]) == pytest.approx([1.0, 4.0])
    assert metrics.ideal_fifo([], 1.0).size == 0


def test_ideal_reference_and_ratios(tmp_path, capsys):
    write_cell(tmp_path, "cgroups", 1, E2E)  # the fallback reference: median 10.5 s
    write_cell(tmp_path, "cgroups_threads", 1, [2.0, 2.0, 4.0])  # preferred: median 2 s
    write_cell(tmp_path, "cgroups", 8, E2E, service_s=np.full(20, 3.0), trials=2)
    write_cell(tmp_path, "baseline", 8, E2E)
    rc, _ = analyze(tmp_path, capsys)
    assert rc == 0
    ideal = metrics.ideal_fifo(0.1 * np.arange(20), 2.0) * 1000
    r = pooled(tmp_path, "cgroups", 8)
    assert r.ideal_service_ms == 2000.0
    assert r.ideal_p95_e2e_ms == pytest.approx(np.percentile(np.concatenate([ideal, ideal]), 95))
    assert r.e2e_vs_ideal == pytest.approx(r.p95_e2e_ms / r.ideal_p95_e2e_ms)
    assert r.service_vs_ideal == pytest.approx(1.5)
    assert np.isnan(pooled(tmp_path, "baseline", 8).ideal_p95_e2e_ms)  # not limited
    assert "median ok service time of cgroups_threads_c1" in (tmp_path / "table.md").read_text()
    os.remove(tmp_path / "cgroups_threads_c1.csv")
    analyze(tmp_path, capsys)
    assert pooled(tmp_path, "cgroups", 8).ideal_service_ms == 10500.0
    for f in ("cgroups_c1.csv", "cgroups_c1.json"):
        os.remove(tmp_path / f)
    _, out = analyze(tmp_path, capsys)
    assert np.isnan(pooled(tmp_path, "cgroups", 8).ideal_service_ms) and "no reference cell" in out.err


def test_throttling_and_distributions(tmp_path, capsys):
    write_cell(tmp_path, "cgroups", 4, E2E, trials=2,
               delta={"nr_periods": 100, "nr_throttled": 25, "throttled_usec": 1000, "usage_usec": 5})
    analyze(tmp_path, capsys)
    r = pooled(tmp_path, "cgroups", 4)
    assert (r.nr_periods, r.nr_throttled, r.throttled_share) == (200, 50, 0.25)
    long = pd.read_csv(tmp_path / "latency_distributions.csv")
    assert len(long) == 40 * len(metrics.METRICS)
    assert set(long.metric) == set(metrics.METRICS)
    e2e = long[long.metric == "e2e_ms"].value_ms
    assert sorted(e2e) == pytest.approx(sorted(np.tile(E2E * 1000, 2)))


def test_table_md_regenerates_byte_identically(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 8, E2E, trials=3)
    write_cell(tmp_path, "psi", 8, E2E * 2, gate=[("admitted", 2, 0.5)] * 20)
    write_cell(tmp_path, "cgroups", 8, E2E * 3, trials=2, scale=[1.0, 1.5])
    outputs = ("table.md", "summary.csv", "speedups.csv")
    analyze(tmp_path, capsys)
    first = [(tmp_path / name).read_bytes() for name in outputs]
    assert len(pd.read_csv(tmp_path / "speedups.csv")) == 2  # cgroups over baseline, e2e and service
    analyze(tmp_path, capsys)
    assert [(tmp_path / name).read_bytes() for name in outputs] == first


@pytest.mark.parametrize("content, problem", [
    ("", "empty file"),
    (",".join(rg.COLUMNS) + "\n", "no rows"),
    ("trial,status\n1,ok\n", "missing columns"),
    ("bad", "missing columns"),
    (None, "non-numeric"),
    ("status", "unknown status"),
])
def test_bad_csv_exits_2_naming_the_file(tmp_path, capsys, content, problem):
    stem = write_cell(tmp_path, "baseline", 1, E2E)
    if content is None:
        df = pd.read_csv(stem + ".csv").astype({"t_end_s": object})
        df.loc[3, "t_end_s"] = "soon"
        df.to_csv(stem + ".csv", index=False)
    elif content == "status":
        df = pd.read_csv(stem + ".csv")
        df.loc[0, "status"] = "maybe"
        df.to_csv(stem + ".csv", index=False)
    else:
        with open(stem + ".csv", "w") as f:
            f.write(content)
    rc, out = analyze(tmp_path, capsys)
    assert rc == 2
    assert out.err.startswith(f"error: {stem}.csv: ") and problem in out.err and len(out.err.splitlines()) == 1


@pytest.mark.slow
def test_no_cells_or_no_directory_exits_2(tmp_path):
    proc = run_script("analyze_results.py", "--results-dir", tmp_path, "--no-figures")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no cell files" in proc.stderr
    rc = ar.main(["--results-dir", str(tmp_path / "absent"), "--no-figures"])
    assert rc == 2


@pytest.mark.slow
def test_real_cell_from_the_request_generator(generate, tmp_path, capsys):
    _, csv_path = generate("--config", "baseline", "--concurrency", "2", "--num-requests", "4",
                           "--max-new-tokens", "3", "--trials", "2", name="baseline_c2.csv")
    rc, _ = analyze(tmp_path, capsys)
    assert rc == 0
    df, _ = read_cell(csv_path)
    r = pooled(tmp_path, "baseline", 2)
    assert r.p95_e2e_ms == np.percentile(metrics.derive(df).e2e_ms[df.status == "ok"], 95)


@pytest.mark.slow
def test_figures_and_paper(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 1, E2E / 10)
    write_cell(tmp_path, "cgroups_threads", 1, E2E / 5)
    for config, k in (("baseline", 0.1), ("cgroups", 3.0), ("psi", 1.0)):
        for c in (2, 8):
            write_cell(tmp_path, config, c, E2E * k, service_s=E2E * k / 2, trials=2,
                       gate=[("admitted", 2, 0.5)] * 20 if config == "psi" else None,
                       delta=None if config == "baseline" else {"nr_periods": 100, "nr_throttled": 40})
    t = np.arange(0, 5, 0.25)
    pd.DataFrame({"t_s": t, "trial": 1, "sys_cpu_some_avg10": 50 + 40 * np.sin(t), "cg_cpu_some_pct": 90.0,
                  "nr_throttled": np.arange(len(t)) * 3, "in_flight": 1, "waiting": np.arange(len(t)) % 4,
                  "limit": ""}).to_csv(tmp_path / "psi_c8_timeline.csv", index=False)
    paper = tmp_path / "out" / "paper.pdf"
    os.makedirs(paper.parent)
    rc = ar.main(["--results-dir", str(tmp_path), "--paper", str(paper)])
    assert rc == 0, capsys.readouterr().err
    for name in ("p95_vs_concurrency", "latency_cdf_c8", "timeline_c8", "latency_breakdown"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    data = paper.read_bytes()
    assert data.startswith(b"%PDF") and data.count(b"/Type /Page\n") + data.count(b"/Type /Page ") >= 5
    if shutil.which("pdftotext"):  # optional: check the PDF's text holds the table
        text = subprocess.run(["pdftotext", "-layout", str(paper), "-"], capture_output=True, text=True).stdout
        assert "Table I" in text and "4605.4" in text and "cgroups+PSI" in text
        assert f"{np.percentile(E2E * 3000, 95):.1f}" in text
        assert "Findings at a glance" in text and "Table 1." in text and "Figure 1." in text
        assert "Appendix A" in text and not [line for line in text.splitlines() if line.startswith("|")]


def table_line(table, start):
    return next(x for x in table.splitlines() if x.startswith(start))


def test_incomplete_cell_warned_left_out_and_flagged(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 1, E2E)
    write_cell(tmp_path, "cgroups", 1, E2E * 3, trials=2, meta={"trials_planned": 3, "complete": False})
    old = write_cell(tmp_path, "psi", 1, E2E * 2)  # an old JSON: no complete flag, but interrupted
    with open(old + ".json") as f:
        meta = json.load(f)
    del meta["complete"], meta["trials_planned"]
    with open(old + ".json", "w") as f:
        json.dump({**meta, "interrupted": True}, f)
    rc, out = analyze(tmp_path, capsys)
    assert rc == 0
    for name in ("cgroups_c1", "psi_c1"):
        assert f"warning: {tmp_path / name}.csv: incomplete cell" in out.err
        assert not pooled(tmp_path, name[:-3], 1).complete
    assert pooled(tmp_path, "baseline", 1).complete
    line = table_line((tmp_path / "table.md").read_text(), "| 1 ")
    assert f"{19050.0:.1f}" in line and f"{3 * 19050.0:.1f}" not in line and line.count("—") >= 3
    rc, out = analyze(tmp_path, capsys, "--include-incomplete")
    assert f"{3 * 19050.0:.1f}" in table_line((tmp_path / "table.md").read_text(), "| 1 ")
    assert "incomplete cell" in out.err  # warned either way


def test_rows_short_of_the_plan_are_incomplete(tmp_path, capsys):
    stem = write_cell(tmp_path, "baseline", 2, E2E, trials=2)
    df = pd.read_csv(stem + ".csv")
    df[df.request_id != 19].to_csv(stem + ".csv", index=False)  # the JSON says complete, but two rows are missing
    _, out = analyze(tmp_path, capsys)
    assert "baseline_c2.csv: incomplete cell (38 rows" in out.err and not pooled(tmp_path, "baseline", 2).complete


def test_mislabelled_limits_warned(tmp_path, capsys):
    write_cell(tmp_path, "cgroups", 2, E2E, meta={"cgroup": {"limits": {"cpu_quota_us": None}}})
    write_cell(tmp_path, "baseline", 2, E2E, meta={"cgroup": {"limits": {"cpu_quota_us": 50000}}})
    write_cell(tmp_path, "psi", 2, E2E)
    _, out = analyze(tmp_path, capsys)
    assert f"warning: {tmp_path / 'cgroups_c2'}.json: labelled limited but its cgroup limits read back no CPU quota" \
        in out.err
    assert f"{tmp_path / 'baseline_c2'}.json: labelled unlimited but its cgroup limits read back a CPU quota" in out.err
    assert [pooled(tmp_path, k, 2).limits_match for k in ("cgroups", "baseline", "psi")] == [False, False, True]


def test_trial_intervals_and_speedups_csv(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 2, E2E, trials=2, scale=[1.0, 2.0])
    write_cell(tmp_path, "cgroups", 2, E2E, trials=3, scale=[4.0, 8.0, 16.0], service_s=E2E / 2)
    write_cell(tmp_path, "psi", 2, E2E, trials=1)  # one trial: no ratio with an interval
    rc, _ = analyze(tmp_path, capsys)
    assert rc == 0
    p95 = np.percentile(E2E * 1000, 95)
    r = pooled(tmp_path, "cgroups", 2)
    mean, lo, hi = p95 * 28 / 3, *stats_t(p95 * np.array([4.0, 8.0, 16.0]))
    assert (r.n_trials, r.p95_e2e_trial_mean_ms, r.p95_e2e_trial_ci_low_ms, r.p95_e2e_trial_ci_high_ms) == (
        3, pytest.approx(mean), pytest.approx(lo), pytest.approx(hi))
    assert r.p95_service_trial_mean_ms == pytest.approx(mean / 2)
    sp = pd.read_csv(tmp_path / "speedups.csv")
    assert list(sp.columns) == ["config", "reference_config", "concurrency", "metric", "ratio", "ci_lo", "ci_hi",
                                "n_trials"]
    assert set(zip(sp.config, sp.reference_config, sp.metric)) == {("cgroups", "baseline", "e2e"),
                                                                   ("cgroups", "baseline", "service")}
    e2e = sp[sp.metric == "e2e"].iloc[0]
    assert e2e.ratio == pytest.approx(8.0 / np.sqrt(2.0)) and e2e.n_trials == 2  # geometric means 8 p95 / √2 p95
    assert (sp.ci_lo <= sp.ratio).all() and (sp.ratio <= sp.ci_hi).all()
    table = (tmp_path / "table.md").read_text()
    assert table_line(table, "| cgroups-only | ").rstrip(" |").endswith("yes, higher")
    assert f"{8.0 / np.sqrt(2.0):.2f} [{e2e.ci_lo:.2f}–{e2e.ci_hi:.2f}]" in table


def stats_t(v):
    half = 4.302652730 * np.std(v, ddof=1) / np.sqrt(len(v))  # t quantile for 2 df, from a printed table
    return np.mean(v) - half, np.mean(v) + half


def test_drift_table_and_interleaving(tmp_path, capsys):
    at = lambda s: f"2026-11-29T10:00:{s:02d}+00:00"
    write_cell(tmp_path, "baseline", 1, E2E, trials=4, scale=[1.0, 1.1, 1.2, 1.3],
               runs=[(0, at(0)), (2, at(2)), (4, at(4)), (6, at(6))])
    write_cell(tmp_path, "cgroups", 1, E2E, trials=4, scale=[1.0, 0.9, 1.0, 1.1],
               runs=[(1, at(1)), (3, at(3)), (5, at(5)), (7, at(7))])
    write_cell(tmp_path, "psi", 1, E2E)  # an old cell: no run order
    analyze(tmp_path, capsys)
    table = (tmp_path / "table.md").read_text()
    base = [x.strip() for x in table_line(table, "| baseline     | 1 |").split("|")[3:8]]
    assert base[:3] + base[4:] == ["4", "1.00", f"{2 / 24:.3g}", "none found"]  # 4 points: p ≥ 2/24
    assert base[3].startswith(f"{100 * 0.1 / 1.15:+.1f} [")       # the slope, then its interval
    assert table_line(table, "| cgroups+PSI  | 1 |").rstrip(" |").endswith("no run order recorded")
    assert "Interleaving: 7 of 7 consecutive trials (all cells, by started_at) switch configuration (100%)." in table


def test_started_at_must_be_a_time(tmp_path, capsys):
    stem = write_cell(tmp_path, "baseline", 1, E2E, runs=[(0, "yesterday")])
    rc, out = analyze(tmp_path, capsys)
    assert rc == 2 and out.err.startswith(f"error: {stem}.json: trial 1: started_at") and out.err.count("\n") == 1


def test_artifact_beside_ours_and_collapse(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 1, E2E, service_s=np.full(20, 2.0))
    write_cell(tmp_path, "cgroups", 1, E2E * 3, service_s=np.full(20, 5.0))
    analyze(tmp_path, capsys)
    table = (tmp_path / "table.md").read_text()
    assert table_line(table, "| ours     |        cgroups c=1 |").rstrip(" |").endswith("2.5×")
    assert f"{tmp_path / 'collapse.csv'} is not there" in table
    pd.DataFrame([("eager", "PASSIVE", 1, c, 3, s, s, s) for c, s in (("unconstrained", 2.0), ("quota", 7.0))],
                 columns=["engine", "omp_wait_policy", "torch_threads", "condition", "reps", "median_service_s",
                          "min_s", "max_s"]).to_csv(tmp_path / "collapse.csv", index=False)
    analyze(tmp_path, capsys)
    assert "Largest slowdown: 3.5× (eager, PASSIVE, 1)." in (tmp_path / "table.md").read_text()
    from llm_psi.analysis import paper
    assert "largest single-request slowdown under the quota is 3.5× (eager, OMP_WAIT_POLICY PASSIVE, 1 threads)" \
        in paper.raw_file_findings(ar.analyze(str(tmp_path)))[-1]
    capsys.readouterr()
    (tmp_path / "collapse.csv").write_text("engine\neager\n")
    rc, out = analyze(tmp_path, capsys)
    assert rc == 2 and out.err.startswith(f"error: {tmp_path / 'collapse.csv'}: missing columns")


def test_findings_state_the_raw_files(tmp_path, capsys):
    from llm_psi.analysis import paper
    write_cell(tmp_path, "baseline", 1, E2E, service_s=np.full(20, 2.0))
    write_cell(tmp_path, "cgroups", 1, E2E * 3, service_s=np.full(20, 5.0))
    an = ar.analyze(str(tmp_path))
    text = "\n".join(paper.findings(an) + paper.raw_file_findings(an) + paper.differences(an)) + an.table_md
    assert "mix" not in text.lower()
    raw = paper.raw_file_findings(an)
    assert "in 12 of 12 cells" in raw[0] and "requests never overlapped" in raw[1]
    assert f"{5.0 / 2.0:.2f}×" in raw[2]
    assert [f for f in raw if "not forced by the data" in f][0].startswith("Guess")
    assert raw[-1].startswith("The single-request collapse bench") and "has not been run" in raw[-1]


def test_analysis_is_built_once_and_read_only(tmp_path):
    write_cell(tmp_path, "cgroups", 1, E2E, trials=2)
    write_cell(tmp_path, "psi", 1, E2E, trials=2)
    an = ar.analyze(str(tmp_path))
    assert tables.RULE in an.table_md and an.modes is None
    assert list(an.speedups.columns) == tables.SPEEDUP_COLUMNS and len(an.speedups) == 2  # psi/cgroups e2e, service
    with pytest.raises(dataclasses.FrozenInstanceError):
        an.table_md = ""


@pytest.mark.slow
def test_report_goes_beside_the_results(tmp_path, capsys):
    root = os.path.join(cells.HERE, "paper.pdf")
    before = open(root, "rb").read() if os.path.exists(root) else None
    write_cell(tmp_path, "baseline", 8, E2E)
    assert ar.main(["--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "paper.pdf").read_bytes().startswith(b"%PDF")
    assert (tmp_path / "artifact_timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert (open(root, "rb").read() if os.path.exists(root) else None) == before
    assert ar.default_paper(os.path.join(cells.HERE, "results")) == root
    assert ar.default_paper(str(tmp_path)) == str(tmp_path / "paper.pdf")


def test_service_mode_cells_beside_in_process(tmp_path, capsys):
    """A service/ directory beside the cells: modes.csv and a table row per config and mode, with the ratio."""
    svc = tmp_path / "service"
    svc.mkdir()
    write_cell(tmp_path, "baseline", 8, E2E, trials=2)
    write_cell(svc, "baseline", 8, E2E * 1.5)
    write_cell(svc, "cgroups", 8, E2E)  # no in-process twin: left out
    rc, out = analyze(tmp_path, capsys)
    assert rc == 0 and "In-process vs service mode" in out.out
    modes = pd.read_csv(tmp_path / "modes.csv")
    e2e = modes[modes.metric == "e2e"].iloc[0]
    assert list(modes.config.unique()) == ["baseline"]
    assert e2e.in_process_p95_ms == pytest.approx(19050) and e2e.service_p95_ms == pytest.approx(19050 * 1.5)
    assert e2e.service_over_in_process == pytest.approx(1.5) and e2e.in_process_trials == 2
