"""bench/engines.py's capacity over HTTP: the highest Poisson rate at which the service meets an SLO.

For each engine of --capacity-engines (``ours``: today's engine, the loop; ``ours-ort``: the ONNX Runtime
forward), one ``llm_server.py serve --config <label> --engine <kind>`` runs for the whole study, inside a
cgroup of its own at the paper's quota (``runner.wrap``; as root; --no-quota or not root: no cgroup), and
``request_generator.py --target`` (the suite's load generator, outside the cgroup) sends it probes: one
probe = --capacity-requests requests of --capacity-tokens tokens at Poisson rate R (``--arrival poisson``,
its schedule from the probe's seed, the same for every engine), with a deadline that cuts a backlog short.

A probe passes when every request is ok and the p95 TTFT and p95 end-to-end time (``metrics.summarize``,
the one metric definition) are within their SLO bounds (``--slo``, ``arrivals.parse_slo``). One trial is a
search over rates: R doubles from --capacity-start-rps while probes pass (up to --capacity-max-rps), then
--capacity-bisections halvings of the interval between the highest pass and the lowest fail; the trial's
capacity is its highest passing rate (0 when none passed; the cap itself when none failed, marked in the
table). Trials alternate between the engines (trial 1 of each, then trial 2, ...), so that a drifting host
loads them alike. capacity_rps is the mean over trials with its 95% t-interval (``stats.t_interval``).

Writes capacity.csv (engine, slo, capacity_rps, ci_lo, ci_hi, n_trials) and capacity_probes.csv (every probe:
engine, trial, rate_rps, n, n_ok, p95_ttft_ms, p95_e2e_ms, passed, constrained), and returns lines for
table.md.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from llm_psi import REPO

ENGINE_KINDS = {"ours": "loop", "ours-ort": "ort"}   # a capacity engine: the service's --engine
CAPACITY = ["engine", "slo", "capacity_rps", "ci_lo", "ci_hi", "n_trials"]
PROBES = ["engine", "trial", "probe", "rate_rps", "n", "n_ok", "p95_ttft_ms", "p95_e2e_ms", "passed", "constrained"]
OUTPUTS = ("capacity.csv", "capacity_probes.csv", "capacity.md")
CGROUP = "bench_capacity"
MAX_HALVINGS = 4     # below start / 16 req/s the service is reported at capacity 0


def add_options(p) -> None:
    from llm_psi.cli import finite_number, word_list
    g = p.add_argument_group("capacity over HTTP (the service under the quota, Poisson arrivals, an SLO)")
    g.add_argument("--no-capacity", action="store_true", help="skip the capacity study")
    g.add_argument("--capacity-only", action="store_true", help="run only the capacity study (capacity*.csv)")
    g.add_argument("--capacity-engines", type=word_list(tuple(ENGINE_KINDS)), default=list(ENGINE_KINDS),
                   metavar="LIST", help=f"engines to serve (default: {' '.join(ENGINE_KINDS)})")
    g.add_argument("--capacity-config", default="batch",
                   help="the service's --config (default: %(default)s, continuous batching)")
    g.add_argument("--slo", default="ttft:1000,e2e:6000",
                   help="p95 bounds a probe must meet, ms (default: %(default)s)")
    g.add_argument("--capacity-trials", type=finite_number(int, ge=1),
                   help="trials per engine (default: 3; --quick: 2)")
    g.add_argument("--capacity-requests", type=finite_number(int, ge=2),
                   help="requests per probe (default: 40; --quick: 6)")
    g.add_argument("--capacity-tokens", type=finite_number(int, ge=1),
                   help="new tokens per request (default: 20; --quick: 4)")
    g.add_argument("--capacity-start-rps", type=finite_number(float, gt=0), help="first rate (default: 1; --quick: 4)")
    g.add_argument("--capacity-max-rps", type=finite_number(float, gt=0),
                   help="highest rate tried (default: 32; --quick: 4)")
    g.add_argument("--capacity-bisections", type=finite_number(int, ge=0),
                   help="halvings of the interval between the highest pass and the lowest fail "
                        "(default: 3; --quick: 1)")


def defaults(args) -> None:
    """Fill the capacity options not given: full run, or --quick (a smoke test)."""
    for name, full, quick in (("capacity_trials", 3, 2), ("capacity_requests", 40, 6), ("capacity_tokens", 20, 4),
                              ("capacity_start_rps", 1.0, 4.0), ("capacity_max_rps", 32.0, 4.0),
                              ("capacity_bisections", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def check(args) -> str | None:
    """A one-line error for bad capacity options, else None."""
    from llm_psi import config
    from llm_psi.load import arrivals
    if args.no_capacity and args.capacity_only:
        return "--no-capacity and --capacity-only exclude each other"
    if args.capacity_config not in config.CONFIGS:
        return f"--capacity-config: unknown config {args.capacity_config!r}"
    if config.preset(args.capacity_config).get("batching") != "dynamic":
        return f"--capacity-config {args.capacity_config}: the engines serve through continuous batching " \
               f"(a config with batching dynamic, such as batch)"
    try:
        arrivals.parse_slo(args.slo)
    except ValueError as e:
        return f"--slo: {e}"
    if args.capacity_start_rps > args.capacity_max_rps:
        return "--capacity-start-rps must not exceed --capacity-max-rps"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_args(args, engine: str, constrained: bool) -> list[str]:
    """The service options of --capacity-config with the engine's --engine: its label under the quota; without
    the quota (a limited label refuses to run there), the label's preset spelled out as options of the
    unlimited 'baseline' label."""
    from llm_psi import config
    label = args.capacity_config
    out = ["--engine", ENGINE_KINDS[engine]] + ["--tiny"] * args.tiny
    if constrained or not config.needs_own_cgroup(label):
        return ["--config", label] + out
    preset = {k: v for k, v in config.preset(label).items() if k != "engine"}
    return ["--config", "baseline"] + [x for k, v in preset.items() for x in (f"--{k.replace('_', '-')}", str(v))] + out


class Server:
    """``llm_server.py serve`` for one engine, in its own cgroup at the quota (constrained) or as is."""

    def __init__(self, args, engine: str, constrained: bool, workdir: str):
        from llm_psi.load import runner
        self.engine, self.port = engine, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.options = service_args(args, engine, constrained)
        cmd = [sys.executable, os.path.join(REPO, "llm_server.py"), "serve", *self.options, "--port", str(self.port)]
        if constrained:
            cmd = runner.wrap(cmd, True, name=f"{CGROUP}_{engine.replace('-', '_')}")
        self.log_path = os.path.join(workdir, f"serve-{engine}.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)

    def last_log_line(self) -> str:
        with open(self.log_path) as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else "(no output)"

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        """Until /health says ready (the first ort start exports the model); RuntimeError if it exits."""
        import time
        import httpx
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.engine} service exited with status {self.proc.returncode}: "
                                   f"{self.last_log_line()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.engine} service was not ready after {timeout_s:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # drains; cgroup_lib forwards it and removes the cgroup
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def export_first(args, log) -> None:
    """The ort service's export made here, outside the quota (minutes for the 124M model under it), into the
    cache the service reads (the same seeded weights and quantization: it finds it by their hash)."""
    import gc
    from llm_psi import config
    from llm_psi.engine.loop import make_engine
    if "ours-ort" in args.capacity_engines:
        quantize = config.preset(args.capacity_config).get("quantize", "none")
        log(f"capacity: the ort export ({quantize}) into the cache, outside the quota")
        make_engine("ort", tiny=args.tiny, seed=0, torch_threads=1, quantize=quantize)
        gc.collect()


def probe(args, server: Server, rate: float, seed: int, workdir: str) -> dict:
    """One probe at ``rate``: the generator's CSV, summarized by the one metric definition."""
    import pandas as pd
    from llm_psi.analysis import metrics
    from llm_psi.load import arrivals
    slo = arrivals.parse_slo(args.slo)
    out = os.path.join(workdir, f"{server.engine}_{seed}_{rate:g}.csv")
    deadline = args.capacity_requests / rate + 3 * max(slo.values()) / 1000
    cmd = [sys.executable, os.path.join(REPO, "request_generator.py"), "--target", server.url, "--wait-ready-s",
           "900", *server.options, "--arrival", "poisson", "--rate", f"{rate:g}",
           "--num-requests", str(args.capacity_requests),
           "--max-new-tokens", str(args.capacity_tokens), "--slo", args.slo, "--seed", str(seed),
           "--deadline-s", f"{deadline:.1f}", "--trials", "1", "--output", out, "--force", "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"the load generator failed against {server.engine} at {rate:g} req/s: {tail[0]}")
    s = metrics.summarize(pd.read_csv(out))
    ok = s["n_ok"] == s["n"] and all(s[f"p95_{m}"] <= bound for m, bound in slo.items())
    return dict(engine=server.engine, rate_rps=rate, n=s["n"], n_ok=s["n_ok"], p95_ttft_ms=round(s["p95_ttft_ms"], 1),
                p95_e2e_ms=round(s["p95_e2e_ms"], 1), passed=bool(ok))


def search(args, run_probe) -> tuple[float, list[dict]]:
    """One trial's capacity: from the start rate, double while probes pass (or halve while they fail, at most
    ``MAX_HALVINGS`` times), then bisect between the highest pass and the lowest fail; (the highest passing
    rate, 0 if none; the probes)."""
    probes, good, bad, rate = [], 0.0, None, args.capacity_start_rps
    while True:
        probes.append(run_probe(rate))
        if probes[-1]["passed"]:
            good = rate
            if bad is not None or rate >= args.capacity_max_rps:
                break
            rate = min(2 * rate, args.capacity_max_rps)
        else:
            bad = rate
            if good or len(probes) > MAX_HALVINGS:
                break
            rate /= 2
    for _ in range(args.capacity_bisections if bad is not None and good else 0):
        rate = (good + bad) / 2
        probes.append(run_probe(rate))
        good, bad = (rate, bad) if probes[-1]["passed"] else (good, rate)
    return good, probes


def measure(args, constrained: bool, log) -> tuple[list[dict], list[dict]]:
    """Every engine's capacity, trials interleaved; (capacity rows, probe rows)."""
    from llm_psi.analysis import stats
    workdir = tempfile.mkdtemp(prefix="bench-capacity-")
    servers, caps, probes = [], {e: [] for e in args.capacity_engines}, []
    capped = {e: 0 for e in args.capacity_engines}
    previous = signal.signal(signal.SIGTERM, _terminated)   # SIGTERM: stop the services too (finally below)
    try:
        export_first(args, log)
        for engine in args.capacity_engines:
            servers.append(Server(args, engine, constrained, workdir))
        for server in servers:   # every service loaded before any probe: none loads beside another's probe
            server.wait_ready()
            log(f"capacity: the {server.engine} service is ready at {server.url}")
        for trial in range(1, args.capacity_trials + 1):
            for server in servers:
                count = iter(range(1, 1000))

                def run_probe(rate, server=server, trial=trial, count=count):
                    k = next(count)
                    row = probe(args, server, rate, 1000 * trial + k, workdir)
                    log(f"capacity {server.engine} trial {trial}/{args.capacity_trials} probe {k}: {rate:g} req/s: "
                        f"p95 ttft {row['p95_ttft_ms']:.0f} ms, e2e {row['p95_e2e_ms']:.0f} ms, "
                        f"{row['n_ok']}/{row['n']} ok: {'pass' if row['passed'] else 'fail'}")
                    return dict(row, trial=trial, probe=k, constrained=constrained)
                cap, rows = search(args, run_probe)
                caps[server.engine].append(cap)
                probes += rows
                capped[server.engine] += all(r["passed"] for r in rows)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    out = []
    for engine, values in caps.items():
        mean, lo, hi = stats.t_interval(values)
        lo = lo if lo is None or not math.isfinite(lo) else max(0.0, lo)   # a rate is >= 0
        out.append(dict(engine=engine, slo=args.slo, capacity_rps=_round(mean), ci_lo=_round(lo), ci_hi=_round(hi),
                        n_trials=len(values), capped=capped[engine], constrained=constrained, trials=values))
    return out, probes


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float, int]:
    """Trial k of a over trial k of b (the trials alternate, so a pair shares the host's state): the mean of the
    per-trial ratios with its 95% t-interval, and the pairs counted; a pair whose b is 0 is left out."""
    from llm_psi.analysis import stats
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    mean, lo, hi = stats.t_interval(ratios)
    return mean, lo, hi, len(ratios)


def _terminated(signum, _frame):
    raise SystemExit(128 + signum)


def _round(x):
    return None if x is None or not math.isfinite(x) else round(x, 3)


def write(args, caps: list[dict], probes: list[dict]) -> list[str]:
    """capacity.csv and capacity_probes.csv in args.output_dir; the lines for table.md."""
    for name, columns, rows in (("capacity.csv", CAPACITY, caps), ("capacity_probes.csv", PROBES, probes)):
        with open(os.path.join(args.output_dir, name), "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return table(args, caps)


def table(args, caps: list[dict]) -> list[str]:
    from llm_psi import config
    where = f"at the paper's quota ({config.CPU_QUOTA_PCT:g}% of one CPU)" if caps and caps[0]["constrained"] \
        else "NOT under the quota (--no-quota or not root; the preset's options without its label)"
    lines = ["## Capacity over HTTP", "",
             f"`llm_server.py serve --config {args.capacity_config} --engine E` {where}; Poisson arrivals of "
             f"{args.capacity_requests} requests x {args.capacity_tokens} tokens per probe; a probe passes when "
             f"every request is ok and p95 within the SLO ({args.slo}); per trial the highest passing rate "
             f"(doubling from {args.capacity_start_rps:g} req/s, then {args.capacity_bisections} bisections); "
             f"mean over trials with its 95% t-interval.", "",
             "| engine | --engine | SLO | capacity (req/s) | 95% interval | trials |",
             "| --- | --- | --- | ---: | --- | ---: |"]
    for c in caps:
        ci = "—" if c["ci_lo"] is None else f"{c['ci_lo']:.2f}–{c['ci_hi']:.2f}"
        note = f" ({c['capped']} of {c['n_trials']} trials passed the cap, {args.capacity_max_rps:g} req/s: " \
               f"a lower bound)" if c["capped"] else ""
        lines.append(f"| {c['engine']} | {ENGINE_KINDS[c['engine']]} | {c['slo']} | "
                     f"{c['capacity_rps']:.2f}{note} | {ci} | {c['n_trials']} |")
    by = {c["engine"]: c for c in caps}
    if {"ours", "ours-ort"} <= set(by) and by["ours"]["capacity_rps"]:
        lines += ["", f"ours-ort / ours: {by['ours-ort']['capacity_rps'] / by['ours']['capacity_rps']:.2f}x "
                      f"(ratio of means; a difference holds only where the intervals separate)"]
        mean, lo, hi, n = paired_ratio(by["ours-ort"].get("trials", []), by["ours"].get("trials", []))
        if n >= 2 and math.isfinite(lo):
            lines += ["", f"ours-ort / ours, trial by trial (trial k of each, run in turn): mean ratio {mean:.2f}x, "
                          f"95% t-interval {lo:.2f}–{hi:.2f} over {n} pairs"]
    return lines
