"""The host owner's work in the protection study (issue 32), in the co-tenant's cgroup (load.cotenant).

Two kinds, as a spec:
  interactive:RATE:COST_MS   a latency-sensitive program: requests at a fixed RATE per second on a clock (open
                             loop: request k is due at (k + 1/2) / RATE s after the start), each computing
                             COST_MS of its own CPU time, served one after another (FIFO). Its latency counts from
                             the due time, so time queued behind a late request counts. RATE x COST_MS is the
                             share of a core it loads (default interactive:20:15, 30% of a core). One raw row per
                             request: request, t_due_s, t_start_s, t_end_s, latency_ms (times since its start).
                             A request not started by the end of the phase is not run (it was not achieved).
  batch:N                    N of the co-tenant's burners (cpu:N): fixed units of work, counted each second.

Owner(spec, seconds, raw_csv) runs one phase: start() puts it in its cgroup (RuntimeError where it cannot have
one: the study needs its counters), finish() waits for the phase's end
and returns its record (its seconds and cgroup CPU seconds; a batch owner's per-second rows are written to
raw_csv then), stop() ends it and removes the cgroup (every exit path, as Cotenant does).

CLI (what the interactive owner runs in its cgroup):
  python -m llm_psi.load.owner --rate 20 --cost-ms 15 --seconds 30 --csv PATH
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

from llm_psi import cli
from llm_psi.load import cotenant, probe

KINDS = ("interactive", "batch")
DEFAULT = "interactive:20:15"
COLUMNS = ["request", "t_due_s", "t_start_s", "t_end_s", "latency_ms"]
BATCH_COLUMNS = ["t_s", "units", "units_per_s", "cpu_s", "cpu_share"]
FINISH_GRACE_S = 30.0     # an interactive owner that has not exited this long after its phase is an error


def parse(text: str):
    """'interactive:RATE:COST_MS' -> ('interactive', (rate, cost_ms)), with cost < 1 s / rate (it must fit its
    period); 'batch:N' -> ('batch', N). ValueError (one line) otherwise."""
    parts = (text or "").strip().lower().split(":")
    if parts[0] == "batch" and len(parts) == 2:
        kind, n = cotenant.parse_spec(f"cpu:{parts[1]}")
        return "batch", n
    if parts[0] == "interactive" and len(parts) == 3:
        try:
            rate, cost = float(parts[1]), float(parts[2])
        except ValueError:
            rate = cost = float("nan")
        if 0 < rate <= 1000 and 0 < cost < 1000.0 / rate:
            return "interactive", (rate, cost)
    raise ValueError(f"bad owner spec {text!r}: interactive:RATE:COST_MS (0 < RATE <= 1000, COST_MS < 1000/RATE) "
                     f"or batch:N")


def due_times(rate: float, seconds: float) -> list[float]:
    """The open-loop schedule: (k + 1/2) / rate for every k due before `seconds`."""
    return [(k + 0.5) / rate for k in range(int(seconds * rate + 0.5)) if (k + 0.5) / rate < seconds]


def serve(rate: float, cost_ms: float, seconds: float, out, clock=time.monotonic, sleep=time.sleep,
          work=probe._spin) -> int:
    """Run the interactive owner for `seconds`: each due request computes cost_ms of CPU, one after another; a row
    per request to the csv writer `out`. Returns the requests served."""
    t0, n = clock(), 0
    for k, due in enumerate(due_times(rate, seconds)):
        wait = t0 + due - clock()
        if wait > 0:
            sleep(wait)
        start = clock() - t0
        if start >= seconds:
            break
        work(cost_ms / 1000.0)
        end = clock() - t0
        out.writerow([k, f"{due:.6f}", f"{start:.6f}", f"{end:.6f}", f"{(end - due) * 1000:.3f}"])
        n += 1
    return n


class Owner:
    """One phase of the owner's work in the co-tenant's cgroup `name`."""

    def __init__(self, spec: str, seconds: float, raw_csv: str, name: str = "llm_cotenant", log=print):
        self.kind, self.arg = parse(spec)
        if any(c.isspace() for c in raw_csv) or cotenant.SHELL_CHARS & set(raw_csv):
            raise ValueError(f"owner raw CSV path {raw_csv!r} has a space or shell character")
        self.spec, self.seconds, self.raw_csv, self.log = spec, seconds, raw_csv, log
        if self.kind == "interactive":
            rate, cost = self.arg
            tenant = (f"{sys.executable} -m llm_psi.load.owner --rate {rate:g} --cost-ms {cost:g} "
                      f"--seconds {seconds:g} --csv {raw_csv}")
        else:
            tenant = f"cpu:{self.arg}"
        self.tenant = cotenant.Cotenant(tenant, name=name, log=log)
        self.sampler, self.t0 = None, None

    def start(self):
        self.t0 = time.monotonic()
        self.tenant.start()
        if self.tenant.cgroup_error:        # no counters, no pressure: not a measurement of this study
            self.tenant.stop()
            raise RuntimeError(f"the owner has no cgroup of its own: {self.tenant.cgroup_error}")
        if self.kind == "batch":
            self.sampler = cotenant.ThroughputSampler(self.tenant, self.t0).start()
        return self

    def finish(self) -> dict:
        """Wait for the phase's end; return {seconds (the phase as measured), cpu_s (the cgroup's CPU seconds)}."""
        if self.kind == "interactive":
            proc = self.tenant.procs[0]
            try:
                rc = proc.wait(timeout=self.seconds + FINISH_GRACE_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"the interactive owner did not end {FINISH_GRACE_S:g} s after its phase")
            if rc != 0:
                raise RuntimeError(f"the interactive owner failed (exit status {rc})")
        else:
            time.sleep(max(0.0, self.t0 + self.seconds - time.monotonic()))
        elapsed, cpu_s = time.monotonic() - self.t0, self.tenant.cpu_usage_s()
        if self.sampler is not None:
            rows = self.sampler.stop()
            with open(self.raw_csv, "w", newline="") as f:
                w = csv.DictWriter(f, BATCH_COLUMNS)
                w.writeheader()
                w.writerows(rows)
        return {"spec": self.spec, "kind": self.kind, "seconds": round(elapsed, 4),
                "cpu_s": None if cpu_s is None else round(cpu_s, 4), "cotenant": self.tenant.describe()}

    def stop(self):
        if self.sampler is not None:
            self.sampler.stop()
        self.tenant.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    p = cli.OneLineParser(prog="python -m llm_psi.load.owner",
                          description="The interactive owner: requests at --rate per second, each --cost-ms of CPU, "
                                      "for --seconds; one CSV row per request.")
    num = cli.finite_number
    p.add_argument("--rate", type=num(gt=0, le=1000), default=20.0, help="requests per second (default %(default)s)")
    p.add_argument("--cost-ms", type=num(gt=0), default=15.0, help="CPU ms per request (default %(default)s)")
    p.add_argument("--seconds", type=num(gt=0), default=30.0, help="the phase (default %(default)s)")
    p.add_argument("--csv", required=True, help="where the rows go")
    a = p.parse_args(argv)
    if a.cost_ms >= 1000.0 / a.rate:
        p.error(f"--cost-ms {a.cost_ms:g} does not fit a period of {1000.0 / a.rate:g} ms")
    if not os.path.isdir(os.path.dirname(os.path.abspath(a.csv))):
        p.error(f"--csv: no directory for {a.csv!r}")
    with open(a.csv, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        serve(a.rate, a.cost_ms, a.seconds, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
