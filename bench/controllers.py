"""The controller sweep: every further configuration beside cgroups-only under the paper's quota, in one
interleaved sweep, and its table with intervals over trials.

    sudo .venv/bin/python -m bench.controllers --results-dir results/controllers  # the committed sweep (~115 min)
    .venv/bin/python -m bench.controllers --from-results results/controllers      # the table from existing cells

The sweep runs through run_experiments.sh (inside the service cgroup, torn down on every exit path, trials
interleaved in a seeded order): cgroups-only and cgroups_threads, psi_threads, limit1, adaptive, batch, batch_fp32
(batch in float32: batching without int8) and batch_psi at each --concurrency, --trials trials of --num-requests requests. Then it prints the controller
table (llm_psi/analysis/controllers.py): each configuration's p95 end-to-end and service time with its ratio to
cgroups-only at the same level, each with a 95% interval over trials. `analyze_results.py` writes the same
table, speedups.csv and the per-cell sections to <results-dir>/table.md for results/controllers.
"""
from __future__ import annotations

import os
import subprocess
import sys

from llm_psi import REPO
from llm_psi.cli import OneLineParser, finite_number, int_list

CONTROLLERS = ["cgroups", "cgroups_threads", "psi_threads", "limit1", "adaptive", "batch", "batch_fp32", "batch_psi"]


def sweep(a) -> None:
    """Every configuration at every level through the sweep script, in one interleaved sweep."""
    cmd = ["bash", os.path.join(REPO, "run_experiments.sh"), "--configs", " ".join(a.configs),
           "--concurrency", " ".join(map(str, a.concurrency)), "--results-dir", a.results_dir,
           "--num-requests", str(a.num_requests), "--max-new-tokens", str(a.max_new_tokens),
           "--trials", str(a.trials)]
    cmd += ["--tiny"] * a.tiny + ["--force"] * a.force + ["--resume"] * a.resume
    subprocess.run(cmd, check=True)


def table(results_dir: str) -> list[str]:
    """The controller table's markdown lines from the cells in results_dir."""
    from llm_psi.analysis import analyze as ar
    from llm_psi.analysis.controllers import REFERENCE, controller_table
    an = ar.analyze(results_dir, controllers=True)
    if not any(k[0] == REFERENCE for k in an.used):
        raise ar.AnalysisError(f"{results_dir}: no complete {REFERENCE}_c<N> cell to compare against")
    return controller_table(an)


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m bench.controllers", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=os.path.join("runs", "controllers"),
                   help="where the sweep writes its cells (default: %(default)s; the committed one: "
                        "results/controllers)")
    p.add_argument("--force", action="store_true", help="replace existing cells there")
    p.add_argument("--resume", action="store_true", help="complete existing cells there")
    p.add_argument("--from-results", metavar="DIR", help="print the table from existing cells; run nothing")
    p.add_argument("--concurrency", type=int_list, default=[1, 8], metavar="LIST",
                   help="levels of every configuration (default: 1 8)")
    p.add_argument("--num-requests", type=finite_number(int, ge=1), default=20, help="per trial (default: 20)")
    p.add_argument("--max-new-tokens", type=finite_number(int, ge=1), default=50, help="(default: 50)")
    p.add_argument("--trials", type=finite_number(int, ge=1), default=5, help="per cell (default: 5)")
    p.add_argument("--configs", nargs="+", default=CONTROLLERS,
                   help=f"configurations to sweep (default: {' '.join(CONTROLLERS)})")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    a = p.parse_args(argv)
    from llm_psi.analysis import analyze as ar
    try:
        if a.from_results is None:
            sweep(a)
        lines = table(a.from_results or a.results_dir)
    except subprocess.CalledProcessError as e:
        print(f"{p.prog}: error: the sweep failed (exit status {e.returncode})", file=sys.stderr)
        return e.returncode or 1
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted; finished cells are kept", file=sys.stderr)
        return 130
    except ar.AnalysisError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
