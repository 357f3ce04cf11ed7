"""bench.paper_cost: a tiny A/B of the paper's server re-created and our cgroups cell writes one row per timed
request and the side-by-side table; refuses to overwrite."""
import pandas as pd
import pytest

from conftest import run_script


@pytest.mark.slow
def test_tiny_side_by_side(tmp_path):
    csv, md = tmp_path / "p.csv", tmp_path / "p.md"
    proc = run_script("bench.paper_cost", "--tiny", "--no-quota", "--rounds", 1, "--requests", 1, "--tokens", 2,
                      "--variants", "paper ours", "--output-csv", csv, "--output-md", md, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(csv)
    assert list(df["variant"]) == ["paper", "ours"] and (df["latency_s"] > 0).all()
    text = md.read_text()
    assert "| paper | 1 | 1 |" in text and "| ours | 1 | 1 |" in text and "re-creation" in text


def test_refuses_to_overwrite(tmp_path):
    md = tmp_path / "p.md"
    md.write_text("keep")
    proc = run_script("bench.paper_cost", "--output-md", md, "--output-csv", tmp_path / "p.csv")
    assert proc.returncode == 2 and "use --force" in proc.stderr and md.read_text() == "keep"
