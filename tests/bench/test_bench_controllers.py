"""bench_controllers.py's table from synthetic cells: speedups over cgroups-only and ratios to the ideal."""
import numpy as np

from bench import controllers as bc
from helpers import write_cell

E2E = np.arange(1, 21, dtype=float)


def test_table_ratios(tmp_path, capsys):
    write_cell(tmp_path, "cgroups_threads", 1, np.full(20, 4.0))          # S = 4 s
    write_cell(tmp_path, "cgroups", 8, E2E * 5, service_s=E2E * 2)         # p95 e2e 95.25 s, service 38.1 s
    write_cell(tmp_path, "limit1", 8, E2E * 4, service_s=np.full(20, 4.0),
               gate=[("admitted", 1, 0.0)] * 20)
    lines, reference = bc.table(str(tmp_path), 8)
    assert reference == "cgroups_threads_c1"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines
            if line.startswith("| ") and not line.startswith("| config")}
    ok, rejected, svc, svc_speedup, svc_ideal, e2e, e2e_speedup, e2e_ideal, deferred, wait = rows["limit1"]
    assert (ok, rejected, svc, svc_ideal) == ("20", "0", "4.00", "1.00")
    assert svc_speedup == f"{38.1 / 4.0:.2f}" and e2e_speedup == f"{95.25 / 76.2:.2f}"
    assert deferred == "0%" and wait == "0.00"
    assert rows["cgroups"][3] == "1.00" and rows["cgroups"][8] == "—"


def test_missing_cgroups_cell_is_an_error(tmp_path, capsys):
    write_cell(tmp_path, "limit1", 8, E2E)
    assert bc.main(["--from-results", str(tmp_path)]) == 2
    assert "no cgroups_c8 cell" in capsys.readouterr().err
