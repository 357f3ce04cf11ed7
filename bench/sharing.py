"""Sharing a host (issue 21): the kernel's CPU-sharing controls against our pressure-driven controller, beside a
co-tenant that comes and goes.

    sudo .venv/bin/python -m bench.sharing [--results-dir results/sharing] [--force] [--trials 3] [--seed 0]
    .venv/bin/python -m bench.sharing --report-only --results-dir DIR     # summary and figures from the files

Steps (every file under DIR; an existing DIR with results is refused without --force):
 0. calibration: the static quota's (cgroups) capacity alone, closed loop c=8 -> DIR/calibration.csv; the
    phases' arrival rate is --load (0.7) x that capacity (DIR/plan.json).
 1. trials: --trials per configuration, interleaved (round k holds trial k of every configuration, each round
    shuffled from --seed, never the same configuration twice in a row across rounds). A trial, under DIR/trials/:
      <config>_t<k>_reference.json  the co-tenant (burners + probe) alone, no service: its throughput and the
                                    probe's delays alone (the host's speed drifts, so every trial has its own);
      <config>_t<k>_alone.csv       capacity: closed loop c=8, the service alone;
      <config>_t<k>_cotenant.csv    capacity: closed loop c=8 beside the burners (--burners);
      <config>_t<k>_phases.csv      open-loop Poisson arrivals at the rate above for the whole --schedule, the
                                    co-tenant (burners + probe) off, on, off (paused with SIGSTOP while off).
    Every service run is in the service cgroup made by llm_psi.load.runner.wrap (the configuration's quota and
    sharing controls); the co-tenant in its sibling cgroup. Each service trial ends at its deadline (the
    generator's --deadline-s: --capacity-limit-s after a capacity trial starts, or after the schedule), its
    requests then in flight written as 'cut' rows, so a starved service's cell is still complete.
 2. report: DIR/summary.csv (config, phase, metric, mean, ci_lo, ci_hi, n_trials), DIR/timeline_<config>.png,
    DIR/frontier.png (bench/sharing_report.py).
Ctrl-C or SIGTERM stops the running step (exit 130); finished trials are kept.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

from llm_psi import REPO, cgroups, cli
from llm_psi import config as configs
from llm_psi.analysis import phases
from llm_psi.load import arrivals, cotenant, probe, runner
from bench.cotenant import call
from bench.sharing_report import CONFIGS, DEFAULT_SLO, report, throughput

PROG = "python -m bench.sharing"
CONCURRENCY = 8


def plan(config_list, trials: int, seed: int) -> list[tuple[int, str]]:
    """[(trial, config)]: round k shuffled from random.Random(seed), and a round never starts with the
    configuration that ended the one before (so consecutive trials switch configuration)."""
    rng, runs = random.Random(seed), []
    for k in range(1, trials + 1):
        order = list(config_list)
        rng.shuffle(order)
        if runs and len(order) > 1 and order[0] == runs[-1][1]:
            order[0], order[-1] = order[-1], order[0]
        runs += [(k, c) for c in order]
    return runs


def generator(a, config: str, out: str, *, rate=None, antagonist=None, schedule=None) -> list:
    """The request generator for a capacity run (closed loop, no rate) or the phased run (open loop); each
    trial ends at its --deadline-s (--capacity-limit-s after its start, or after the schedule), a complete cell
    whose requests in flight then are 'cut' rows."""
    cmd = [sys.executable, os.path.join(REPO, "request_generator.py"), "--config", config, "--concurrency",
           str(CONCURRENCY), "--seed", str(a.seed), "--max-new-tokens", str(a.max_new_tokens), "--output", out,
           "--quiet", "--force", "--slo", a.slo]
    if rate is None:
        cmd += ["--num-requests", str(a.capacity_requests), "--spacing-ms", "0",
                "--deadline-s", f"{a.capacity_limit_s:g}"]
    else:
        duration = sum(s for _, s in phases.parse_schedule(schedule))
        cmd += ["--arrival", "poisson", "--rate", f"{rate:.4f}", "--duration", f"{duration:g}",
                "--antagonist-schedule", schedule, "--deadline-s", f"{duration + a.capacity_limit_s:g}"]
    return cmd + (["--antagonist", antagonist] if antagonist else []) + ["--tiny"] * a.tiny


HARD_LIMIT_S = 900.0  # beyond a run's deadline: the model's load, the warm-up and the cut (a safety, not a measure)


def bounded(cmd: list, limit_s: float) -> tuple[int, bool]:
    """Run cmd (in its own process group, dying with this process) for at most limit_s: then SIGTERM (the
    generator keeps its finished rows, its cell stays incomplete; cgroup_lib forwards it and removes the
    cgroup). (exit status, timed out). A Ctrl-C here reaches it once and raises KeyboardInterrupt after it
    stopped."""
    proc = cgroups.spawn([], cmd, process_group=0)
    try:
        try:
            return proc.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            return proc.returncode, True
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise


def served(a, config: str, out: str, cmd: list) -> list:
    return runner.wrap(cmd, config, name=a.cgroup_name, meta=out[:-4] + ".json", root=os.geteuid() == 0)


class Harness:
    """Runs the steps, printing one progress line per step."""

    def __init__(self, a):
        self.a, self.t0 = a, time.monotonic()
        self.tenant = f"{a.burners}+{a.probe}"

    def say(self, msg):
        print(f"[{(time.monotonic() - self.t0) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    def must(self, cmd, what, deadline_s=None):
        """Run cmd; a failure raises. A service run (its trial ends at deadline_s) still running HARD_LIMIT_S
        past it is stopped, its cell left incomplete (the report leaves it out and names it)."""
        if deadline_s is None:
            if call(cmd) != 0:
                raise RuntimeError(f"{what} failed")
            return
        rc, late = bounded(cmd, deadline_s + HARD_LIMIT_S)
        if late:
            self.say(f"{what}: stopped {HARD_LIMIT_S:g} s past its deadline; its cell is incomplete")
        elif rc != 0:
            raise RuntimeError(f"{what} failed (exit status {rc})")

    def calibrate(self) -> float:
        a, out = self.a, os.path.join(self.a.results_dir, "calibration.csv")
        self.say(f"calibration: cgroups (the static quota) alone, closed loop c={CONCURRENCY} -> {out}")
        self.must(served(a, "cgroups", out, generator(a, "cgroups", out)), "calibration", a.capacity_limit_s)
        capacity = throughput(out)
        if not capacity > 0:
            raise RuntimeError(f"no capacity measured in {out}")
        rate = a.load * capacity
        with open(os.path.join(a.results_dir, "plan.json"), "w") as f:
            json.dump({"quota_capacity_rps": capacity, "load": a.load, "rate_rps": rate, "schedule": a.schedule,
                       "cotenant": self.tenant, "burners": a.burners, "trials": a.trials, "seed": a.seed,
                       "configs": a.configs, "slo": a.slo, "max_new_tokens": a.max_new_tokens,
                       "capacity_requests": a.capacity_requests, "reference_seconds": a.reference_seconds}, f, indent=2)
        self.say(f"calibration: {capacity:.3f} req/s; phases at {rate:.3f} req/s")
        return rate

    def trial(self, k: int, config: str, rate: float, i: int, n: int):
        a, d = self.a, os.path.join(self.a.results_dir, "trials")
        stem = os.path.join(d, f"{config}_t{k}")
        self.say(f"[{i}/{n}] trial {k} {config}: reference ({self.tenant} alone, {a.reference_seconds:g} s)")
        self.must([sys.executable, "-m", "llm_psi.load.cotenant", "--antagonist", self.tenant, "--seconds",
                   str(a.reference_seconds), "--json", stem + "_reference.json"], "reference")
        for name, tenant in (("alone", None), ("cotenant", a.burners)):
            out = f"{stem}_{name}.csv"
            self.say(f"[{i}/{n}] trial {k} {config}: capacity {name} (c={CONCURRENCY}) -> {out}")
            self.must(served(a, config, out, generator(a, config, out, antagonist=tenant)), f"capacity {name}",
                      a.capacity_limit_s)
        out = f"{stem}_phases.csv"
        self.say(f"[{i}/{n}] trial {k} {config}: phases {a.schedule} at {rate:.3f} req/s -> {out}")
        span = sum(secs for _, secs in phases.parse_schedule(a.schedule))
        self.must(served(a, config, out, generator(a, config, out, rate=rate, antagonist=self.tenant,
                                                   schedule=a.schedule)), "phases", span + a.capacity_limit_s)

    def run(self):
        a = self.a
        os.makedirs(os.path.join(a.results_dir, "trials"), exist_ok=True)
        rate = a.rate if a.rate is not None else self.calibrate()
        runs = plan(a.configs, a.trials, a.seed)
        for i, (k, config) in enumerate(runs, 1):
            self.trial(k, config, rate, i, len(runs))
        self.say(f"done: {len(runs)} trials of {len(a.configs)} configurations")


def _config_list(text):
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in configs.CONFIGS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {','.join(bad) or text!r}")
    return list(dict.fromkeys(names))


def parse_args(argv):
    p = cli.OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    num = cli.finite_number
    run = p.add_argument_group("run")
    run.add_argument("--results-dir", default=os.path.join("results", "sharing"), help="where every file goes")
    run.add_argument("--force", action="store_true", help="replace the results of an earlier run in --results-dir")
    run.add_argument("--report-only", action="store_true", help="summary and figures from existing files; run nothing")
    run.add_argument("--configs", type=_config_list, default=",".join(CONFIGS), help="comma-separated configurations")
    run.add_argument("--trials", type=num(int, ge=1), default=3, help="trials per configuration")
    run.add_argument("--seed", type=num(int, ge=0), default=0, help="the interleaved order, arrivals, sampling")
    run.add_argument("--quick", action="store_true", help="smoke run: phases off:4,on:6,off:4, 4 tokens, 4 capacity "
                                                          "requests, 3 s reference (explicit options win)")
    tenant = p.add_argument_group("co-tenant")
    tenant.add_argument("--schedule", type=cli.checked_by(phases.parse_schedule), default="off:30,on:45,off:30",
                        help="the co-tenant's phases in the phased run (seconds)")
    tenant.add_argument("--burners", type=cli.checked_by(cotenant.parse_spec), default="cpu:2",
                        help="the co-tenant's batch work (also the capacity run's co-tenant)")
    tenant.add_argument("--probe", type=cli.checked_by(probe.parse), default="probe:100:10",
                        help="the co-tenant's interactive program, probe:PERIOD_MS:WORK_MS")
    tenant.add_argument("--reference-seconds", type=num(gt=0), default=15.0, help="the co-tenant alone, per trial")
    load = p.add_argument_group("load")
    load.add_argument("--load", type=num(gt=0), default=0.7, help="phased arrival rate / the static quota's capacity")
    load.add_argument("--rate", type=num(gt=0), default=None, help="phased arrival rate in req/s (default: calibrated)")
    load.add_argument("--slo", type=cli.checked_by(arrivals.parse_slo), default=DEFAULT_SLO, help="goodput SLO")
    load.add_argument("--max-new-tokens", type=num(int, ge=1), default=50, help="tokens per request")
    load.add_argument("--capacity-requests", type=num(int, ge=1), default=8, help="requests per capacity run (c=8)")
    load.add_argument("--capacity-limit-s", type=num(gt=0), default=120.0,
                      help="a capacity trial ends this long after it starts (the generator's --deadline-s; e.g. a "
                           "starved idle service), the phased trial this long after its schedule: the requests "
                           "in flight are cut, and capacity = ok requests / the trial's span")
    svc = p.add_argument_group("service")
    svc.add_argument("--cgroup-name", default=configs.CGROUP_NAME, type=cli.cgroup_name,
                     help="the service cgroup")
    svc.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    a = p.parse_args(argv)
    if a.quick:
        given = set(argv)
        for flag, key, value in (("--schedule", "schedule", "off:4,on:6,off:4"),
                                 ("--max-new-tokens", "max_new_tokens", 4),
                                 ("--capacity-requests", "capacity_requests", 4),
                                 ("--reference-seconds", "reference_seconds", 3.0)):
            if flag not in given:
                setattr(a, key, value)
    return a


def existing(d: str) -> list[str]:
    return sorted(glob.glob(os.path.join(d, "*.csv")) + glob.glob(os.path.join(d, "plan.json"))
                  + glob.glob(os.path.join(d, "trials", "*")))


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not a.report_only:
            if os.geteuid() != 0:
                print(f"{PROG}: error: must run as root (sudo): every configuration runs in a cgroup of its own "
                      f"(--report-only needs no root)", file=sys.stderr)
                return 2
            found = existing(a.results_dir)
            if found and not a.force:
                print(f"{PROG}: error: {a.results_dir} holds results ({found[0]}, {len(found)} in all); --force "
                      f"replaces them", file=sys.stderr)
                return 2
            for path in found:
                os.remove(path)
            for s in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, cotenant._interrupt)
            Harness(a).run()
        print(report(a.results_dir), end="")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished trials are kept in {a.results_dir}", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if a.report_only else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
