"""The two-thread question: why do two torch threads under a half-CPU quota settle at one of two speeds?
And what the thread defaults (engine/threads.py) save: CPU per request with and without them.

    python -m bench.threads                       # full: results/threads/ (as root, under the quota)
    python -m bench.threads --tiny --procs 1 --requests 1 --tokens 5 --output-dir /tmp/t
    python -m bench.threads --defaults            # the defaults against torch's, quota and none: results/thread_defaults/

``--threads`` takes counts and the words ``auto`` (the default: whole CPUs the worker may use) and ``default``
(torch's own count); ``--policies`` takes ``auto`` (the default: PASSIVE) beside unset, passive and active.
``--conditions`` runs every setting under the quota, unconstrained, or both, interleaved. ``--defaults`` is
``--threads "1 auto default" --policies "auto unset"`` under ``--conditions "quota none"`` (unless given):
the default (auto, auto),
the paper's settings (default, unset) and one thread, where the summary's last table sets the CPU per request
of each against the paper's settings in each condition.

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
POLICIES = ("unset", "passive", "active", "auto")   # unset: no OMP_WAIT_POLICY, as the paper's code runs;
# auto: the engine's default (engine/threads.py: PASSIVE)
CONDITIONS = ("quota", "none")
DEFAULTS = dict(threads=[1, "auto", "default"], policies=["auto", "unset"], conditions=["quota", "none"])
QUOTA = ["--cpu-quota", "50", "--cpu-period-us", "100000", "--memory-max", "4G"]
COLUMNS = ["engine", "threads_option", "torch_threads", "omp_wait_policy", "constrained", "proc", "request",
           "service_s", "wall_s", "cpu_s", "nr_periods", "nr_throttled", "throttled_ms", "run_ms", "wait_ms", "timeslices", "run_ms_main",
           "run_ms_others", "tasks", "voluntary_switches", "involuntary_switches"]
SPLIT = 1.3   # a gap between consecutive sorted times of at least this ratio splits a setting's times in two


def build_parser():
    from llm_psi.config import ENGINES
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=finite_number(int, ge=1), default=20,
                   help="fresh processes per setting (default: 20)")
    p.add_argument("--requests", type=finite_number(int, ge=1), default=3,
                   help="timed requests per process, one after the other (default: 3)")
    p.add_argument("--threads", type=thread_list, default=[1, 2], metavar="LIST",
                   help="torch threads: counts, auto (from the CPU the worker may use) or default (torch's own) "
                        "(default: 1 2)")
    p.add_argument("--policies", type=word_list(POLICIES), default=["passive", "active"], metavar="LIST",
                   help="OMP_WAIT_POLICY values, of unset passive active auto; unset leaves the variable out of the "
                        "worker's environment, as the paper's code runs; auto: the engine's default "
                        "(default: passive active)")
    p.add_argument("--conditions", type=word_list(CONDITIONS), default=None, metavar="LIST",
                   help="quota (50%% of one CPU, as root) and/or none (unconstrained), interleaved "
                        "(default: quota, or none with --no-quota)")
    p.add_argument("--defaults", action="store_true",
                   help="the thread defaults against torch's: --threads '1 auto default' --policies 'auto unset' "
                        "--conditions 'quota none' (output: results/thread_defaults)")
    p.add_argument("--engines", type=word_list(ENGINES), default=["loop"], metavar="LIST",
                   help=f"engines, of {' '.join(ENGINES)} (default: loop)")
    p.add_argument("--tokens", type=finite_number(int, ge=1), default=50, help="tokens per request (default: 50)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    p.add_argument("--no-quota", action="store_true", help="run unconstrained (default: under 50%% of one CPU)")
    p.add_argument("--output-dir", default=None,
                   help="where the outputs go (default: results/threads, with --defaults results/thread_defaults)")
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
    engine = make_engine(args.engines[0], tiny=args.tiny, seed=0, torch_threads=args.threads[0],
                         omp_wait_policy="auto" if args.policies[0] == "auto" else None)
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
    ident = engine.identity()
    print(json.dumps({"rows": rows, "torch_threads": ident["torch_threads"], "quota_cores": quota,
                      "omp_wait_policy": ident["omp_wait_policy"]}))
    return 0


# --- the parent: processes, CSV, summary ---------------------------------------------------------------
def thread_list(text: str) -> list:
    """argparse type: thread counts >= 1 and the words auto and default."""
    words = [w for w in text.replace(",", " ").split() if w in ("auto", "default")]
    counts = [w for w in text.replace(",", " ").split() if w not in ("auto", "default")]
    values = (int_list(" ".join(counts)) if counts else []) + words
    if not values:
        raise argparse.ArgumentTypeError(f"expected thread counts, auto or default, got {text!r}")
    order = text.replace(",", " ").split()
    return sorted(dict.fromkeys(values), key=lambda v: order.index(str(v)))


def worker_env(threads, policy: str, base=None) -> dict:
    """The worker's environment: the thread count (none for auto or default: the worker's engine sets it or
    leaves torch's), and OMP_WAIT_POLICY set, or left out for "unset" and "auto" (the engine sets it)."""
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
        env.pop(var, None)
    if isinstance(threads, int):
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if policy not in ("unset", "auto"):
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def run_proc(args, engine, threads, policy, proc, constrained) -> list[dict]:
    from bench.collapse import run_child
    n = str(threads)
    env = worker_env(threads, policy)
    cmd = [sys.executable, "-m", "bench.threads", "--worker", "--engines", engine, "--threads", n,
           "--policies", policy, "--requests", str(args.requests), "--tokens", str(args.tokens)] + (["--tiny"] if args.tiny else [])
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
    return [dict(r, engine=engine, threads_option=threads, torch_threads=res["torch_threads"],
                 omp_wait_policy=policy, constrained=constrained, proc=proc) for r in res["rows"]]


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


SETTING = ("engine", "threads_option", "torch_threads", "omp_wait_policy", "constrained")


def summarize(rows) -> list[dict]:
    out = []
    for key in dict.fromkeys(tuple(r[k] for k in SETTING) for r in rows):
        cell = [r for r in rows if tuple(r[k] for k in SETTING) == key]
        times = [r["service_s"] for r in cell]
        q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
        cut = split(times)
        row = dict(zip(SETTING, key), requests=len(cell),
                   processes=len({r["proc"] for r in cell}), median_s=round(statistics.median(times), 4),
                   p10_s=round(q[0], 4), p90_s=round(q[-1], 4), min_s=min(times), max_s=max(times),
                   split_s=cut and round(cut, 4), mean_cpu_s=_mean(cell, "cpu_s"))
        fast = [r for r in cell if cut is None or r["service_s"] < cut]
        slow = [r for r in cell if cut is not None and r["service_s"] >= cut]
        row["slow_requests"] = len(slow)
        row["slow_first_requests"] = sum(r["request"] == 0 for r in slow)
        for name, group in (("fast", fast), ("slow", slow)):
            for k in MODE_KEYS:
                row[f"{name}_mean_{k}"] = _mean(group, k)
        out.append(row)
    return out


def _setting(s) -> str:
    return (f"| {s['engine']} | {s['threads_option']} | {s['torch_threads']} | {s['omp_wait_policy']} "
            f"| {'50% of one CPU' if s['constrained'] else 'none'} |")


def cpu_against_paper(summary) -> list[str]:
    """Per condition, each setting's mean CPU per request over that of the paper's settings (torch's own
    threads, no OMP_WAIT_POLICY); none where that setting was not run."""
    lines = []
    for s in summary:
        ref = next((r for r in summary if r["threads_option"] == "default" and r["omp_wait_policy"] == "unset"
                    and r["engine"] == s["engine"] and r["constrained"] == s["constrained"]), None)
        if ref and ref["mean_cpu_s"]:
            lines.append(f"{_setting(s)} {_num(s['mean_cpu_s'])} | {s['mean_cpu_s'] / ref['mean_cpu_s']:.2f} |")
    if not lines:
        return []
    return ["", "CPU per request against the paper's settings (threads default, OMP_WAIT_POLICY unset) in the "
                "same condition; the engine's defaults are threads auto, policy auto:", "",
            "| engine | threads | torch threads | OMP_WAIT_POLICY | quota | mean CPU s | / paper's |",
            "| --- | --- | ---: | --- | --- | ---: | ---: |"] + lines


def markdown(summary, args) -> str:
    head = [f"# Single-request times, fresh processes ({'tiny' if args.tiny else '124M'} architecture, "
            f"{args.tokens} tokens, {args.requests} request(s) per process)", "",
            "| engine | threads | torch threads | OMP_WAIT_POLICY | quota | requests | median s | p10 s | p90 s "
            "| mean CPU s | split s | slow (first) |",
            "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines = [f"{_setting(s)} {s['requests']} | {s['median_s']:.2f} | {s['p10_s']:.2f} | {s['p90_s']:.2f} "
             f"| {_num(s['mean_cpu_s'])} | {_num(s['split_s'])} | {s['slow_requests']} ({s['slow_first_requests']}) |"
             for s in summary]
    modes = ["", "Per mode, the mean per request (fast / slow; slow only where the times split, at a gap of at least "
                 f"{SPLIT}x):", "", "| engine | threads | torch threads | policy | quota | " + " | ".join(MODE_KEYS)
             + " |", "| --- | --- | ---: | --- | --- |" + " ---: |" * len(MODE_KEYS)]
    for s in summary:
        cells = [f"{_num(s[f'fast_mean_{k}'])} / {_num(s[f'slow_mean_{k}'])}" for k in MODE_KEYS]
        modes.append(f"{_setting(s)} " + " | ".join(cells) + " |")
    return "\n".join(head + lines + modes + cpu_against_paper(summary) + [""])


def _num(x):
    return "—" if x is None else f"{x:.3g}"


def bench(args) -> int:
    conditions = args.conditions or (["none"] if args.no_quota else ["quota"])
    if "quota" in conditions and os.geteuid() != 0:
        print(f"{PROG}: not root: running unconstrained (no quota)", file=sys.stderr)
        conditions = ["none"]
    os.makedirs(args.output_dir, exist_ok=True)
    plan = [(e, t, p, c == "quota", i) for i in range(args.procs) for c in conditions for e in args.engines
            for t in args.threads for p in args.policies]
    rows, path = [], os.path.join(args.output_dir, "requests.csv")
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with open(path, "w", newline="") as f:
            sink = csv.DictWriter(f, COLUMNS)
            sink.writeheader()
            for n, (engine, threads, policy, constrained, proc) in enumerate(plan, 1):
                got = run_proc(args, engine, threads, policy, proc, constrained)
                sink.writerows(got)
                f.flush()
                rows += got
                if not args.quiet:
                    times = " ".join(f"{r['service_s']:.2f}" for r in got)
                    print(f"[{n}/{len(plan)}] {engine}, {threads} thread(s), {policy}, "
                          f"{'quota' if constrained else 'no quota'}, process {proc}: {times} s",
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
    table = markdown(summary, args)
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
    if args.defaults:
        args.threads, args.policies = DEFAULTS["threads"], DEFAULTS["policies"]
        if args.conditions is None and not args.no_quota:
            args.conditions = DEFAULTS["conditions"]
    if args.output_dir is None:
        args.output_dir = os.path.join("results", "thread_defaults" if args.defaults else "threads")
    for name in ("requests.csv", "summary.csv", "summary.md"):
        path = os.path.join(args.output_dir, name)
        if os.path.exists(path) and not args.force:
            print(f"{PROG}: error: {path} exists; use --force to overwrite it", file=sys.stderr)
            return 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
