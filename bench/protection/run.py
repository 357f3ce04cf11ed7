"""Running the protection study (issue 32): calibration, the trials, the pilot's power computation.

A trial is one cell (config, owner, llm_load, k) under DIR/trials/, stem <config>_<owner>_<load>_t<k>:
  _alone_owner.csv   the owner alone (no LLM service on the host): its raw rows (interactive: one per request;
                     batch: one per second)
  _with_owner.csv    the owner with the LLM service at the load, the same length of phase
  _llm.csv/.json     the load generator's rows (outside the service's cgroup, over HTTP; none for idle)
  _service.json      cgroup_lib's record of the service cgroup; _headroom.log the headroom controller's changes
  .json              the cell: git commit and dirty state, the phases' lengths and cgroup CPU seconds (owner
                     alone and with, the LLM's over the owner's with phase), the host's CPUs, and complete: true
                     once every file is written (--resume reruns the cells that are not complete)
Order of a trial: the owner alone for --alone-s; the service started in its cgroup (the configuration's
controls), ready and warmed up with one untimed request; the headroom controller (headroom only); the load
generator started, and as soon as it is up (its cell JSON written) the owner, for --with-s; the generator's
trial ends at the same deadline. The service, the controller and the owner are stopped on every exit path.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

from llm_psi import REPO, cgroups
from llm_psi.analysis import stats
from llm_psi.control.headroom import info_of
from llm_psi.load import owner as owners
from llm_psi.load import runner
from llm_psi.load.environment import code_state
from bench.protection import report as rep

STARTUP_LIMIT_S = 600.0      # the service's start (the model's load) and the generator's
GENERATOR_GRACE_S = 120.0    # past its deadline: the generator's cut and its files


def plan(cells, trials: int, seed: int, first: int = 1) -> list[tuple[int, str]]:
    """[(trial, cell)] for trials first..trials: round k holds trial k of every cell in an order drawn from
    random.Random(seed) (rounds drawn in turn from round 1, so a part resumed later keeps the order), and a round
    never starts with the cell that ended the one before."""
    rng, runs = random.Random(seed), []
    for k in range(1, trials + 1):
        order = list(cells)
        rng.shuffle(order)
        if runs and len(order) > 1 and order[0] == runs[-1][1]:
            order[0], order[-1] = order[-1], order[0]
        runs += [(k, c) for c in order]
    return [(k, c) for k, c in runs if k >= first]


def _counters(info) -> dict | None:
    """The LLM cgroup's counters (cgroups.read_counters), None where it is gone."""
    return cgroups.read_counters(info) if os.path.isdir(info["cpu"]) else None


def _stop(proc, grace_s=30.0):
    """SIGTERM to proc's process group, SIGKILL after grace_s; reaped."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


class Trial:
    """One trial's processes, started in order and stopped on every exit path (close)."""

    def __init__(self, h, config, owner_kind, load, k):
        self.h, self.a = h, h.a
        self.config, self.owner_kind, self.load, self.k = config, owner_kind, load, k
        self.stem = rep.stem(self.a.results_dir, config, owner_kind, load, k)
        self.service = self.controller = self.generator = self.owner = None
        self.port = self.a.port

    def owner_phase(self, which, seconds, llm_info=None):
        spec = self.a.interactive if self.owner_kind == "interactive" else self.a.batch
        path = f"{self.stem}_{which}_owner.csv"
        self.owner = owners.Owner(spec, seconds, path, name=self.a.owner_cgroup, log=self.h.quiet_log)
        before = _counters(llm_info) if llm_info else None
        self.owner.start()
        rec = self.owner.finish()
        after = _counters(llm_info) if llm_info else None
        self.owner.stop()
        self.owner = None
        if llm_info:
            delta = cgroups.counter_delta(before, after) or {}
            rec["llm_counters"] = delta
            usage = delta.get("usage_usec")
            rec["llm_cpu_s"] = None if usage is None else round(usage / 1e6, 4)
        return rec

    def start_service(self):
        a, py = self.a, sys.executable
        cmd = [py, os.path.join(REPO, "llm_server.py"), "serve", "--config", self.config, "--port", str(self.port),
               "--host", "127.0.0.1", *shlex.split(a.engine_args or ""),
               *(["--torch-threads", a.torch_threads] if a.torch_threads else []), *(["--tiny"] if a.tiny else [])]
        served = runner.wrap(cmd, self.config, name=a.cgroup_name, meta=f"{self.stem}_service.json", root=True,
                             own=True)
        log = open(f"{self.stem}_service.log", "w")
        self.service = cgroups.spawn([], served, process_group=0, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        from llm_psi.load import http_client
        try:
            client = http_client.Remote(f"http://127.0.0.1:{self.port}", self.config, wait_s=STARTUP_LIMIT_S)
        except http_client.RemoteError as e:
            raise RuntimeError(f"{self.config}: the service did not start ({e}; see {self.stem}_service.log)")
        try:
            out, _ = client.send("Warm up.", a.max_new_tokens, 0)      # untimed: lazy initialisation
        finally:
            client.close()
        if out.status != "ok":
            raise RuntimeError(f"{self.config}: the warm-up request failed ({out.status}: {out.error})")
        if self.config == "headroom":
            with open(f"{self.stem}_headroom.log", "w") as log:
                self.controller = cgroups.spawn(
                    [], [py, "-m", "llm_psi.control.headroom", "--llm", a.cgroup_name, "--owner", a.owner_cgroup],
                    process_group=0, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)

    def generator_cmd(self, seconds):
        a, out = self.a, f"{self.stem}_llm.csv"
        cmd = [sys.executable, os.path.join(REPO, "request_generator.py"), "--config", self.config, "--target",
               f"http://127.0.0.1:{self.port}", "--no-warmup", "--seed", str(a.seed * 1000 + self.k),
               "--max-new-tokens", str(a.max_new_tokens), "--slo", a.slo, "--output", out, "--quiet", "--force",
               "--deadline-s", f"{seconds:g}", *(["--tiny"] if a.tiny else [])]
        if self.load == "saturated":
            return cmd + ["--concurrency", str(a.saturate_concurrency), "--num-requests", "100000",
                          "--spacing-ms", "0"]
        return cmd + ["--arrival", "poisson", "--rate", f"{self.h.rate:.4f}", "--duration", f"{seconds:g}"]

    def start_generator(self, seconds):
        """The load generator, outside the service's cgroup; returns once it is up (its cell JSON written)."""
        meta = f"{self.stem}_llm.json"
        if os.path.exists(meta):
            os.remove(meta)
        self.generator = cgroups.spawn([], self.generator_cmd(seconds), process_group=0, cwd=REPO)
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while not os.path.exists(meta):
            if self.generator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the load generator did not start (exit status {self.generator.poll()})")
            time.sleep(0.02)

    def run(self) -> dict:
        a = self.a
        record = {"config": self.config, "owner": self.owner_kind, "llm_load": self.load, "trial": self.k,
                  **code_state(), "seed": a.seed, "cpus": len(os.sched_getaffinity(0)),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "complete": False,
                  "owner_spec": a.interactive if self.owner_kind == "interactive" else a.batch,
                  "alone_s": a.alone_s, "with_s": a.with_s}
        record["alone"] = self.owner_phase("alone", a.alone_s)
        self.start_service()
        llm = info_of(a.cgroup_name)
        if self.load != "idle":
            self.start_generator(a.with_s)        # up first: the owner then starts as its requests go out
        record["with"] = self.owner_phase("with", a.with_s, llm)
        if self.generator is not None:
            try:
                rc = self.generator.wait(GENERATOR_GRACE_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"the load generator ran {GENERATOR_GRACE_S:g} s past its deadline")
            if rc != 0:
                raise RuntimeError(f"the load generator failed (exit status {rc})")
            # the generator's own CPU (outside every cgroup of the study, at the default priority): its cost
            # to the owner is in lat-imp, not in the LLM's counters
            record["with"]["client_cpu_s"] = (rep.read_json(f"{self.stem}_llm.json") or {}).get("client_cpu_s")
        record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record["complete"] = True
        return record

    def close(self):
        for proc in (self.generator, self.controller, self.service):
            _stop(proc)
        if self.owner is not None:
            self.owner.stop()


class Harness:
    def __init__(self, a):
        self.a, self.t0, self.rate = a, time.monotonic(), a.llm_rate

    def say(self, msg):
        print(f"[{(time.monotonic() - self.t0) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    def quiet_log(self, msg):
        if "warning" in msg or "error" in msg or "could not" in msg:
            self.say(msg)

    def calibrate(self, plan_doc):
        """The paper's quota's capacity alone (cgroups, closed loop at the saturating depth): the interactive
        load's rate is --llm-fraction of it, and its tokens/s the LLM's promise beside a saturating owner.
        Then the LLM alone without a limit (baseline, the same load): the CPU it can use at all, the ceiling
        of its work conservation beside an owner."""
        if self.rate is None and "quota_capacity_rps" not in plan_doc:
            rps, tps, _ = self._alone("cgroups", "calibration")
            self.rate = self.a.llm_fraction * rps
            plan_doc.update(quota_capacity_rps=rps, quota_tokens_per_s=tps, rate_rps=self.rate)
            self.say(f"calibration: {rps:.3f} req/s, {tps:.1f} tokens/s; interactive load {self.rate:.3f} req/s")
        self.rate = self.rate or plan_doc["rate_rps"]
        if self.a.llm_rate is None and "llm_alone_cpu_per_s" not in plan_doc:
            rps, tps, cpu = self._alone("baseline", "calibration_alone")
            plan_doc.update(llm_alone_rps=rps, llm_alone_tokens_per_s=tps, llm_alone_cpu_per_s=cpu)
            self.say(f"calibration: no limit, alone: {rps:.3f} req/s, {tps:.1f} tokens/s, {cpu:.3f} CPU-s/s")

    def _alone(self, config, name):
        """The LLM alone under ``config``, the saturating closed loop for --with-s: (req/s, tokens/s, the
        service cgroup's CPU-seconds per second over the load)."""
        trial = Trial(self, config, "calibration", "saturated", 0)
        trial.stem = os.path.join(self.a.results_dir, name)
        self.say(f"calibration: {config} alone, closed loop c={self.a.saturate_concurrency}, {self.a.with_s:g} s")
        try:
            trial.start_service()
            llm = info_of(self.a.cgroup_name)
            before, t0 = _counters(llm), time.monotonic()
            trial.start_generator(self.a.with_s)
            if trial.generator.wait(self.a.with_s + GENERATOR_GRACE_S) != 0:
                raise RuntimeError("calibration: the load generator failed")
            usage = (cgroups.counter_delta(before, _counters(llm)) or {}).get("usage_usec")
            seconds = time.monotonic() - t0
        finally:
            trial.close()
        rps, tps = rep.llm_rates(trial.stem + "_llm.csv", self.a.with_s)
        if not rps > 0:
            raise RuntimeError(f"calibration ({config}): no request finished")
        return rps, tps, None if usage is None else round(usage / 1e6 / seconds, 4)

    def run_trials(self, runs):
        a, done = self.a, 0
        for i, (k, cell) in enumerate(runs, 1):
            config, owner_kind, load = cell.split(":")
            path = rep.stem(a.results_dir, config, owner_kind, load, k) + ".json"
            if a.resume and (rep.read_json(path) or {}).get("complete"):
                continue
            if a.stop_after_min and time.monotonic() - self.t0 > a.stop_after_min * 60:
                self.say(f"stopping after {a.stop_after_min:g} min as asked; continue with --resume")
                break
            self.say(f"[{i}/{len(runs)}] trial {k} {config} owner={owner_kind} llm={load}")
            trial = Trial(self, config, owner_kind, load, k)
            try:
                record = trial.run()
            except RuntimeError as e:             # recorded, not complete: --resume runs it again
                self.say(f"trial {k} {cell} failed: {e}")
                record = {"config": config, "owner": owner_kind, "llm_load": load, "trial": k, "complete": False,
                          "error": str(e), **code_state()}
            finally:
                trial.close()
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
            done += 1
        self.say(f"{done} trial(s) run")


def power_plan(d: str, trials_done: int) -> dict:
    """From the pilot's trials under d: each metric's per-trial SD pooled over the cells, and for the goal's
    differences the trials per configuration that resolve them (80% power, two-sided 5%: report.power_rows);
    "trials" is the largest of those."""
    rows = rep.power_rows(rep.trial_values(d), rep.METRICS)
    needed = [r["trials_for_80pct"] for r in rows if "trials_for_80pct" in r]
    return {"pilot_trials": trials_done, "power_target": 0.8, "level": stats.LEVEL, "metrics": rows,
            "trials": max(needed) if needed else None}


def trial_seconds(a) -> float:
    """A trial's wall time, roughly: the two phases, the service's start, warm-up and stop (measured on this
    2-core host: about 15 s with the 124M model; a guess elsewhere)."""
    return a.alone_s + a.with_s + (3.0 if a.tiny else 15.0)


def duration_text(a, cells: int, trials: int) -> str:
    s = trial_seconds(a) * cells * trials
    return f"{cells} cells x {trials} trials x ~{trial_seconds(a):.0f} s = ~{s / 3600:.1f} h"

