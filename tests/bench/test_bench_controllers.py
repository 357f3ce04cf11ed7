"""bench.controllers: the controller table from synthetic cells (ratios to cgroups-only with intervals), the
sweep command it runs, and its refusals."""
import numpy as np
import pytest

from bench import controllers as bc
from helpers import write_cell

E2E = np.arange(1, 21, dtype=float)


def test_table_from_results(tmp_path, capsys):
    for c in (1, 8):
        write_cell(tmp_path, "cgroups", c, E2E * 5, service_s=E2E * 2, trials=2, scale=[1.0, 1.2])
        write_cell(tmp_path, "limit1", c, E2E * 4, service_s=np.full(20, 4.0), trials=2, scale=[1.0, 0.9])
    assert bc.main(["--from-results", str(tmp_path)]) == 0
    rows = [[x.strip() for x in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| limit1")]
    assert [r[1] for r in rows] == ["1", "8"]
    # c=8 e2e p95 per trial: cgroups 95.25, 114.3 s; limit1 76.2, 68.58 s: geometric means' ratio 0.693
    assert rows[1][4].startswith("0.69 [") and rows[1][3].startswith("72.39 [")
    assert rows[1][4].endswith("]")


def test_sweep_runs_every_configuration_interleaved(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bc.subprocess, "run", lambda cmd, check: seen.append(cmd))
    monkeypatch.setattr(bc, "table", lambda d: ["| table |"])
    assert bc.main(["--results-dir", str(tmp_path), "--trials", "5", "--concurrency", "1,8"]) == 0
    cmd = seen[0]
    assert cmd[1].endswith("run_experiments.sh")
    assert cmd[cmd.index("--configs") + 1] == " ".join(bc.CONTROLLERS) and bc.CONTROLLERS[0] == "cgroups"
    assert cmd[cmd.index("--concurrency") + 1] == "1 8" and cmd[cmd.index("--trials") + 1] == "5"


def test_missing_cgroups_cell_is_an_error(tmp_path, capsys):
    write_cell(tmp_path, "limit1", 8, E2E, trials=2)
    assert bc.main(["--from-results", str(tmp_path)]) == 2
    assert "no complete cgroups_c<N> cell" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--concurrency", ""], ["--trials", "0"],
                                  ["--num-requests", "x"]])
def test_bad_values_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        bc.main(args)
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
