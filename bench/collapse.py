"""Does anything on this host come near the artifact's ~34x service-time collapse under a CPU quota?

The paper's artifact timed one GPT-2 124M request (Hugging Face ``generate``, 50 tokens) at 2.4 s without limits
and at 81 s inside a cgroup allowed 50% of one CPU. This benchmark times one request at a time, 50 tokens, the
124M architecture, for every engine (``loop``, ``generate``), OMP_WAIT_POLICY (passive, active) and torch thread
count (1 2 4 8), both unconstrained and inside such a cgroup (``cgroup_lib.py run``, root only). Each combination
runs in a fresh worker process, since OpenMP reads its variables when torch is imported: the worker loads the
model and runs a short warm-up (neither timed), then ``--reps`` timed requests, stopping early after one slower
than ``--slow-s``. Service time is the engine's own: generation start to last token.

Writes a CSV of service times (rows kept if interrupted) and a markdown table of slowdown factors (median under
the quota / median unconstrained) beside the artifact's, and prints the table.

    python -m bench.collapse                                    # full grid (long): results/collapse.{csv,md}
    python -m bench.collapse --tiny --threads "1 2" --reps 1 --no-quota --output-csv /tmp/c.csv --output-md /tmp/c.md
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys

from llm_psi.analysis import artifact
from llm_psi import REPO, cli
from llm_psi.load import runner

PROMPT = "Explain the theory of relativity."
POLICIES = ("passive", "active")
# The artifact's single-request medians, from its raw files (reference/artifact_results): baseline_c1 and
# cgroups_c1 (50% of one CPU on a 4-core VM).
_ART = artifact.load()
ARTIFACT_UNCONSTRAINED_S = float(statistics.median(artifact.rows_of(_ART, "baseline", 1)))
ARTIFACT_QUOTA_S = float(statistics.median(artifact.rows_of(_ART, "cgroups", 1)))
ARTIFACT_FACTOR = ARTIFACT_QUOTA_S / ARTIFACT_UNCONSTRAINED_S
NEAR = 2.0  # a factor within this ratio of the artifact's counts as approaching it
COLUMNS = ["engine", "omp_wait_policy", "torch_threads", "condition", "reps", "median_service_s", "min_s", "max_s",
           "service_times_s", "cpu_quota_cores", "model", "max_new_tokens"]


PROG = "python -m bench.collapse"


def usage_error(message):
    """Bad input: one line on stderr, exit status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Terminate(BaseException):
    """SIGTERM, handled like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminate()


def build_parser():
    from llm_psi.config import ENGINES
    p = cli.OneLineParser(prog=PROG, description=__doc__, formatter_class=_Help)
    grid = p.add_argument_group("grid (every combination is measured)")
    grid.add_argument("--threads", type=cli.int_list, default="1 2 4 8", metavar="LIST",
                      help="torch threads (also OMP_NUM_THREADS and MKL_NUM_THREADS)")
    grid.add_argument("--policies", type=cli.word_list(POLICIES), default="passive active", metavar="LIST",
                      help="OMP_WAIT_POLICY values")
    grid.add_argument("--engines", type=cli.word_list(ENGINES), default=" ".join(ENGINES), metavar="LIST",
                      help="engine.py engines")
    run = p.add_argument_group("measurement")
    run.add_argument("--reps", type=cli.finite_number(int, gt=0), default=3, metavar="N",
                     help="timed requests per combination")
    run.add_argument("--slow-s", type=cli.finite_number(gt=0), default=30.0, metavar="S",
                     help="end a combination's timed requests once one takes longer (seconds)")
    run.add_argument("--max-new-tokens", type=cli.finite_number(int, gt=0), default=50, metavar="N",
                     help="tokens per request")
    run.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (smoke tests)")
    run.add_argument("--no-quota", action="store_true", help="skip the runs under the 50%% CPU quota")
    out = p.add_argument_group("output")
    out.add_argument("--output-csv", default="results/collapse.csv", metavar="PATH",
                     help="service times, one row per run")
    out.add_argument("--output-md", default="results/collapse.md", metavar="PATH", help="slowdown table")
    out.add_argument("--force", action="store_true", help="overwrite existing output files")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def worker(args) -> int:
    """Time single requests in this process (its OpenMP variables already set); print one JSON line."""
    from llm_psi import cgroups
    from llm_psi.engine.loop import make_engine
    engine = make_engine(args.engines[0], tiny=args.tiny, seed=0, torch_threads=args.threads[0])
    engine.generate(PROMPT, min(args.max_new_tokens, 5), seed=0)  # warm-up, untimed
    times = []
    for rep in range(args.reps):
        g = engine.generate(PROMPT, args.max_new_tokens, seed=rep + 1)
        if g.output_tokens != args.max_new_tokens:
            raise RuntimeError(f"generated {g.output_tokens} of {args.max_new_tokens} tokens")
        times.append(g.t_end - g.t_start)
        if times[-1] > args.slow_s:
            break
    ident = engine.identity()
    print(json.dumps({"median_s": statistics.median(times), "service_s": times, "model": ident["source"],
                      "torch_threads": ident["torch_threads"], "cpu_quota_cores": cgroups.cpu_quota_cores()}))
    return 0


def run_child(cmd, env, input=None):
    """Run cmd to completion (``input``: its stdin's text); return (status, stdout, stderr). Interrupted, the
    child is sent the same stop (cgroup_lib run then removes its cgroup), given time to end, then killed."""
    child = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=None if input is None else subprocess.PIPE)
    try:
        out, err = child.communicate(input)
    except BaseException as e:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM if isinstance(e, _Terminate) else signal.SIGINT)
            try:
                child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
        raise
    return child.returncode, out, err


def measure(args, engine, policy, threads, condition, name) -> dict:
    """One worker for one combination; its CSV row."""
    n = str(threads)
    env = dict(os.environ, OMP_WAIT_POLICY=policy.upper(), OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    cmd = [sys.executable, "-m", "bench.collapse", "--worker", "--engines", engine, "--threads", n,
           "--reps", str(args.reps), "--slow-s", str(args.slow_s), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--tiny"] if args.tiny else []
    if condition == "quota":
        cmd = runner.wrap(cmd, True, name=name)
    status, out, err = run_child(cmd, env)
    lines = out.strip().splitlines()
    if status != 0 or not lines:
        last = (err.strip().splitlines() or [f"exit status {status}"])[-1]
        raise RuntimeError(f"{engine} {policy} {threads} thread(s) {condition}: worker failed: {last}")
    try:
        res = json.loads(lines[-1])
    except ValueError:
        raise RuntimeError(f"{engine} {policy} {threads} thread(s) {condition}: worker printed {lines[-1]!r}") from None
    if condition == "quota" and not res["cpu_quota_cores"]:
        raise RuntimeError(f"{engine} {policy} {threads} thread(s): the worker saw no CPU quota")
    times = res["service_s"]
    return dict(engine=engine, omp_wait_policy=policy, torch_threads=res["torch_threads"], condition=condition,
                reps=len(times), median_service_s=round(res["median_s"], 4), min_s=round(min(times), 4),
                max_s=round(max(times), 4), service_times_s=" ".join(f"{t:.4f}" for t in times),
                cpu_quota_cores=res["cpu_quota_cores"], model=res["model"], max_new_tokens=args.max_new_tokens)


def verdict(factors: dict) -> str:
    """The closing line: the largest factor seen, and whether it approaches the artifact's."""
    if not factors:
        return f"No slowdown factor was measured: nothing to set beside the artifact's {ARTIFACT_FACTOR:.1f}x."
    key = max(factors, key=factors.get)
    top = factors[key]
    gap = ARTIFACT_FACTOR / top
    if gap <= 1:
        where = f"at or above the artifact's {ARTIFACT_FACTOR:.1f}x"
    elif gap <= NEAR:
        where = f"within {NEAR:g}x of the artifact's {ARTIFACT_FACTOR:.1f}x ({gap:.1f}x below it)"
    else:
        where = f"not within {NEAR:g}x of the artifact's {ARTIFACT_FACTOR:.1f}x ({gap:.1f}x below it)"
    return f"Largest slowdown seen: {top:.1f}x ({key[0]} engine, {key[1]}, {key[2]} thread(s)), {where}."


def markdown(rows, args, skipped) -> str:
    """The slowdown table: one line per (engine, policy, threads), the artifact's factor beside each."""
    medians = {(r["engine"], r["omp_wait_policy"], r["torch_threads"], r["condition"]): r["median_service_s"]
               for r in rows}
    factors, lines = {}, []
    for key in dict.fromkeys(k[:3] for k in medians):
        free, limited = medians.get((*key, "unconstrained")), medians.get((*key, "quota"))
        if free and limited:
            factors[key] = limited / free
        cells = [f"{free:.2f}" if free else "—", f"{limited:.2f}" if limited else "—",
                 f"{factors[key]:.1f}x" if key in factors else "—"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {ARTIFACT_FACTOR:.1f}x |")
    model = rows[0]["model"] if rows else "?"
    head = [f"# Service-time collapse under a 50% CPU quota ({model}, {args.max_new_tokens} tokens, "
            f"median of up to {args.reps} request(s))", ""]
    if skipped:
        head += [f"Quota runs skipped: {skipped}.", ""]
    head += [f"Artifact: {ARTIFACT_UNCONSTRAINED_S:.2f} s unconstrained, {ARTIFACT_QUOTA_S:.1f} s under the quota "
             f"(medians of its baseline_c1 and cgroups_c1 runs): {ARTIFACT_FACTOR:.1f}x.", "",
             "| engine | OMP_WAIT_POLICY | torch threads | unconstrained s | quota s | slowdown | artifact slowdown |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    return "\n".join(head + lines + ["", verdict(factors), ""])


def check_outputs(args):
    for path in (args.output_csv, args.output_md):
        if os.path.exists(path) and not args.force:
            usage_error(f"{path} exists; use --force to overwrite it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            usage_error(f"no such directory for {path}")


def bench(args) -> int:
    skipped = "--no-quota given" if args.no_quota else None if os.geteuid() == 0 else "not root"
    if skipped:
        print(f"{PROG}: quota column skipped: {skipped}", file=sys.stderr)
    conditions = ["unconstrained"] + ([] if skipped else ["quota"])
    combos = [(e, p, t, c) for e in args.engines for p in args.policies for t in args.threads for c in conditions]
    if os.path.exists(args.output_md):
        os.remove(args.output_md)  # --force: no stale table beside the new rows
    rows = []
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with open(args.output_csv, "w", newline="") as f:
            sink = csv.DictWriter(f, COLUMNS)
            sink.writeheader()
            for i, combo in enumerate(combos, 1):
                row = measure(args, *combo, name=f"bench_collapse_{os.getpid()}_{i}")
                sink.writerow(row)
                f.flush()
                rows.append(row)
                if not args.quiet:
                    e, p, t, c = combo
                    print(f"[{i}/{len(combos)}] {e} engine, OMP_WAIT_POLICY={p}, {t} thread(s), {c}: median "
                          f"{row['median_service_s']:.2f} s over {row['reps']} request(s)", file=sys.stderr)
    except (KeyboardInterrupt, _Terminate):
        print(f"{PROG}: interrupted; finished rows kept in {args.output_csv}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"{PROG}: error: {e}; finished rows kept in {args.output_csv}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
    table = markdown(rows, args, skipped)
    with open(args.output_md, "w") as f:
        f.write(table)
    print(table, end="")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    check_outputs(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
