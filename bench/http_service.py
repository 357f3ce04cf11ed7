"""What the HTTP path adds: p95 end-to-end at c=8 under the CPU quota, service over HTTP vs in-process.

    sudo .venv/bin/python -m bench.http_service         # 2 trials of each mode, alternating; then the figures
    .venv/bin/python -m bench.http_service --from-results runs/http_bench

In-process, the generator and the service share one process inside the cell's cgroup (the paper's way).
Over HTTP, ``llm_server.py serve`` alone runs in the cgroup (its event loop, SSE encoding and request threads
share the quota with generation) and the generator sends requests from outside, timing them at the client.
Trials alternate between the modes so that a drifting host loads both alike. The ratio is of the means of
the per-trial p95s (trial_stats.trial_ratio: geometric means, Welch interval on the logs).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from llm_psi.cli import OneLineParser, finite_number
from llm_psi import REPO
from llm_psi.load import runner

HERE = REPO  # the repository root: the root scripts, reference/, results/
COUNT = finite_number(int, ge=1)
MODES = ("in-process", "service")
PROG = "python -m bench.http_service"


def _cell(a, mode) -> str:
    return os.path.join(a.results_dir, mode, f"{a.config}_c{a.concurrency}.csv")


def run_trial(a, mode: str, trial: int) -> None:
    py = sys.executable
    out = _cell(a, mode)
    def in_cell(cmd):
        return runner.wrap(cmd, True, meta=out[:-4] + ".json", quota=a.cpu_quota)
    gen = [py, os.path.join(HERE, "request_generator.py"), "--config", a.config, "--concurrency", str(a.concurrency),
           "--num-requests", str(a.num_requests), "--max-new-tokens", str(a.max_new_tokens), "--trials",
           str(a.trials), "--trial", str(trial), "--output", out, "--quiet",
           "--force" if trial == 1 else "--resume"] + ["--tiny"] * a.tiny
    print(f"trial {trial}/{a.trials}: {mode} -> {out}", file=sys.stderr, flush=True)
    if mode == "in-process":
        subprocess.run(in_cell(gen), check=True)
        return
    server = subprocess.Popen(in_cell([py, os.path.join(HERE, "llm_server.py"), "serve", "--config", a.config,
                                       "--port", str(a.port)] + ["--tiny"] * a.tiny))
    try:
        subprocess.run(gen + ["--target", f"http://127.0.0.1:{a.port}", "--wait-ready-s", "600"], check=True)
    finally:
        server.send_signal(signal.SIGTERM)  # drains; cgroup_lib forwards it and removes the cgroup
        server.wait(timeout=120)


def figures(a) -> list[str]:
    import pandas as pd

    from llm_psi.analysis import metrics
    from llm_psi.analysis import stats as trial_stats
    p95 = {}
    for mode in MODES:
        df = pd.read_csv(_cell(a, mode))
        p95[mode] = [metrics.summarize(g)["p95_e2e_ms"] / 1000 for _, g in df.groupby("trial")]
    lines = [f"{a.config} c={a.concurrency}, {a.num_requests} requests x {a.max_new_tokens} tokens, quota "
             f"{a.cpu_quota}% of one CPU; p95 end-to-end per trial (s):"]
    for mode in MODES:
        lines.append(f"  {mode:10s} " + "  ".join(f"{v:.2f}" for v in p95[mode]))
    ratio, lo, hi = trial_stats.trial_ratio(p95["service"], p95["in-process"])
    lines.append(f"HTTP / in-process: {ratio:.3f} [{lo:.3f}-{hi:.3f}] (95% interval; "
                 f"{len(p95['service'])} vs {len(p95['in-process'])} trials)")
    return lines


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=os.path.join("runs", "http_bench"), help="(default: %(default)s)")
    p.add_argument("--from-results", action="store_true", help="print the figures from existing cells")
    p.add_argument("--config", default="cgroups", help="a limited config (default: %(default)s)")
    p.add_argument("--concurrency", type=COUNT, default=8, help="(default: %(default)s)")
    p.add_argument("--num-requests", type=COUNT, default=20, help="(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=COUNT, default=50, help="(default: %(default)s)")
    p.add_argument("--trials", type=COUNT, default=2, help="trials per mode, alternating (default: %(default)s)")
    p.add_argument("--cpu-quota", type=finite_number(float, gt=0), default=50.0,
                   help="percent of one CPU (default: %(default)s)")
    p.add_argument("--port", type=finite_number(int, ge=1, le=65535), default=18001, help="(default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    a = p.parse_args(argv)
    try:
        if not a.from_results:
            for trial in range(1, a.trials + 1):
                for mode in (MODES if trial % 2 else MODES[::-1]):
                    run_trial(a, mode, trial)
        print("\n".join(figures(a)))
    except subprocess.CalledProcessError as e:
        print(f"{PROG}: error: a trial failed (exit status {e.returncode})", file=sys.stderr)
        return e.returncode or 1
    except (OSError, KeyError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished trials are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
