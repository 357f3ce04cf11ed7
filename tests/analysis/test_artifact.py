"""artifact.py and reference/artifact_results/: the paper's raw files give its Table I; the per-file facts,
the comparison with ours and the collapse bench's table, on hand-made files."""
import os

import numpy as np
import pandas as pd
import pytest

from llm_psi.analysis import artifact
from conftest import ROOT

REF = os.path.join(ROOT, "reference")
PAPER_COLUMNS = {"baseline": "baseline_p95_ms", "cgroups": "cgroups_only_p95_ms", "psi": "cgroups_psi_p95_ms"}


def test_raw_files_give_the_published_table_i():
    table = pd.read_csv(os.path.join(REF, "paper_table1.csv")).set_index("concurrency")
    checked = 0
    for config, column in PAPER_COLUMNS.items():
        for c, published in table[column].items():
            raw = pd.read_csv(os.path.join(REF, "artifact_results", f"{config}_c{c}.csv"))
            assert round(np.percentile(raw["latency_ms"], 95), 1) == published, (config, c)
            checked += 1
    assert checked == 12
    published = {(k, c): table.at[c, col] for k, col in PAPER_COLUMNS.items() for c in table.index}
    assert artifact.files(artifact.load(), published)["matches"].all()


def test_the_copy_carries_its_license():
    names = os.listdir(os.path.join(REF, "artifact_results"))
    assert sorted(n for n in names if n.endswith(".csv")) == sorted(f"{k}_c{c}.csv" for k in PAPER_COLUMNS
                                                                    for c in (1, 2, 4, 8))
    with open(os.path.join(REF, "artifact_results", "LICENSE")) as f:
        text = f.read()
    assert text.startswith("MIT License") and "Alex Gonzalez" in text


def write(d, name, rows):
    pd.DataFrame(rows, columns=artifact.COLUMNS).to_csv(os.path.join(d, name), index=False)


def test_files_idle_time_and_order(tmp_path):
    # serial: each row lands its own latency after the one before; gated: 2 s idle before the second request
    write(tmp_path, "psi_c1.csv", [(7200.0 + 1, 1000.0, 30), (7200.0 + 4, 1000.0, 31)])
    write(tmp_path, "baseline_c2.csv", [(1.0, 1000.0, 30), (3.0, 2000.0, 31), (6.0, 3000.0, 32)])
    f = artifact.files(artifact.load(str(tmp_path)), {("baseline", 2): 2900.0})
    assert list(zip(f["config"], f["concurrency"])) == [("baseline", 2), ("psi", 1)]  # recording order
    base, psi = f.iloc[0], f.iloc[1]
    assert (base["n"], base["idle_s"], base["min_idle_s"], base["median_s"]) == (3, 0.0, 0.0, 2.0)
    assert base["p95_ms"] == pytest.approx(np.percentile([1000, 2000, 3000], 95)) and base["matches"]
    assert (psi["idle_s"], psi["start_h"], psi["end_h"]) == pytest.approx((2.0, 7200 / 3600, 7203 / 3600))
    assert not psi["matches"]  # nothing published for it


@pytest.mark.parametrize("content, problem", [("timestamp,latency_ms\n1,2\n", "expected the columns"),
                                              ("timestamp,latency_ms,prompt_length\n1,x,3\n", "non-numeric")])
def test_bad_artifact_file_names_it(tmp_path, content, problem):
    (tmp_path / "baseline_c1.csv").write_text(content)
    with pytest.raises(artifact.ArtifactError, match=problem) as e:
        artifact.load(str(tmp_path))
    assert str(tmp_path / "baseline_c1.csv") in str(e.value)
    with pytest.raises(artifact.ArtifactError, match="no artifact files"):
        artifact.load(str(tmp_path / "absent"))


def collapse(tmp_path, rows):
    path = tmp_path / "collapse.csv"
    pd.DataFrame(rows, columns=artifact.COLLAPSE_COLUMNS).to_csv(path, index=False)
    return str(path)


def test_collapse_table_and_section(tmp_path):
    path = collapse(tmp_path, [("eager", "PASSIVE", "1", "unconstrained", 3, 2.0, 1.9, 2.1),
                               ("eager", "PASSIVE", "1", "quota", 3, 5.0, 4.8, 5.5),
                               ("eager", "ACTIVE", "4", "unconstrained", 3, 1.0, 0.9, 1.1),
                               ("eager", "ACTIVE", "4", "quota", 3, 30.0, 28.0, 35.0),
                               ("eager", "ACTIVE", "2", "quota", 3, 9.0, 8.0, 10.0)])
    table = artifact.collapse_slowdowns(artifact.load_collapse(path))
    got = {(r.omp_wait_policy, r.torch_threads): r.slowdown for r in table.itertuples()}
    assert got[("PASSIVE", "1")] == 2.5 and got[("ACTIVE", "4")] == 30.0 and np.isnan(got[("ACTIVE", "2")])
    art = artifact.load()
    ours = {("baseline", 1): [2.0, 2.0, 4.0], ("cgroups", 1): [5.0, 6.0, 7.0], ("limit1", None): [8.0]}
    text = "\n".join(artifact.section(art, artifact.files(art, {}), lambda k, c: ours.get((k, c), []),
                                      table, path))
    assert "Largest slowdown: 30.0× (eager, ACTIVE, 4)." in text
    quota, alone = (np.median(artifact.rows_of(art, k, 1)) for k in ("cgroups", "baseline"))
    assert f"{quota / alone:.1f}×" in text and f"{6.0 / 2.0:.1f}×" in text and f"{8.0 / 2.0:.1f}×" in text
    line = next(x for x in text.splitlines() if "ours: cgroups c=1" in x)
    assert [x.strip() for x in line.split("|")[3:8]] == ["3", "5.00", "6.00", f"{np.percentile([5, 6, 7], 95):.2f}",
                                                         "7.00"]
    missing = artifact.section(art, artifact.files(art, {}), lambda k, c: [], None, "x/collapse.csv")
    assert missing[-1].startswith("x/collapse.csv is not there")


def test_bad_collapse_file(tmp_path):
    assert artifact.load_collapse(str(tmp_path / "collapse.csv")) is None
    path = collapse(tmp_path, [("eager", "PASSIVE", "1", "throttled", 3, 2.0, 1.9, 2.1)])
    with pytest.raises(artifact.ArtifactError, match="condition"):
        artifact.load_collapse(path)
    (tmp_path / "collapse.csv").write_text("engine,condition\neager,quota\n")
    with pytest.raises(artifact.ArtifactError, match="missing columns"):
        artifact.load_collapse(path)
