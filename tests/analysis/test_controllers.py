"""The controller sweep (results/controllers): its own table.md, summary and speedups.csv, every further
configuration against cgroups-only at each level, with intervals; the main table does not read it."""
import pandas as pd
import pytest

from helpers import write_cell
from llm_psi.analysis import analyze as ar
from llm_psi.analysis.tables import SPEEDUP_COLUMNS

import numpy as np

E2E = np.arange(1, 21, dtype=float)


def sweep(d):
    d.mkdir()
    for c in (1, 8):
        write_cell(d, "cgroups", c, E2E * c, trials=3, scale=[1.0, 1.1, 0.9])
        write_cell(d, "batch", c, E2E * c / 4, trials=3, scale=[1.0, 0.95, 1.05])
        write_cell(d, "limit1", c, E2E * c / 2, trials=3, scale=[1.0, 1.2, 0.8])


def test_controller_sweep_has_its_own_table_and_speedups(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 1, E2E)
    sweep(tmp_path / "controllers")
    assert ar.main(["--results-dir", str(tmp_path), "--no-figures"]) == 0
    table = (tmp_path / "controllers" / "table.md").read_text()
    assert table.startswith("# Controllers under the quota, against cgroups-only, in one sweep")
    row = next(x for x in table.splitlines() if x.startswith("| batch ") and "| 8 " in x)
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells[:3] == ["batch", "8", "3"] and cells[4].startswith("0.25 [") and cells[-1] == "0"
    assert "| cgroups-only " in table and "reference" in table and "## Drift over the run order" in table
    sp = pd.read_csv(tmp_path / "controllers" / "speedups.csv")
    assert list(sp.columns) == SPEEDUP_COLUMNS
    vs = sp[sp.reference_config == "cgroups"]
    assert sorted(set(zip(vs.config, vs.concurrency))) == [("batch", 1), ("batch", 8), ("limit1", 1), ("limit1", 8)]
    batch = vs[(vs.config == "batch") & (vs.concurrency == 8) & (vs.metric == "e2e")].iloc[0]
    assert batch.ratio == pytest.approx(0.25, rel=0.05) and batch.ci_lo < batch.ratio < batch.ci_hi
    assert "| batch " not in (tmp_path / "table.md").read_text()   # the main table reads only its own folder
    assert "controller table" in capsys.readouterr().err


def test_an_empty_controllers_dir_given_explicitly_is_an_error(tmp_path, capsys):
    write_cell(tmp_path, "baseline", 1, E2E)
    (tmp_path / "none").mkdir()
    assert ar.main(["--results-dir", str(tmp_path), "--no-figures", "--controllers-dir", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().endswith("none: no cell files")


def test_the_glance_names_a_precision_confound():
    """paper.pdf's line on the controllers' best ratio says when that configuration ran another precision than
    cgroups-only (batch: int8 against float32), and says nothing when they match."""
    from types import SimpleNamespace
    from llm_psi.analysis.paper import _confound
    cell = lambda q: SimpleNamespace(meta={"config": {"dtype": "float32", "quantize": q}})  # noqa: E731
    ctl = SimpleNamespace(cells={("cgroups", 8): cell("none"), ("batch", 8): cell("int8"),
                                 ("batch_fp32", 8): cell("none")})
    assert "float32/int8 against cgroups-only's float32/none" in _confound(ctl, "batch", 8)
    assert "does not separate the controller from the precision" in _confound(ctl, "batch", 8)
    assert _confound(ctl, "batch_fp32", 8) == "" and _confound(ctl, "limit1", 8) == ""
