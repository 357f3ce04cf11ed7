"""bench/collapse.py: the tiny grid end to end without the quota, its refusals, and the computed verdict."""
from types import SimpleNamespace

import pandas as pd
import pytest

from bench import collapse as bench_collapse
from conftest import run_script


@pytest.mark.slow
def test_tiny_grid_without_quota(tmp_path):
    csv_path, md_path = tmp_path / "c.csv", tmp_path / "c.md"
    proc = run_script("bench.collapse", "--tiny", "--threads", "1", "--policies", "passive", "--engines",
                      "loop generate", "--reps", 1, "--max-new-tokens", 5, "--no-quota",
                      "--output-csv", csv_path, "--output-md", md_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quota column skipped: --no-quota given" in proc.stderr
    df = pd.read_csv(csv_path)
    assert list(df.columns) == bench_collapse.COLUMNS
    assert list(df["engine"]) == ["loop", "generate"] and set(df["condition"]) == {"unconstrained"}
    assert (df["reps"] == 1).all() and (df["median_service_s"] > 0).all() and (df["torch_threads"] == 1).all()
    md = md_path.read_text()
    assert "| slowdown | artifact slowdown |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| loop ", "| generate "))]
    assert len(rows) == 2 and all(line.split("|")[5:7] == [" — ", " — "] for line in rows)
    assert "No slowdown factor was measured" in md and md in proc.stdout


@pytest.mark.parametrize("args", [["--reps", "0"], ["--slow-s", "nan"], ["--slow-s", "-3"], ["--threads", "2 x"],
                                  ["--policies", "lazy"], ["--max-new-tokens", "inf"]])
def test_bad_numbers_and_words_exit_2(tmp_path, args):
    proc = run_script("bench.collapse", *args, "--output-csv", tmp_path / "c.csv", "--output-md", tmp_path / "c.md")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "c.csv").exists()


def test_refuses_to_overwrite_without_force(tmp_path):
    md_path = tmp_path / "c.md"
    md_path.write_text("keep me")
    proc = run_script("bench.collapse", "--output-csv", tmp_path / "c.csv", "--output-md", md_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"python -m bench.collapse: error: {md_path} exists; use --force to overwrite it"
    assert md_path.read_text() == "keep me"


def _row(engine, threads, condition, median):
    return dict(engine=engine, omp_wait_policy="active", torch_threads=threads, condition=condition,
                median_service_s=median, model="m")


@pytest.mark.parametrize("quota_s, factor, words", [(4.0, "2.0x", "not within 2x"), (60.0, "30.0x", "within 2x"),
                                                    (90.0, "45.0x", "at or above")])
def test_table_factors_and_verdict(quota_s, factor, words):
    rows = [_row("loop", 1, "unconstrained", 2.0), _row("loop", 1, "quota", 3.0),
            _row("generate", 8, "unconstrained", 2.0), _row("generate", 8, "quota", quota_s)]
    md = bench_collapse.markdown(rows, SimpleNamespace(max_new_tokens=50, reps=3), skipped=None)
    assert f"| loop | active | 1 | 2.00 | 3.00 | 1.5x | {bench_collapse.ARTIFACT_FACTOR:.1f}x |" in md
    assert f"| generate | active | 8 | 2.00 | {quota_s:.2f} | {factor} | {bench_collapse.ARTIFACT_FACTOR:.1f}x |" in md
    last = md.strip().splitlines()[-1]
    assert last.startswith(f"Largest slowdown seen: {factor} (generate engine, active, 8 thread(s)), {words} ")
