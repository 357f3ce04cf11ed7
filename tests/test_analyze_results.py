"""The analysis: exact percentiles and counts on synthetic cells, the ideal FIFO, the published table beside
ours, missing cells, bad input, byte-identical table.md, the figures and the PDF."""
import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import read_cell, run_script
import analyze_results as ar
import metrics
import request_generator as rg


def write_cell(d, config, c, e2e_s, service_s=None, status=None, trials=1, gate=None, delta=None, limited=None):
    """A synthetic cell: per trial, request i submitted at 0.1*i s with end-to-end e2e_s[i] and service
    service_s[i] (default: all of it); status[i] 'rejected' gives a request that never started."""
    rows = []
    for trial in range(1, trials + 1):
        for i, e2e in enumerate(e2e_s):
            svc = e2e if service_s is None else service_s[i]
            st = "ok" if status is None else status[i]
            dec, checks, defer = gate[i] if gate else ("none", 0, 0.0)
            sub = 0.1 * i
            row = dict(trial=trial, request_id=i, config=config, concurrency=c, prompt_id=i % 10, prompt_chars=30,
                       prompt_tokens=7, output_tokens=50, status=st, error="", t_submit_s=sub, t_dequeue_s=sub,
                       t_admit_s=sub + defer, gate_decision=dec, gate_checks=checks, gate_pressure=np.nan)
            if st != "rejected":
                row.update(t_start_s=sub + e2e - svc, t_first_token_s=sub + e2e - svc + svc / 50, t_end_s=sub + e2e)
            rows.append(row)
    df = metrics.derive(pd.DataFrame(rows).reindex(columns=rg.COLUMNS))
    stem = os.path.join(d, f"{config}_c{c}")
    df.to_csv(stem + ".csv", index=False)
    meta = {"limited": rg.CONFIGS.get(config, {}).get("limited", False) if limited is None else limited,
            "config": {"config": config, "concurrency": c, "num_requests": len(e2e_s), "trials": trials},
            "trials": [{"trial": t, "cgroup_delta": delta} for t in range(1, trials + 1)]}
    with open(stem + ".json", "w") as f:
        json.dump(meta, f)
    return stem


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
        assert row.p95_e2e_ci_low_ms <= row.p95_e2e_ms <= row.p95_e2e_ci_high_ms
        assert bool(row.small_n_p95)  # 20 or 40 < 59
    assert pooled(tmp_path, "cgroups", 1).p95_e2e_ms == pytest.approx(3 * 19050.0)


def test_small_n_flag_and_bootstrap():
    assert metrics.min_samples_for(95) == 59
    v = np.arange(100.0)
    assert ar.bootstrap_ci(v) == ar.bootstrap_ci(v)  # fixed seed
    lo, hi = ar.bootstrap_ci(v)
    assert lo < np.percentile(v, 95) < hi
    assert np.isnan(ar.bootstrap_ci([])[0])


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
    assert ar.RULE in table and "(2 rejected, 1 failed)" in out.out


def test_published_beside_ours_and_missing_cells(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 1, E2E)
    write_cell(tmp_path, "limit1", 2, E2E)
    rc, out = analyze(tmp_path, capsys)
    assert rc == 0
    table = (tmp_path / "table.md").read_text()
    assert table == out.out
    pub = pd.read_csv(os.path.join(ar.HERE, "reference", "paper_table1.csv"))
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
    analyze(tmp_path, capsys)
    first = (tmp_path / "table.md").read_bytes(), (tmp_path / "summary.csv").read_bytes()
    analyze(tmp_path, capsys)
    assert ((tmp_path / "table.md").read_bytes(), (tmp_path / "summary.csv").read_bytes()) == first


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


def test_no_cells_or_no_directory_exits_2(tmp_path):
    proc = run_script("analyze_results.py", "--results-dir", tmp_path, "--no-figures")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no cell files" in proc.stderr
    rc = ar.main(["--results-dir", str(tmp_path / "absent"), "--no-figures"])
    assert rc == 2


def test_real_cell_from_the_request_generator(generate, tmp_path, capsys):
    _, csv_path = generate("--config", "baseline", "--concurrency", "2", "--num-requests", "4",
                           "--max-new-tokens", "3", "--trials", "2", name="baseline_c2.csv")
    rc, _ = analyze(tmp_path, capsys)
    assert rc == 0
    df, _ = read_cell(csv_path)
    r = pooled(tmp_path, "baseline", 2)
    assert r.p95_e2e_ms == np.percentile(metrics.derive(df).e2e_ms[df.status == "ok"], 95)


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
