"""Every numeric option of every command-line tool rejects nan, inf, negatives and (where it means nothing)
zero: one line on stderr, exit status 2, and nothing written or created."""
import os
import subprocess

import pytest

from conftest import ROOT
from llm_psi import cgroups
from llm_psi.cgroups import command
from llm_psi.service import server as llm_server
from bench import psi as psi_bench
from llm_psi.load import generator as request_generator

BAD = ("nan", "inf", "-1")
# option: also reject zero?
GENERATOR = {"--concurrency": True, "--num-requests": True, "--spacing-ms": False, "--trials": True,
             "--trial": True, "--run-index": False, "--timeline-interval-ms": True, "--max-new-tokens": True,
             "--temperature": True, "--seed": False, "--torch-threads": True, "--max-batch": True,
             "--concurrency-limit": True, "--psi-threshold": False, "--psi-interval-ms": True,
             "--psi-max-checks": True, "--adaptive-low-pct": False, "--adaptive-high-pct": True,
             "--adaptive-tolerance": True, "--rate": True, "--burstiness": True, "--duration": True,
             "--max-concurrency": True, "--wait-ready-s": False, "--antagonist-quota": True, "--max-waiting": False,
             "--adaptive-max": True}
SWEEP = {"--concurrency": True, "--num-requests": True, "--max-new-tokens": True, "--trials": True,
         "--seed": False, "--cpu-quota": True, "--cpu-period-us": True, "--memory-max": True}
CGROUP_RUN = {"--cpu-quota": True, "--cpu-period-us": True, "--memory-max": True}
PSI_BENCH = {"--threshold": True, "--seconds": True}
SERVE = {"--port": False, "--retry-after-s": True, "--drain-timeout-s": True, "--psi-threshold": False,
         "--max-waiting": False, "--max-batch": True}


def cases(table):
    return [(opt, v) for opt, zero in table.items() for v in BAD + (("0",) if zero else ())]


def exit_status(main, argv):
    """main(argv)'s exit status, whether it returns it or raises SystemExit (argparse's way)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_line_exit_2(rc, err):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "error" in lines[0], err


@pytest.mark.parametrize("opt, value", cases(GENERATOR))
def test_generator(opt, value, tmp_path, capsys):
    out = tmp_path / "out" / "cell.csv"
    rc = request_generator.main(["--tiny", "--output", str(out), f"{opt}={value}"])
    one_line_exit_2(rc, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["run_experiments.sh", "run_psi_experiments.sh"])
@pytest.mark.parametrize("opt, value", cases(SWEEP))
def test_sweep_scripts(script, opt, value, tmp_path):
    p = subprocess.run(["bash", os.path.join(ROOT, script), "--results-dir", str(tmp_path / "r"), opt, value],
                       capture_output=True, text=True, timeout=60)
    one_line_exit_2(p.returncode, p.stderr)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("opt, value", cases(CGROUP_RUN))
def test_cgroup_lib_run(opt, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cgroups.cell, "create", lambda *a, **k: pytest.fail("a cgroup was about to be created"))
    rc = exit_status(command.main, ["run", "--name", "validation_test", f"{opt}={value}", "--", "true"])
    one_line_exit_2(rc, capsys.readouterr().err)


@pytest.mark.parametrize("opt, value", cases(PSI_BENCH))
def test_psi_bench(opt, value, capsys, monkeypatch):
    monkeypatch.setattr(cgroups, "create", lambda *a, **k: pytest.fail("a cgroup was about to be created"))
    rc = exit_status(psi_bench.main, [f"{opt}={value}"])
    one_line_exit_2(rc, capsys.readouterr().err)


@pytest.mark.parametrize("opt, value", cases(SERVE))
def test_llm_server_serve(opt, value, capsys, monkeypatch):
    from llm_psi.service import http_app as http_api
    monkeypatch.setattr(http_api, "serve", lambda *a, **k: pytest.fail("the server was about to start"))
    rc = exit_status(llm_server.main, ["serve", "--tiny", f"{opt}={value}"])
    one_line_exit_2(rc, capsys.readouterr().err)


def test_list_types_take_spaces_or_commas_once_each_and_refuse_the_rest():
    import argparse
    from llm_psi import cli
    assert cli.int_list("8, 1 8,2") == [8, 1, 2]
    assert cli.word_list(("loop", "generate"))("generate,loop generate") == ["generate", "loop"]
    for bad in ("", "1 x", "0", "1 -2", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.int_list(bad)
    for bad in ("", "loop nope"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected words from loop, generate"):
            cli.word_list(("loop", "generate"))(bad)


@pytest.mark.parametrize("bench, argv", [("bench.threads", ["--threads", "1 0"]), ("bench.threads", ["--policies", "x"]),
                                         ("bench.collapse", ["--engines", "x"]), ("bench.collapse", ["--reps", "0"]),
                                         ("bench.engines", ["--batches", "1,a"]), ("bench.engines", ["--engines", "x"])])
def test_bench_list_options_exit_2_in_one_line(bench, argv):
    import sys
    p = subprocess.run([sys.executable, "-m", bench, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    one_line_exit_2(p.returncode, p.stderr)
