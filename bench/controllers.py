"""Benchmark the admission controllers at one concurrency under the CPU quota, against the ideal.

    sudo .venv/bin/python bench_controllers.py                  # run the sweep (c=8), then print the table
    .venv/bin/python bench_controllers.py --from-results results # print the table from existing cells

The sweep runs, through run_experiments.sh (so inside the service cgroup, torn down on every exit path):
cgroups_threads at c=1 (the single-request time at the quota, S, that defines the ideal), then cgroups,
psi, cgroups_threads, psi_threads, limit1 and adaptive at --concurrency. For every limited configuration
found at that concurrency it prints p95 service and p95 end-to-end, each as a speedup over cgroups-only
(cgroups-only / config: > 1 is better) and against the ideal (config / ideal: 1 is ideal), the rejected
count, the share of requests the PSI gate deferred and the mean wait at admission (the gate's deferral, or the
queue of a concurrency limit). The ideal is a perfect one-at-a-time FIFO server with
service time S over the cell's real submission times (metrics.ideal_fifo, computed by analyze_results).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from llm_psi import REPO

HERE = REPO  # the repository root: the root scripts, reference/, results/
CONTROLLERS = ["cgroups", "psi", "cgroups_threads", "psi_threads", "limit1", "adaptive"]


def sweep(a) -> None:
    """Run the reference cell and the controllers' cells through the sweep script, in one interleaved sweep."""
    cmd = ["bash", os.path.join(HERE, "run_experiments.sh"), "--configs", " ".join(a.configs),
           "--concurrency", str(a.concurrency), "--cells", "cgroups_threads:1", "--results-dir", a.results_dir,
           "--num-requests", str(a.num_requests), "--max-new-tokens", str(a.max_new_tokens),
           "--trials", str(a.trials)]
    cmd += ["--tiny"] * a.tiny + ["--force"] * a.force + ["--resume"] * a.resume
    subprocess.run(cmd, check=True)


def table(results_dir: str, concurrency: int) -> tuple[list[str], str | None]:
    """Markdown lines of the controller table from the cells in results_dir, and the ideal's reference."""
    from llm_psi.analysis import analyze as ar
    an = ar.analyze(results_dir)
    s = an.summary[(an.summary["trial"] == "all") & (an.summary["concurrency"] == concurrency)
                   & an.summary["limited"]].set_index("config")
    if "cgroups" not in s.index:
        raise ar.AnalysisError(f"{results_dir}: no cgroups_c{concurrency} cell to compare against")
    base = s.loc["cgroups"]

    def cell(v, digits=2):
        return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"

    lines = [f"controllers at c={concurrency} under the quota; ideal: one-at-a-time FIFO with S = "
             f"{cell(an.ideal_ms / 1000 if an.ideal_ms else None)} s from {an.reference or '—'}",
             "",
             "| config | ok | rejected | p95 service (s) | speedup vs cgroups-only | / ideal | "
             "p95 e2e (s) | speedup vs cgroups-only | / ideal | gate deferred | mean wait at admission (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for config in ar.order(s.index):
        r = s.loc[config]
        deferred = "—" if not math.isfinite(r["gate_deferred_frac"]) else f"{100 * r['gate_deferred_frac']:.0f}%"
        lines.append(
            f"| {config} | {int(r['n_ok'])} | {int(r['n_rejected'])} | {cell(r['p95_service_ms'] / 1000)} | "
            f"{cell(base['p95_service_ms'] / r['p95_service_ms'])} | {cell(r['service_vs_ideal'])} | "
            f"{cell(r['p95_e2e_ms'] / 1000)} | {cell(base['p95_e2e_ms'] / r['p95_e2e_ms'])} | "
            f"{cell(r['e2e_vs_ideal'])} | {deferred} | {cell(r['mean_defer_ms'] / 1000)} |")
    return lines, an.reference


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=os.path.join("runs", "controllers"),
                   help="where the sweep writes its cells (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing cells there")
    p.add_argument("--resume", action="store_true", help="complete existing cells there")
    p.add_argument("--from-results", metavar="DIR", help="print the table from existing cells; run nothing")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--configs", nargs="+", default=CONTROLLERS, help="controller configs to sweep")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    a = p.parse_args(argv)
    for name in ("concurrency", "num_requests", "max_new_tokens", "trials"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    from llm_psi.analysis import analyze as ar
    try:
        if a.from_results is None:
            sweep(a)
        lines, _ = table(a.from_results or a.results_dir, a.concurrency)
    except subprocess.CalledProcessError as e:
        print(f"bench_controllers.py: error: the sweep failed (exit status {e.returncode})", file=sys.stderr)
        return e.returncode or 1
    except KeyboardInterrupt:
        print("bench_controllers.py: interrupted; finished cells are kept", file=sys.stderr)
        return 130
    except ar.AnalysisError as e:
        print(f"bench_controllers.py: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
