"""The paper's engine at the paper's cost: our `cgroups` cell's engine against a re-creation of the paper's
server, one request at a time, under the paper's quota (50% of one CPU, ``cgroup_lib.py run``; as root, else
unconstrained with a message), A/B interleaved in fresh processes.

    python -m bench.paper_cost                       # results/collapse_paper.{csv,md}, beside collapse.md (as root)
    python -m bench.paper_cost --tiny --rounds 1 --requests 1 --tokens 3 --output-csv /tmp/p.csv --output-md /tmp/p.md

Variants (each round runs every variant once, in this order, in a fresh process):

- ``paper``: ``bench/paper_cost/paper_server.py``, the paper's ``llm_server.py`` re-created (its generate()
  call and stdin loop; seeded random weights, no network), fed the prompts on stdin as the paper's
  ``request_generator.py`` does at concurrency 1; its own ``latency_ms`` (tokenize, generate, decode);
- ``ours_args``: the same server, with our ``generate`` engine's arguments added to the paper's call (a
  per-token streamer, ``min_new_tokens``, ``pad_token_id``);
- ``ours_engine``: the same server's stdin loop serving with our ``--engine generate`` (engine/loop.py);
- ``ours``: ``request_generator.py --config cgroups`` (the ``baseline`` label without a quota), the way a
  sweep runs the paper's cell: the load generator in the engine's process, the engine (``generate``) built
  and run on one thread of its own (``--engine-thread one``, the label's preset); its ``service_ms`` (the
  engine's own: tokenize, generate);
- ``ours_caller``: the same with ``--engine-thread caller``: the engine built on the main thread and called
  from the load generator's worker thread, as the paper's cells ran before (the 0.59-0.78 of the paper's time).

Every process starts with no OMP_NUM_THREADS, MKL_NUM_THREADS or OMP_WAIT_POLICY, as the paper's code ran.
The first request of each server process is dropped (the generator warms up untimed). Writes a CSV (one row
per timed request) and a markdown table: per variant the median over its processes' medians, and the
ratio to ``paper`` with a 95% interval over processes (stats.trial_ratio); printed too. Each process loads the
124M model (~20 s under the quota) and serves --requests + 1 requests of --tokens tokens (~5-10 s each).
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import statistics
import sys
import tempfile

from llm_psi import REPO
from llm_psi.cli import OneLineParser, finite_number, word_list
from llm_psi.config import PROMPTS
from llm_psi.load import runner

PROG = "python -m bench.paper_cost"
VARIANTS = ("paper", "ours_args", "ours_engine", "ours", "ours_caller")
GENERATOR = ("ours", "ours_caller")   # request_generator.py cells; the others: paper_server.py
SERVER = os.path.join(REPO, "bench", "paper_cost", "paper_server.py")
COLUMNS = ["variant", "round", "request", "latency_s", "constrained"]


def build_parser():
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=finite_number(int, ge=1), default=4,
                   help="fresh processes per variant, interleaved (default: 4)")
    p.add_argument("--requests", type=finite_number(int, ge=1), default=3,
                   help="timed requests per process (default: 3)")
    p.add_argument("--tokens", type=finite_number(int, ge=1), default=50, help="new tokens (default: 50)")
    p.add_argument("--variants", type=word_list(VARIANTS), default=list(VARIANTS), metavar="LIST",
                   help=f"of {' '.join(VARIANTS)} (default: all)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (smoke tests; paper_server runs 124M)")
    p.add_argument("--no-quota", action="store_true", help="run unconstrained")
    p.add_argument("--output-csv", default=os.path.join("results", "collapse_paper.csv"),
                   help="one row per timed request (default: results/collapse_paper.csv)")
    p.add_argument("--output-md", default=os.path.join("results", "collapse_paper.md"),
                   help="the side-by-side table (default: results/collapse_paper.md)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def paper_env() -> dict:
    """The environment as the paper's code ran: no thread or OpenMP variable; our package importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def server_cmd(args, variant) -> tuple[list, dict, str]:
    """argv, environment and stdin of a paper_server process serving --requests + 1 prompts."""
    env = dict(paper_env(), LLM_PSI_PAPER_VARIANT=variant, LLM_PSI_PAPER_TOKENS=str(args.tokens))
    if args.tiny:
        env["LLM_PSI_PAPER_TINY"] = "1"
    prompts = "".join(PROMPTS[i % len(PROMPTS)] + "\n" for i in range(args.requests + 1))
    return [sys.executable, SERVER], env, prompts


def run_variant(args, variant, rnd, constrained, tmp) -> list[float]:
    """One fresh process of ``variant``: its timed requests' latencies in seconds."""
    from bench.collapse import run_child
    if variant in GENERATOR:
        out = os.path.join(tmp, f"{variant}_{rnd}.csv")
        cmd = [sys.executable, os.path.join(REPO, "request_generator.py"), "--config",
               "cgroups" if constrained else "baseline", "--engine", "generate", "--num-requests", str(args.requests),
               "--max-new-tokens", str(args.tokens), "--output", out, "--quiet", "--force",
               "--engine-thread", "caller" if variant == "ours_caller" else "one"]
        cmd += ["--tiny"] if args.tiny else []
        env, stdin = paper_env(), None
    else:
        cmd, env, stdin = server_cmd(args, variant)
    if constrained:
        cmd = runner.wrap(cmd, True, name=f"paper_cost_{os.getpid()}_{rnd}_{variant}")
    status, stdout, err = run_child(cmd, env, input=stdin)
    if status != 0:
        raise RuntimeError(f"{variant}, round {rnd}: exit {status}: {(err.strip().splitlines() or [''])[-1]}")
    if variant in GENERATOR:
        with open(out) as f:
            return [float(r["service_ms"]) / 1000 for r in csv.DictReader(f) if r["status"] == "ok"]
    lines = [line.split(",") for line in stdout.strip().splitlines() if line.count(",") == 2]
    return [float(ms) / 1000 for _, ms, _ in lines][1:]   # the first request warms the process up


def summarize(rows) -> list[dict]:
    from llm_psi.analysis.stats import trial_ratio
    per_proc = {}
    for r in rows:
        per_proc.setdefault(r["variant"], {}).setdefault(r["round"], []).append(r["latency_s"])
    medians = {v: [statistics.median(t) for t in rounds.values()] for v, rounds in per_proc.items()}
    out = []
    for v, m in medians.items():
        ratio, lo, hi = trial_ratio(m, medians["paper"]) if "paper" in medians else (float("nan"),) * 3
        out.append(dict(variant=v, processes=len(m), requests=sum(len(t) for t in per_proc[v].values()),
                        median_s=statistics.median(m), ratio=ratio, ci_lo=lo, ci_hi=hi))
    return out


def markdown(summary, args, constrained) -> str:
    lines = [f"# The paper's engine at the paper's cost ({'tiny' if args.tiny else '124M'} architecture, "
             f"{args.tokens} tokens, {'50% of one CPU' if constrained else 'unconstrained'}, one request at a "
             f"time, {args.rounds} interleaved round(s) of fresh processes)", "",
             "Ratio: geometric mean of the variant's per-process medians over the paper re-creation's, with a 95% "
             "interval over processes. `paper` is a re-creation (bench/paper_cost/paper_server.py: seeded "
             "random weights, no network).", "",
             "| variant | processes | requests | median s | / paper | 95% interval |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for s in summary:
        ci = "—" if s["ci_lo"] != s["ci_lo"] else f"{s['ci_lo']:.2f}–{s['ci_hi']:.2f}"
        lines.append(f"| {s['variant']} | {s['processes']} | {s['requests']} | {s['median_s']:.2f} "
                     f"| {s['ratio']:.2f} | {ci} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    paths = {"requests.csv": args.output_csv, "summary.md": args.output_md}
    for path in paths.values():
        if os.path.exists(path) and not args.force:
            print(f"{PROG}: error: {path} exists; use --force to overwrite it", file=sys.stderr)
            return 2
    constrained = not args.no_quota and os.geteuid() == 0
    if not args.no_quota and not constrained:
        print(f"{PROG}: not root: running unconstrained (no quota)", file=sys.stderr)
    for path in paths.values():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    signal.signal(signal.SIGTERM, _sigterm)
    plan = [(rnd, v) for rnd in range(args.rounds) for v in args.variants]
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp, open(paths["requests.csv"], "w", newline="") as f:
            sink = csv.DictWriter(f, COLUMNS)
            sink.writeheader()
            for n, (rnd, variant) in enumerate(plan, 1):
                got = [dict(variant=variant, round=rnd, request=i, latency_s=round(t, 4), constrained=constrained)
                       for i, t in enumerate(run_variant(args, variant, rnd, constrained, tmp))]
                sink.writerows(got)
                f.flush()
                rows += got
                if not args.quiet:
                    print(f"[{n}/{len(plan)}] {variant}, round {rnd}: "
                          + " ".join(f"{r['latency_s']:.2f}" for r in got) + " s", file=sys.stderr, flush=True)
    except (KeyboardInterrupt, RuntimeError) as e:
        print(f"{PROG}: {'interrupted' if isinstance(e, KeyboardInterrupt) else f'error: {e}'}; finished rows kept "
              f"in {paths['requests.csv']}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    table = markdown(summarize(rows), args, constrained)
    with open(paths["summary.md"], "w") as f:
        f.write(table)
    print(table, end="")
    return 0


def _sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
