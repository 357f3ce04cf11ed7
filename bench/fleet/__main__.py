"""Past one host (issue 33): HAProxy's roundrobin, leastconn and agent-check weights in front of a fleet whose
hosts' owners take their CPUs in turn.

    sudo .venv/bin/python -m bench.fleet [--results-dir results/fleet] [--trials 5] [--hosts 2]   # ~30 min
    .venv/bin/python -m bench.fleet --report-only [--results-dir DIR]    # summary.csv and timeline.png again
    sudo .venv/bin/python -m bench.fleet --quick --results-dir /tmp/fleet   # smoke test, tiny model, ~2 min

One fleet (llm_psi/fleet: --hosts instances, each in its own cgroup pinned to --cpus-per-host CPUs beside its
owner, a co-tenant of --owner burners and an interactive probe) stays up for the whole run; each trial restarts
HAProxy with its balancer and the owners' schedule (--phase-s: host i's owner busy in phase k when k + i is
even), then sends open-loop Poisson arrivals through HAProxy for --duration-s (the same seeded arrivals for
every balancer in round k), and ends at its deadline (--drain-s later; requests then in flight are 'cut' rows).
Trials are interleaved (round k holds every balancer once, shuffled from --seed). Before the trials, a
calibration sends --calibration-requests one at a time to host 0 alone (owners idle): the rate is --load x
hosts / (its mean end-to-end time), the SLO's e2e bound --slo-factor x that time (unless --slo is given).

Files under DIR: plan.json (parameters, calibration, order, commit), trials/<balancer>_t<k>.csv (one row per
request, with the instance that served it, from the x-llm-psi-instance header), trials/<balancer>_t<k>.json
(the cell: commit, clean state, complete, counts, owners' transitions, each owner's probe delays),
trials/<balancer>_t<k>_hosts.csv (every 0.5 s per host: owner busy, agent line and weight),
hosts/ (each instance's and HAProxy's log), summary.csv and timeline.png (bench/fleet/report.py).
Ctrl-C or SIGTERM stops the run, the fleet with it; finished trials are kept.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time

import httpx

from llm_psi import cli
from llm_psi.fleet import haproxy
from llm_psi.fleet.fleet import Fleet, stop_on_signals
from llm_psi.load import cell_files, environment, generator, http_client, probe
from llm_psi.load import trial as trials
from llm_psi.load.cell_run import load_prompts
from bench.fleet.report import report
from bench.sharing import plan

PROG = "python -m bench.fleet"
SAMPLE_S = 0.5


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"{PROG}: error: {message}\n")
    g = p.add_argument_group("run")
    g.add_argument("--results-dir", default="results/fleet")
    g.add_argument("--force", action="store_true", help="write into a results dir that has trials")
    g.add_argument("--report-only", action="store_true", help="summary.csv and timeline.png from the files")
    g.add_argument("--quick", action="store_true", help="smoke test: tiny model, 2 trials of 24 s")
    g.add_argument("--tiny", action="store_true", help="tiny GPT-2 config")
    g.add_argument("--balancers", type=cli.word_list(haproxy.BALANCERS), default=list(haproxy.BALANCERS))
    g.add_argument("--trials", type=cli.finite_number(int, ge=1), default=5, help="per balancer (default: 5)")
    g.add_argument("--seed", type=cli.finite_number(int, ge=0), default=0, help="order and arrivals (default: 0)")
    f = p.add_argument_group("fleet")
    f.add_argument("--hosts", type=cli.finite_number(int, ge=1), default=2, help="(default: 2)")
    f.add_argument("--cpus-per-host", type=cli.finite_number(int, ge=1), default=1, help="(default: 1)")
    f.add_argument("--owner", default="cpu:1+probe:100:10", help="each host's owner (co-tenant spec; default: "
                   "%(default)s)")
    f.add_argument("--no-isolate", action="store_true", help="no cgroups, pinning or owners (not root: a smoke "
                   "test of the pipeline; its owner metrics are NaN)")
    f.add_argument("--phase-s", type=cli.finite_number(float, gt=0), default=45.0, help="(default: 45)")
    f.add_argument("--max-queue-delay-ms", type=cli.finite_number(float, gt=0), default=20000.0,
                   help="each instance's shedding limit (default: 20000)")
    f.add_argument("--max-new-tokens", type=cli.finite_number(int, ge=1), default=16, help="(default: 16)")
    w = p.add_argument_group("load")
    w.add_argument("--duration-s", type=cli.finite_number(float, gt=0), default=90.0, help="(default: 90)")
    w.add_argument("--drain-s", type=cli.finite_number(float, gt=0), default=20.0,
                   help="deadline after the last arrival (default: 20)")
    w.add_argument("--rest-s", type=cli.finite_number(float, ge=0), default=5.0,
                   help="owners idle between trials (default: 5)")
    w.add_argument("--load", type=cli.finite_number(float, gt=0), default=0.5,
                   help="arrival rate as a share of the hosts' capacity alone (default: 0.5)")
    w.add_argument("--rate", type=cli.finite_number(float, gt=0), default=None, help="req/s (default: from --load)")
    w.add_argument("--calibration-requests", type=cli.finite_number(int, ge=2), default=6, help="(default: 6)")
    w.add_argument("--slo-factor", type=cli.finite_number(float, gt=0), default=4.0, help="(default: 4)")
    w.add_argument("--slo", default=None, help="e.g. e2e:20000 (default: e2e from --slo-factor)")
    a = p.parse_args(argv)
    if a.quick:
        a.tiny, a.trials, a.duration_s, a.phase_s, a.drain_s, a.rest_s = True, min(a.trials, 2), 24.0, 12.0, 10.0, 2.0
        a.max_queue_delay_ms, a.calibration_requests = min(a.max_queue_delay_ms, 5000.0), 3
    return a


def calibrate(fleet: Fleet, n: int, max_new_tokens: int) -> float:
    """Mean end-to-end seconds of n requests sent one at a time to host 0 alone (the first, a warm-up, and
    one to every other host, excluded)."""
    for h in fleet.hosts:
        httpx.post(f"{h.url}/v1/completions", json={"prompt": "Hello", "max_tokens": max_new_tokens}, timeout=600)
    times = []
    for i in range(n):
        t = time.monotonic()
        r = httpx.post(f"{fleet.hosts[0].url}/v1/completions",
                       json={"prompt": f"Calibration {i}", "max_tokens": max_new_tokens}, timeout=600)
        r.raise_for_status()
        times.append(time.monotonic() - t)
    return sum(times) / len(times)


def sample_hosts(fleet: Fleet, t0: float, path: str, stop: threading.Event) -> None:
    """Every SAMPLE_S until stop: per host, owner busy, agent line and weight -> path."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t_s", "host", "owner_busy", "agent", "agent_weight_pct"])
        w.writeheader()
        while not stop.wait(SAMPLE_S):
            t = round(time.monotonic() - t0, 3)
            for s in fleet.sample():
                w.writerow({"t_s": t, **s})
            f.flush()


def run_trial(a, fleet: Fleet, balancer: str, k: int, index: int, rate: float, slo: str, d: str) -> None:
    stem = os.path.join(d, "trials", f"{balancer}_t{k}")
    cfg = generator.parse_config(["--arrival", "poisson", "--rate", f"{rate:.6f}", "--duration", f"{a.duration_s:g}",
                                  "--seed", str(a.seed), "--max-new-tokens", str(a.max_new_tokens),
                                  "--deadline-s", f"{a.duration_s + a.drain_s:g}", "--target", fleet.url,
                                  "--output", stem + ".csv", "--slo", slo, "--quiet", "--trials", str(a.trials)])
    client = http_client.Remote(fleet.url)
    sink = cell_files.CsvSink(stem + ".csv")
    owners = [h.owner for h in fleet.hosts]
    marks = [o.probe_records()[1] if o is not None else 0 for o in owners]
    stop, halt = threading.Event(), threading.Event()
    record = {"balancer": balancer, "trial": k, "run_index": index, "complete": False, **environment.code_state(),
              "rate_rps": rate, "slo": slo, "phase_s": a.phase_s, "duration_s": a.duration_s,
              "hosts": [{"name": h.name, "cpus": h.cpus, "cgroup": h.cgroup} for h in fleet.hosts]}
    t = None
    try:
        t0 = fleet.switch(balancer)
        sampler = threading.Thread(target=sample_hosts, args=(fleet, t0, stem + "_hosts.csv", stop), daemon=True)
        sampler.start()
        t = trials.Trial(cfg, client, load_prompts(cfg), sink, k, halt, Progress(), trials.send_times(cfg, k))
        t.t0 = t0
        t.run()
        record["complete"] = True
    finally:
        stop.set()
        if t is not None:
            record.update(counts=dict(t.counts), deadline_hit=t.cut, peak_in_flight=t.peak_in_flight,
                          t0_monotonic=t.t0)
        record["owners"] = {}
        for h, o, m in zip(fleet.hosts, owners, marks):
            if o is not None and t is not None:
                recs = [r for r in o.probe_records(m)[0] if r[0] >= t.t0]
                record["owners"][h.name] = probe.summarize(recs)
        record["transitions"] = fleet.schedule.transitions if fleet.schedule is not None else []
        fleet.rest()
        sink.close()
        client.close()
        with open(stem + ".json", "w") as f:
            json.dump(record, f, indent=2, default=str)
    print(f"[{index}] {balancer} trial {k}: {dict(t.counts) if t else {}}", file=sys.stderr, flush=True)


class Progress:
    def update(self, n):
        pass


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    d = a.results_dir
    if a.report_only:
        print(report(d))
        return 0
    os.makedirs(os.path.join(d, "trials"), exist_ok=True)
    if os.listdir(os.path.join(d, "trials")) and not a.force:
        print(f"{PROG}: error: {d}/trials has results; use --force or another --results-dir", file=sys.stderr)
        return 2
    if haproxy.binary() is None:
        print(f"{PROG}: error: haproxy is not installed (Debian: apt-get install haproxy)", file=sys.stderr)
        return 2
    stop_on_signals()
    serve = ["--admission", "limit", "--concurrency-limit", "1", "--torch-threads", str(a.cpus_per_host),
             "--max-queue-delay-ms", f"{a.max_queue_delay_ms:g}", "--drain-timeout-s", "10"] + ["--tiny"] * a.tiny
    fleet = Fleet(a.hosts, a.balancers[0], serve, owner_spec=a.owner, phase_s=a.phase_s,
                  cpus_per_host=a.cpus_per_host, workdir=os.path.join(d, "hosts"), isolate=not a.no_isolate,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    order = plan(a.balancers, a.trials, a.seed)
    started = time.monotonic()
    try:
        with fleet:
            fleet.rest()
            service_s = calibrate(fleet, a.calibration_requests, a.max_new_tokens)
            rate = a.rate or a.load * a.hosts / service_s
            slo = a.slo or f"e2e:{a.slo_factor * service_s * 1000:.0f}"
            with open(os.path.join(d, "plan.json"), "w") as f:
                json.dump({"args": vars(a), "calibration_e2e_s": service_s, "rate_rps": rate, "slo": slo,
                           "order": order, "serve_args": serve, **environment.code_state()}, f, indent=2)
            print(f"calibration: {service_s:.2f} s per request alone; rate {rate:.3f} req/s; SLO {slo}; "
                  f"{len(order)} trials of ~{a.duration_s + a.drain_s + a.rest_s:.0f} s", file=sys.stderr, flush=True)
            for index, (k, balancer) in enumerate(order, 1):
                run_trial(a, fleet, balancer, k, index, rate, slo, d)
                time.sleep(a.rest_s)
    except KeyboardInterrupt:
        print(f"{PROG}: stopped; finished trials are kept in {d}", file=sys.stderr)
        return 130
    print(f"{len(order)} trials in {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr)
    print(report(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
