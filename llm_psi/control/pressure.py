"""Pressure: reading PSI files, the stall share, kernel PSI triggers, the detector a gate asks, and the probe
the timeline and the HTTP service read.

Every stall share (gate, timeline, adaptive limit, bench) comes from stall_share() over readings that pair each
total= with the time of its own read. Which files: cgroups.system_pressure_path() and pressure_path() (both
follow $CGROUP_ROOT, a fake tree). A detector says whether pressure is over a threshold: by reading avg10 or
the stall share over the last interval (source = the system or the service's own cgroup), or by a kernel PSI
trigger (shared by all workers). Trigger events are DEBUG log lines; run with -v to see them.
"""
from __future__ import annotations

import collections
import errno
import logging
import math
import os
import select
import threading
import time

from llm_psi import cgroups

log = logging.getLogger("psi_admission")

PSI_FIX = "boot with psi=1 on the kernel command line (needs CONFIG_PSI=y)"
TRIGGER_WINDOW_S = 2.0   # unprivileged triggers need a window that is a multiple of 2 s
MIN_DELTA_S = 0.1        # shortest stall-share delta (first check with no earlier sample)


class PsiUnavailable(RuntimeError):
    """No usable pressure file; the message names the file and the fix."""


class TriggerUnavailable(RuntimeError):
    """A kernel PSI trigger cannot be set up here; the message says why."""


def parse_pressure(text: str) -> dict:
    """PSI file text -> {"some": {avg10, avg60, avg300, total}, "full": {...} or None}. ValueError on garbage."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, *fields = line.split()
        try:
            if kind not in ("some", "full") or kind in out:
                raise ValueError
            kv = dict(f.split("=", 1) for f in fields)
            rec = {k: float(kv[k]) for k in ("avg10", "avg60", "avg300")}
            rec["total"] = int(kv["total"])
        except (KeyError, ValueError):
            raise ValueError(f"unparseable PSI line {line.strip()!r}") from None
        out[kind] = rec
    if "some" not in out:
        raise ValueError("no 'some' line in PSI text")
    out.setdefault("full", None)
    return out


class PressureFile:
    """One PSI file (/proc/pressure/<res> or a cgroup's <res>.pressure), re-read on every call."""

    def __init__(self, path: str, clock=time.monotonic):
        self.path, self.clock = path, clock

    def sample(self) -> tuple[float, dict]:
        """One reading: (clock() taken as the kernel's read returned, the parsed file). A read can wait
        (e.g. on the kernel's PSI lock) before the kernel takes its snapshot, so the time comes after it."""
        try:
            with open(self.path) as f:
                text = f.read()
                t = self.clock()
        except FileNotFoundError:
            raise PsiUnavailable(f"{self.path} does not exist: no PSI on this kernel; {PSI_FIX}") from None
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                raise PsiUnavailable(f"{self.path}: PSI is disabled at boot; {PSI_FIX}") from None
            raise PsiUnavailable(f"cannot read {self.path}: {e.strerror}") from None
        return t, parse_pressure(text)

    def read(self) -> dict:
        return self.sample()[1]

    def avg10(self) -> float:
        return self.read()["some"]["avg10"]

    def timed_total(self) -> tuple[float, int]:
        """(time, some total= in us) of one reading: what stall_share() takes."""
        t, pressure = self.sample()
        return t, pressure["some"]["total"]


def stall_share(before: tuple[float, int], after: tuple[float, int]) -> float:
    """Stall share (%) between two readings (t_s, some total= in us), each from ONE read: t is the clock
    taken as that read returned (PressureFile.timed_total), never a clock read elsewhere. NaN if t does
    not advance.

    Reported as measured, never clipped to 100. The kernel computes total= at the read from every CPU's
    stall time: concluded state changes plus the state still running, each timed by that CPU's clock,
    in whole us. So the stall between two reads spans the kernel's snapshots, not our stamps, and a share
    can exceed 100% by up to (1/HZ + |g_before - g_after| + 2 us) / (t_after - t_before): 1/HZ (1-10 ms)
    where per-CPU clocks drift apart (no stable TSC), g the delay from the kernel's snapshot to our stamp
    (us, unless the reader is preempted or throttled right there). With a 4 ms tick that is up to 4%
    over 100 ms and 0.8% over 500 ms; with a stable clock, under 0.1% over 100 ms."""
    dt = after[0] - before[0]
    return 100.0 * (after[1] - before[1]) / (dt * 1e6) if dt > 0 else math.nan


class StallShare:
    """Stall share (%) over about the last `window_s`, from some total= deltas of timed readings
    (read() -> (t, total_us), e.g. PressureFile.timed_total); one per source, shared by all workers (a
    sample taken by one is the baseline of the next). With no sample at least MIN_DELTA_S old (first
    check, or the last one went stale) it waits for a short fresh delta."""

    def __init__(self, read, window_s: float, sleep=time.sleep):
        self.read, self.sleep = read, sleep
        self.window_s = max(window_s, MIN_DELTA_S)
        self._hist = collections.deque()   # (t, total_us), oldest first
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            latest = self.read()
            h, now = self._hist, latest[0]
            if h and now - h[0][0] > 4 * self.window_s and now - h[-1][0] > self.window_s:
                h.clear()                                  # stale: the share would span an idle gap
            if not h or now - h[0][0] < MIN_DELTA_S:
                if not h:
                    h.append(latest)
                self.sleep(MIN_DELTA_S - (now - h[0][0]))
                latest = self.read()
            h.append(latest)
            while len(h) > 2 and latest[0] - h[1][0] >= self.window_s:
                h.popleft()                                # keep one sample at least window_s old
            return stall_share(h[0], latest)


class TriggerMonitor:
    """A kernel PSI trigger "some <stall_us> <window_us>" on one pressure file, watched by a daemon
    thread. Events come at most once per window while the stall stays over the threshold (every 2-4 s
    here), so pressure counts as high until 2 windows after the last event."""

    def __init__(self, path: str, threshold_pct: float, window_s: float = TRIGGER_WINDOW_S,
                 poll_s: float = 0.5, clock=time.monotonic):
        self.path, self.window_s, self.clock = path, window_s, clock
        self.poll_ms = int(min(max(poll_s, 0.05), 1.0) * 1000)
        window_us = int(window_s * 1e6)
        self.stall_us = int(round(window_us * threshold_pct / 100.0))
        if not 0 < self.stall_us <= window_us:
            raise TriggerUnavailable(f"threshold {threshold_pct}% gives no valid stall time (0 < stall <= window)")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            raise TriggerUnavailable(f"cannot open {path} read-write: {e.strerror}") from None
        try:
            os.write(self.fd, f"some {self.stall_us} {window_us}".encode() + b"\0")
        except OSError as e:
            os.close(self.fd)
            why = {errno.EINVAL: "kernel refused the trigger (unprivileged windows must be a multiple of 2 s)",
                   errno.EBUSY: "a trigger already exists on this file descriptor",
                   errno.EOPNOTSUPP: f"PSI is disabled at boot; {PSI_FIX}",
                   errno.EPERM: "not permitted", errno.EACCES: "not permitted"}.get(e.errno, e.strerror)
            raise TriggerUnavailable(f"{path}: {why}") from None
        self.last_event, self.error = None, None
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="psi-trigger", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLPRI)
        while not self._stop.is_set():
            for _, ev in poller.poll(self.poll_ms):
                if ev & (select.POLLERR | select.POLLNVAL | select.POLLHUP):
                    self.error = f"POLLERR on {self.path}: the pressure file went away"
                    return
                if ev & select.POLLPRI:
                    self.last_event = self.clock()
                    self.fired.set()
                    log.debug("trigger event on %s (stall >= %d us in %.0f s)", self.path, self.stall_us,
                              self.window_s)

    def high(self) -> bool:
        return self.last_event is not None and self.clock() - self.last_event <= 2 * self.window_s + 0.5

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.fd)


class Detector:
    """Over the threshold? Poll: the read signal (avg10 or stall share) is above it. Trigger: the kernel
    trigger fired recently; the check reads no file (reads racing the kernel's 2 s update starve
    unprivileged triggers: reads every 10 ms here stopped all events), so the value is NaN. A trigger
    that dies (POLLERR) falls back to polling, saying so once."""

    def __init__(self, read, threshold: float, name: str, monitor: TriggerMonitor | None = None):
        self.read, self.threshold, self.name, self.monitor = read, threshold, name, monitor
        self._warned = False

    def check(self) -> tuple[bool, float]:
        m = self.monitor
        if m is not None and not m.error:
            return m.high(), math.nan
        if m is not None and not self._warned:
            self._warned = True
            log.warning("%s; falling back to polling %s", m.error, self.name)
        value = float(self.read())
        return value > self.threshold, value

    @property
    def label(self) -> str:
        m = self.monitor
        return f"{m.path} trigger some {m.stall_us} {int(m.window_s * 1e6)}" if m and not m.error else self.name

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def make_detector(source: str, sig: str, mode: str, threshold: float, interval_s: float, path=None):
    """The detector for one gate configuration; PsiUnavailable (with the fix) if the file is unusable."""
    path = path or (cgroups.system_pressure_path("cpu") if source == "system" else cgroups.pressure_path("cpu"))
    if path is None:
        raise PsiUnavailable("no cgroup v2 cpu.pressure for this process (0:: line of /proc/self/cgroup); "
                             "mount cgroup2 (unified) or use --psi-source system")
    pf = PressureFile(path)
    pf.read()
    read = pf.avg10 if sig == "avg10" else StallShare(pf.timed_total, interval_s)
    name = f"{path} some {sig}"
    if mode == "trigger":
        try:
            return Detector(read, threshold, name, TriggerMonitor(path, threshold, poll_s=interval_s))
        except TriggerUnavailable as e:
            log.warning("PSI trigger unavailable (%s); falling back to polling %s", e, name)
    return Detector(read, threshold, name)


def cell_probe() -> cgroups.CgroupProbe:
    """The probe of this process's cgroup; its counters only where the cgroup was made for this run."""
    probe = cgroups.CgroupProbe()
    if not probe.own:
        log.info("no throttling counters in the timeline: %s", probe.error or probe.note)
    return probe


class PressureProbe:
    """The pressure and throttling a service sees, as one flat reading: the system's and its own cgroup's
    cpu.pressure (avg10, total=, and the stall share since this probe's previous read of that source), and
    its cgroup's cpu.stat counters where the cgroup was made for it (else None). Each key is always present,
    None where it cannot be read. Shared by the timeline and the HTTP service's /health and /metrics."""

    COUNTERS = ("nr_periods", "nr_throttled", "throttled_usec", "usage_usec")

    def __init__(self):
        cg = cgroups.pressure_path("cpu")
        self.files = {"sys": PressureFile(cgroups.system_pressure_path("cpu")),
                      **({"cg": PressureFile(cg)} if cg else {})}
        self.cgroup = cell_probe()
        self._prev, self._lock = {}, threading.Lock()

    def read(self) -> dict:
        out = {}
        for key, pf in self.files.items():
            out.update({f"{key}_cpu_some_avg10": None, f"{key}_cpu_some_total_us": None, f"{key}_cpu_some_pct": None})
            try:
                t, pressure = pf.sample()
            except (PsiUnavailable, ValueError):
                continue
            some = pressure["some"]
            with self._lock:
                prev, self._prev[key] = self._prev.get(key), (t, some["total"])
            out.update({f"{key}_cpu_some_avg10": some["avg10"], f"{key}_cpu_some_total_us": some["total"]})
            if prev:
                out[f"{key}_cpu_some_pct"] = round(stall_share(prev, (t, some["total"])), 2)
        counters = self.cgroup.counters() or {}
        out.update({k: counters.get(k) for k in self.COUNTERS})
        return out

