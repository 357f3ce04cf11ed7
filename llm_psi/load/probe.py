"""The interactive co-tenant: a probe that stands for the host owner's foreground program.

`probe:PERIOD_MS:WORK_MS` (in a co-tenant spec, alone or with burners: cpu:2+probe:100:10) wakes every PERIOD_MS
on a fixed schedule, computes for WORK_MS of its own CPU time, and records for each period how late it woke
(wake delay: wake-up - scheduled time) and how late it finished (completion delay: end - (scheduled time +
WORK_MS), so 0 on an idle host). A period missed while the probe still computed is skipped. The records go
into shared memory (ProbeRing) that the load generator reads; a pause (SIGSTOP, the co-tenant's schedule)
bumps a generation counter before the SIGCONT, and the probe then starts its schedule afresh instead of
counting the pause as delay.
"""
from __future__ import annotations

import csv
import gzip
import math
import mmap
import os
import sys
import time

SAMPLES = ["trial", "t_s", "wake_ms", "delay_ms"]  # the per-period samples' CSV, times from the run's t0
RING = 1 << 16            # records kept; older ones are overwritten (the reader reads far more often)
HEADER = 2                # [generation, records written]
FIELDS = 3                # a record: scheduled time (CLOCK_MONOTONIC, us), wake delay (us), completion delay (us)


def parse(text: str):
    """'probe:100:10' -> (100.0, 10.0) (period and work, ms; 0 < work < period <= 10 s); ValueError if bad."""
    parts = text.split(":")
    try:
        period, work = (float(x) for x in parts[1:]) if len(parts) == 3 and parts[0] == "probe" else (math.nan,) * 2
    except ValueError:
        period = work = math.nan
    if not (0 < work < period <= 10000):
        raise ValueError(f"bad probe spec {text!r}: probe:PERIOD_MS:WORK_MS needs 0 < WORK_MS < PERIOD_MS <= 10000")
    return period, work


class ProbeRing:
    """Shared records of one probe, per period: its scheduled time (time.monotonic(), the same clock in every
    process), wake delay and completion delay; and the generation."""

    def __init__(self, fd=None):
        size = 8 * (HEADER + FIELDS * RING)
        self.own_fd = fd is None
        if fd is None:
            fd = os.memfd_create("cotenant_probe")
            os.ftruncate(fd, size)
        self.fd = fd
        self.mem = memoryview(mmap.mmap(fd, size)).cast("Q")
        self.read_at = 0

    def close_fd(self):
        if self.own_fd and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def bump(self):
        """A new generation: the probe re-anchors its schedule (after a pause)."""
        self.mem[0] += 1

    def write(self, t_s, wake_us, done_us):
        n = self.mem[1]
        i = HEADER + FIELDS * (n % RING)
        self.mem[i], self.mem[i + 1], self.mem[i + 2] = int(t_s * 1e6), max(0, int(wake_us)), max(0, int(done_us))
        self.mem[1] = n + 1

    def count(self):
        return self.mem[1]

    def since(self, start):
        """(records from index start on, as (t_s, wake_ms, done_ms), the next index)."""
        n = self.mem[1]
        start = max(start, n - RING)
        out = []
        for k in range(start, n):
            i = HEADER + FIELDS * (k % RING)
            out.append((self.mem[i] / 1e6, self.mem[i + 1] / 1000.0, self.mem[i + 2] / 1000.0))
        return out, n

    def new(self):
        """The records written since the last call to new()."""
        out, self.read_at = self.since(self.read_at)
        return out


def percentile(values, q):
    values = sorted(values)
    if not values:
        return math.nan
    pos = (len(values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize(records) -> dict:
    """p50/p99 of the wake-up and completion delays (ms) of (t_s, wake_ms, done_ms) records, and their number."""
    wake, done = [r[1] for r in records], [r[2] for r in records]
    return {"n": len(records), "wake_p50_ms": percentile(wake, 50), "wake_p99_ms": percentile(wake, 99),
            "delay_p50_ms": percentile(done, 50), "delay_p99_ms": percentile(done, 99)}


def write_samples(path: str, records, t0: float, trial=None) -> None:
    """Append the per-period (t_s, wake_ms, done_ms) records to a CSV (gzip where the path ends .gz), t_s from
    t0, one row per period, so a summary's p50/p99 can be recomputed; the header goes to a new file only."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "at", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(SAMPLES)
        w.writerows(("" if trial is None else trial, round(t - t0, 6), wake, done) for t, wake, done in records)


def _spin(work_s):
    end = time.thread_time() + work_s
    x = 1
    while time.thread_time() < end:
        for i in range(200):
            x = (x * 1103515245 + i) & 0xFFFFFFFF


def run(fd, period_ms, work_ms):
    """The probe process: until its parent is gone, wake every period, compute, record."""
    ring, parent = ProbeRing(fd), os.getppid()
    period, work = period_ms / 1000.0, work_ms / 1000.0
    gen, t0, k = ring.mem[0], time.monotonic(), 0
    while os.getppid() == parent:
        k += 1
        target = t0 + k * period
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        woke = time.monotonic()
        if ring.mem[0] != gen:                  # resumed after a pause: a fresh schedule
            gen, t0, k = ring.mem[0], woke, 0
            continue
        _spin(work)
        done = time.monotonic()
        ring.write(target, (woke - target) * 1e6, (done - target - work) * 1e6)
        k = max(k, int((done - t0) / period))  # skip the periods missed while computing


if __name__ == "__main__":
    run(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
