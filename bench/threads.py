"""The two-thread question: why do two torch threads under a half-CPU quota settle at one of two speeds?

    python -m bench.threads                       # full: results/threads/ (as root, under the quota)
    python -m bench.threads --tiny --procs 1 --requests 1 --tokens 5 --output-dir /tmp/t

One cell, many fresh processes: for each of --procs rounds, and in each round for every torch thread count
(--threads) and OMP_WAIT_POLICY (--policies), a new worker process runs inside its own cgroup at 50% of one
CPU (``cgroup_lib.py run``; root only, else unconstrained with a message). The rounds interleave the
settings, so a drift of the host touches them alike. The worker loads the model (the 124M architecture, seeded
weights, or --tiny), runs an untimed warm-up, then --requests single requests of --tokens tokens, one after
the other. For every request it records:

- the service time (the engine's own, generation start to last token), wall and process CPU seconds;
- the cgroup's ``cpu.stat`` deltas: periods, ``nr_throttled`` and throttled time;
- the scheduler's view of every thread of the process, summed (``/proc/self/task/*/schedstat``: time on the
  CPU, time waiting on a run queue, timeslices), and the main thread's and the others' CPU time apart;
- ``nr_voluntary_switches``/``nr_involuntary_switches`` (``/proc/self/task/*/sched``, where present).

Writes requests.csv (one row per request), summary.csv and summary.md (per setting: the distribution, and
where it splits in two at its largest gap, the two modes side by side with their counters).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import signal
import statistics
import sys
import time

from llm_psi import REPO
from llm_psi.cli import OneLineParser, finite_number, int_list, word_list

PROG = "python -m bench.threads"
PROMPT = "Explain the theory of relativity."
POLICIES = ("unset", "passive", "active")   # unset: no OMP_WAIT_POLICY, as the paper's code runs
QUOTA = ["--cpu-quota", "50", "--cpu-period-us", "100000", "--memory-max", "4G"]
COLUMNS = ["engine", "torch_threads", "omp_wait_policy", "constrained", "proc", "request", "service_s", "wall_s",
           "cpu_s", "nr_periods", "nr_throttled", "throttled_ms", "run_ms", "wait_ms", "timeslices", "run_ms_main",
           "run_ms_others", "tasks", "voluntary_switches", "involuntary_switches"]
SPLIT = 1.3   # a gap between consecutive sorted times of at least this ratio splits a setting's times in two


def build_parser():
    from llm_psi.config import ENGINES
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=finite_number(int, ge=1), default=20,
                   help="fresh processes per setting (default: 20)")
    p.add_argument("--requests", type=finite_number(int, ge=1), default=3,
                   help="timed requests per process, one after the other (default: 3)")
    p.add_argument("--threads", type=int_list, default=[1, 2], metavar="LIST", help="torch threads (default: 1 2)")
    p.add_argument("--policies", type=word_list(POLICIES), default=["passive", "active"], metavar="LIST",
                   help="OMP_WAIT_POLICY values, of unset passive active; unset leaves the variable out of the "
                        "worker's environment, as the paper's code runs (default: passive active)")
    p.add_argument("--engines", type=word_list(ENGINES), default=["loop"], metavar="LIST",
                   help=f"engines, of {' '.join(ENGINES)} (default: loop)")
    p.add_argument("--tokens", type=finite_number(int, ge=1), default=50, help="tokens per request (default: 50)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    p.add_argument("--no-quota", action="store_true", help="run unconstrained (default: under 50%% of one CPU)")
    p.add_argument("--output-dir", default=os.path.join("results", "threads"),
                   help="where the outputs go (default: results/threads)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


# --- the worker: one process, its requests and their counters --------------------------------------------
def _fields(path: str) -> dict:
    """``key : value`` lines of /proc/<pid>/task/<tid>/sched as numbers (others skipped)."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                try:
                    out[key.strip()] = float(value)
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def sched_snapshot() -> dict:
    """Per thread of this process: (run ns, wait ns, timeslices) from schedstat, switches from sched."""
    tasks = {}
    for d in glob.glob("/proc/self/task/*"):
        try:
            with open(os.path.join(d, "schedstat")) as f:
                run, wait, slices = (int(x) for x in f.read().split()[:3])
        except (OSError, ValueError):
            continue
        sched = _fields(os.path.join(d, "sched"))
        tasks[int(os.path.basename(d))] = (run, wait, slices, sched.get("nr_voluntary_switches"),
                                           sched.get("nr_involuntary_switches"))
    return tasks


def sched_delta(before: dict, after: dict) -> dict:
    """Summed over threads (a thread born in between counts from zero); the main thread's run time apart."""
    diff = {tid: [a - (before.get(tid, (0,) * 5)[i] or 0) if a is not None else None for i, a in enumerate(v)]
            for tid, v in after.items()}
    main = diff.get(os.getpid(), [0] * 5)

    def total(i):
        vals = [d[i] for d in diff.values()]
        return None if any(v is None for v in vals) else sum(vals)
    return {"run_ms": total(0) / 1e6, "wait_ms": total(1) / 1e6, "timeslices": total(2),
            "run_ms_main": main[0] / 1e6, "run_ms_others": (total(0) - main[0]) / 1e6, "tasks": len(diff),
            "voluntary_switches": total(3), "involuntary_switches": total(4)}


def worker(args) -> int:
    from llm_psi import cgroups
    from llm_psi.engine.loop import make_engine
    engine = make_engine(args.engines[0], tiny=args.tiny, seed=0, torch_threads=args.threads[0])
    engine.generate(PROMPT, min(args.tokens, 5), seed=0)  # warm-up, untimed
    probe = cgroups.CgroupProbe()
    rows = []
    for i in range(args.requests):
        cg0, s0, cpu0, wall0 = probe.counters(), sched_snapshot(), time.process_time(), time.monotonic()
        g = engine.generate(PROMPT, args.tokens, seed=i + 1)
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        cg = cgroups.counter_delta(cg0, probe.counters()) or {}
        throttled = cg.get("throttled_usec")
        rows.append(dict(request=i, service_s=round(g.t_end - g.t_start, 4), wall_s=round(wall, 4),
                         cpu_s=round(cpu, 4), nr_periods=cg.get("nr_periods"), nr_throttled=cg.get("nr_throttled"),
                         throttled_ms=None if throttled is None else throttled / 1000,
                         **sched_delta(s0, sched_snapshot())))
    quota = cgroups.cpu_quota_cores()
    print(json.dumps({"rows": rows, "torch_threads": engine.identity()["torch_threads"], "quota_cores": quota}))
    return 0


# --- the parent: processes, CSV, summary ---------------------------------------------------------------
def worker_env(threads: int, policy: str, base=None) -> dict:
    """The worker's environment: the thread count, and OMP_WAIT_POLICY set, or left out for "unset"."""
    env = dict(os.environ if base is None else base, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def run_proc(args, engine, threads, policy, proc, constrained) -> list[dict]:
    from bench.collapse import run_child
    n = str(threads)
    env = worker_env(threads, policy)
    cmd = [sys.executable, "-m", "bench.threads", "--worker", "--engines", engine, "--threads", n,
           "--requests", str(args.requests), "--tokens", str(args.tokens)] + (["--tiny"] if args.tiny else [])
    if constrained:
        cmd = [sys.executable, os.path.join(REPO, "cgroup_lib.py"), "run", "--name",
               f"bench_threads_{os.getpid()}_{proc}_{threads}_{policy}", *QUOTA, "--", *cmd]
    status, out, err = run_child(cmd, env)
    lines = out.strip().splitlines()
    what = f"{engine}, {threads} thread(s), {policy}, process {proc}"
    if status != 0 or not lines:
        raise RuntimeError(f"{what}: worker failed: {(err.strip().splitlines() or [f'exit {status}'])[-1]}")
    res = json.loads(lines[-1])
    if constrained and not res["quota_cores"]:
        raise RuntimeError(f"{what}: the worker saw no CPU quota")
    return [dict(r, engine=engine, torch_threads=res["torch_threads"], omp_wait_policy=policy,
                 constrained=constrained, proc=proc) for r in res["rows"]]


def split(times: list[float]):
    """The threshold between two modes: the midpoint of the largest ratio gap of sorted times, among the gaps
    with at least two times on each side, if that ratio is at least SPLIT; else None (one mode)."""
    s = sorted(times)
    if len(s) < 4:
        return None
    ratio, i = max((s[i + 1] / s[i], i) for i in range(1, len(s) - 2))
    return (s[i] + s[i + 1]) / 2 if ratio >= SPLIT else None


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.mean(vals), 3) if vals else None


MODE_KEYS = ["service_s", "cpu_s", "nr_throttled", "throttled_ms", "wait_ms", "run_ms_others", "involuntary_switches"]


def summarize(rows) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["engine"], r["torch_threads"], r["omp_wait_policy"]) for r in rows):
        cell = [r for r in rows if (r["engine"], r["torch_threads"], r["omp_wait_policy"]) == key]
        times = [r["service_s"] for r in cell]
        q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
        cut = split(times)
        row = dict(engine=key[0], torch_threads=key[1], omp_wait_policy=key[2], requests=len(cell),
                   processes=len({r["proc"] for r in cell}), median_s=round(statistics.median(times), 4),
                   p10_s=round(q[0], 4), p90_s=round(q[-1], 4), min_s=min(times), max_s=max(times),
                   split_s=cut and round(cut, 4))
        fast = [r for r in cell if cut is None or r["service_s"] < cut]
        slow = [r for r in cell if cut is not None and r["service_s"] >= cut]
        row["slow_requests"] = len(slow)
        row["slow_first_requests"] = sum(r["request"] == 0 for r in slow)
        for name, group in (("fast", fast), ("slow", slow)):
            for k in MODE_KEYS:
                row[f"{name}_mean_{k}"] = _mean(group, k)
        out.append(row)
    return out


def markdown(summary, args, constrained) -> str:
    head = [f"# Single-request times, fresh processes ({'tiny' if args.tiny else '124M'} architecture, "
            f"{args.tokens} tokens, {args.requests} request(s) per process, "
            f"{'50% of one CPU' if constrained else 'unconstrained'})", "",
            "| engine | threads | OMP_WAIT_POLICY | requests | median s | p10 s | p90 s | split s | slow (first) |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines = [f"| {s['engine']} | {s['torch_threads']} | {s['omp_wait_policy']} | {s['requests']} | {s['median_s']:.2f} "
             f"| {s['p10_s']:.2f} | {s['p90_s']:.2f} | {_num(s['split_s'])} "
             f"| {s['slow_requests']} ({s['slow_first_requests']}) |" for s in summary]
    modes = ["", "Per mode, the mean per request (fast / slow; slow only where the times split, at a gap of at least "
                 f"{SPLIT}x):", "", "| engine | threads | policy | " + " | ".join(MODE_KEYS) + " |",
             "| --- | ---: | --- |" + " ---: |" * len(MODE_KEYS)]
    for s in summary:
        cells = [f"{_num(s[f'fast_mean_{k}'])} / {_num(s[f'slow_mean_{k}'])}" for k in MODE_KEYS]
        modes.append(f"| {s['engine']} | {s['torch_threads']} | {s['omp_wait_policy']} | " + " | ".join(cells) + " |")
    return "\n".join(head + lines + modes + [""])


def _num(x):
    return "—" if x is None else f"{x:.3g}"


def bench(args) -> int:
    constrained = not args.no_quota and os.geteuid() == 0
    if not args.no_quota and not constrained:
        print(f"{PROG}: not root: running unconstrained (no quota)", file=sys.stderr)
    os.makedirs(args.output_dir, exist_ok=True)
    plan = [(e, t, p, i) for i in range(args.procs) for e in args.engines for t in args.threads for p in args.policies]
    rows, path = [], os.path.join(args.output_dir, "requests.csv")
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with open(path, "w", newline="") as f:
            sink = csv.DictWriter(f, COLUMNS)
            sink.writeheader()
            for n, (engine, threads, policy, proc) in enumerate(plan, 1):
                got = run_proc(args, engine, threads, policy, proc, constrained)
                sink.writerows(got)
                f.flush()
                rows += got
                if not args.quiet:
                    times = " ".join(f"{r['service_s']:.2f}" for r in got)
                    print(f"[{n}/{len(plan)}] {engine}, {threads} thread(s), {policy}, process {proc}: {times} s",
                          file=sys.stderr, flush=True)
    except (KeyboardInterrupt, RuntimeError) as e:
        print(f"{PROG}: {'interrupted' if isinstance(e, KeyboardInterrupt) else f'error: {e}'}; "
              f"finished rows kept in {path}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    summary = summarize(rows)
    with open(os.path.join(args.output_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    table = markdown(summary, args, constrained)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(table)
    print(table, end="")
    return 0


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    for name in ("requests.csv", "summary.csv", "summary.md"):
        path = os.path.join(args.output_dir, name)
        if os.path.exists(path) and not args.force:
            print(f"{PROG}: error: {path} exists; use --force to overwrite it", file=sys.stderr)
            return 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
