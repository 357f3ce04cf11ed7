"""PSI-gated admission: pressure reading, the paper's gate, kernel triggers, a timeline sampler.

    python psi_admission.py --show [-v]   # current pressure of every source, one JSON line

(psi_bench.py is the benchmark: admit() overhead and reaction times to a CPU step load.)

This module is the psi_admission.py command; the parts live beside it: control.pressure (PSI files, stall
share, kernel triggers, the detector, the probe) and control.gate (the paper's gate and the concurrency limit).
"""
from __future__ import annotations

import json
import logging
import os
import sys

from llm_psi import cgroups
from llm_psi import cli
from llm_psi.control.pressure import PressureFile, PsiUnavailable, cell_probe


def show() -> dict:
    """Current pressure of every available source."""
    def read_all(path_of):
        out = {}
        for res in ("cpu", "memory", "io"):
            path = path_of(res)
            try:
                out[res] = PressureFile(path).read() if path else None
            except (PsiUnavailable, ValueError) as e:
                out[res] = {"error": str(e)}
        return out
    cg = cgroups.pressure_path("cpu")
    return {"system": read_all(cgroups.system_pressure_path),
            "cgroup": {"dir": os.path.dirname(cg), **read_all(cgroups.pressure_path)} if cg else None,
            "throttling": cell_probe().counters()}


def run_cli(prog: str, verbose: bool, action) -> int:
    """A command's body: log at DEBUG with verbose, print action()'s result as one JSON line; exit status 1 on
    PSI or cgroup errors, 130 on Ctrl-C (the bench's load and cgroup are gone by then)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        print(json.dumps(action()))
    except (PsiUnavailable, OSError, cgroups.CgroupError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; load stopped and cgroup removed", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    p = cli.OneLineParser(prog="psi_admission.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--show", action="store_true", required=True, help="current pressure of every source, one JSON line")
    p.add_argument("-v", "--verbose", action="store_true", help="log every decision and trigger event")
    argv = sys.argv[1:] if argv is None else argv
    if any(arg.startswith("--bench") for arg in argv):
        p.error("the benchmark is its own command now: psi_bench.py [--threshold PCT] [--seconds S] [-v]")
    a = p.parse_args(argv)

    def checked_show() -> dict:
        PressureFile(cgroups.system_pressure_path("cpu")).read()   # no system PSI: exit status 1
        return show()
    return run_cli("psi_admission.py", a.verbose, checked_show)
