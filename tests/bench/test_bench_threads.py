"""bench/threads.py: a tiny run of fresh processes writes one row per request with the cgroup's and the
scheduler's counters (under the quota as root), and a summary; the mode split; refusals."""
import os

import pandas as pd
import pytest

from bench import threads
from conftest import real_cgroups_reason, run_script


@pytest.mark.slow
def test_tiny_run_of_fresh_processes(tmp_path):
    quota = real_cgroups_reason() is None
    proc = run_script("bench.threads", "--tiny", "--procs", 1, "--requests", 2, "--tokens", 3, "--threads", "1 2",
                      "--policies", "passive", "--output-dir", tmp_path, *([] if quota else ["--no-quota"]),
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "requests.csv")
    assert list(df.columns) == threads.COLUMNS and len(df) == 4
    assert sorted(df["torch_threads"]) == [1, 1, 2, 2] and list(df["request"]) == [0, 1, 0, 1]
    assert (df["constrained"] == quota).all() and (df["service_s"] > 0).all() and (df["run_ms"] > 0).all()
    assert df["timeslices"].notna().all() and (df["tasks"] >= 1).all()   # a short request may run in one slice
    if quota:
        assert df["nr_periods"].notna().all() and df["throttled_ms"].notna().all()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary["torch_threads"]) == [1, 2] and (summary["requests"] == 2).all()
    assert "| loop | 2 | 2 | passive | none | 2 |" in (tmp_path / "summary.md").read_text().replace(
        "50% of one CPU", "none")


@pytest.mark.slow
def test_defaults_against_the_papers_settings(tmp_path):
    """--defaults: one thread, the engine's defaults and the paper's settings (here unconstrained only, to keep
    it short), with the CPU per request of each against the paper's in the same condition."""
    proc = run_script("bench.threads", "--tiny", "--defaults", "--conditions", "none", "--procs", 1, "--requests", 1,
                      "--tokens", 2, "--output-dir", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 6 and not summary["constrained"].any()
    assert set(summary["threads_option"]) == {"1", "auto", "default"}
    paper = summary[(summary["threads_option"] == "default") & (summary["omp_wait_policy"] == "unset")]
    assert (paper["torch_threads"] == len(os.sched_getaffinity(0))).all()
    text = (tmp_path / "summary.md").read_text()
    assert "against the paper's settings" in text and "| 1.00 |" in text


def test_worker_env_sets_the_policy_or_leaves_it_out():
    base = {"OMP_WAIT_POLICY": "ACTIVE", "PATH": "/bin"}
    assert threads.worker_env(2, "passive", base)["OMP_WAIT_POLICY"] == "PASSIVE"
    auto = threads.worker_env("auto", "auto", dict(base, OMP_NUM_THREADS="4"))
    assert "OMP_WAIT_POLICY" not in auto and "OMP_NUM_THREADS" not in auto   # the worker's engine sets them
    unset = threads.worker_env(2, "unset", base)
    assert "OMP_WAIT_POLICY" not in unset and unset["OMP_NUM_THREADS"] == "2" and unset["PATH"] == "/bin"
    assert base["OMP_WAIT_POLICY"] == "ACTIVE"   # the caller's mapping is left alone


def test_split_needs_a_wide_gap_with_two_on_each_side():
    assert threads.split([3.1, 3.2, 6.0, 6.2, 3.0]) == pytest.approx((3.2 + 6.0) / 2)
    assert threads.split([3.0, 3.1, 3.2, 3.3]) is None          # no gap of 1.3x
    assert threads.split([3.0, 3.1, 3.2, 9.0]) is None          # one outlier is not a mode
    assert threads.split([3.0, 6.0]) is None


def test_sched_delta_sums_threads_and_counts_new_ones_from_zero():
    me = os.getpid()
    before = {me: (10_000_000, 0, 5, 1, 2)}
    after = {me: (30_000_000, 1_000_000, 9, 2, 4), me + 1: (5_000_000, 2_000_000, 3, 0, 1)}
    d = threads.sched_delta(before, after)
    assert d["run_ms"] == 25 and d["run_ms_main"] == 20 and d["run_ms_others"] == 5 and d["wait_ms"] == 3
    assert d["timeslices"] == 7 and d["tasks"] == 2 and d["voluntary_switches"] == 1 and d["involuntary_switches"] == 3


@pytest.mark.parametrize("args", [["--threads", "0"], ["--policies", "lazy"], ["--procs", "0"], ["--engines", "x"]])
def test_bad_input_exits_2(tmp_path, args):
    proc = run_script("bench.threads", *args, "--output-dir", tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "summary.md").write_text("keep me")
    proc = run_script("bench.threads", "--tiny", "--output-dir", tmp_path)
    assert proc.returncode == 2 and "exists; use --force" in proc.stderr
    assert (tmp_path / "summary.md").read_text() == "keep me"
