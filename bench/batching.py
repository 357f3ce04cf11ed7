"""Micro-benchmark of the batching engine: tokens per second and per CPU-second at batch 1, 2, 4, 8.

    python -m bench.batching                      # unconstrained (124M architecture, 50 tokens, 1 torch thread)
    python -m bench.batching --under-quota 50     # the same, re-run inside a cgroup at 50% of one CPU

For each batch size b, b requests with the same prompt (so identical lengths) and different seeds go to a
``BatchEngine`` with ``max_batch=b`` at once: b batch-1 prefills, then batched decode steps, exactly the
serving path. Wall time runs from submission until the last request ends; CPU time is the whole process's
(``time.process_time``). One untimed warm-up batch comes first. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from llm_psi import REPO
from llm_psi.load import runner

PROMPT = "Explain the theory of relativity."


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = _Parser(prog="python -m bench.batching", description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes")
    p.add_argument("--tokens", type=int, default=50, help="new tokens per request")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per batch size (median reported)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (smoke test)")
    p.add_argument("--under-quota", type=float, default=None, metavar="PCT",
                   help="re-run inside a cgroup limited to PCT%% of one CPU (cgroup_lib.py run; root)")
    return p


def run_batch(engine, b: int, tokens: int) -> dict:
    """One batch of b simultaneous requests through a fresh BatchEngine; wall, CPU and service times."""
    from llm_psi.engine.batch import BatchEngine
    be = BatchEngine(engine, max_batch=b)
    gens = [None] * b
    errors = []
    go = threading.Barrier(b + 1)

    def worker(i):
        go.wait()
        try:
            gens[i] = be.generate(PROMPT, tokens, seed=i)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(b)]
    for t in threads:
        t.start()
    cpu0, wall0 = time.process_time(), time.monotonic()
    go.wait()
    for t in threads:
        t.join()
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    be.close()
    if errors:
        raise errors[0]
    n = sum(g.output_tokens for g in gens)
    return {"batch": b, "tokens": n, "wall_s": wall, "cpu_s": cpu, "tok_per_s": n / wall,
            "tok_per_cpu_s": n / cpu, "service_s": statistics.mean(g.t_end - g.t_start for g in gens)}


def median_row(rows: list[dict]) -> dict:
    return {k: (statistics.median(r[k] for r in rows) if isinstance(v, float) else v)
            for k, v in rows[0].items()}


def quota_cores():
    try:
        from llm_psi import cgroups
        return cgroups.cpu_quota_cores()
    except Exception:
        return None


def measure(args) -> int:
    from llm_psi.engine.loop import Engine
    engine = Engine(tiny=args.tiny, seed=0, torch_threads=args.threads)
    quota = quota_cores()
    run_batch(engine, max(args.batches), min(args.tokens, 5))  # warm-up, untimed
    rows = [median_row([run_batch(engine, b, args.tokens) for _ in range(args.repeats)]) for b in args.batches]
    base = rows[0]["tok_per_cpu_s"]
    for r in rows:
        r["cpu_gain"] = r["tok_per_cpu_s"] / base
    where = f"cgroup quota {quota:.2f} CPU" if quota else "unconstrained"
    ident = engine.identity()
    print(f"{ident['source']}, {args.tokens} new tokens, {ident['torch_threads']} torch thread(s), {where}; "
          f"gain relative to batch {rows[0]['batch']}")
    print(f"{'batch':>5} {'wall s':>8} {'CPU s':>8} {'tok/s':>8} {'tok/CPU-s':>10} {'gain':>6} {'service s':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['tok_per_s']:>8.1f} "
              f"{r['tok_per_cpu_s']:>10.1f} {r['cpu_gain']:>6.2f} {r['service_s']:>10.2f}")
    print(json.dumps({"bench": "batching", "model": ident["source"], "tokens": args.tokens,
                      "torch_threads": ident["torch_threads"], "cpu_quota_cores": quota,
                      "repeats": args.repeats, "rows": rows}))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for name in ("tokens", "threads", "repeats"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name} must be >= 1")
    if min(args.batches) < 1:
        build_parser().error("--batches must all be >= 1")
    if args.under_quota is None:
        return measure(args)
    if args.under_quota <= 0:
        build_parser().error("--under-quota must be > 0")
    inner, skip = [], False
    for arg in argv:  # the same arguments without --under-quota PCT / --under-quota=PCT
        if skip or arg.startswith("--under-quota"):
            skip = not skip and arg == "--under-quota"
            continue
        inner.append(arg)
    import subprocess
    cmd = runner.wrap([sys.executable, "-m", "bench.batching", *inner], True, name="bench_batching",
                      quota=args.under_quota)
    return subprocess.call(cmd, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
