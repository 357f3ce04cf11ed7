"""Sharing a host: a pressure-driven, work-conserving controller of the service cgroup's own CPU quota.

Control law (one step every interval, default 1 s):

    others = the share of the last interval (%) in which other work on the host stalled for CPU
    others >= high (default 10%):  quota = max(floor, quota / 2)      cut: someone else waits
    others <= low  (default 3%):   quota = min(ceiling, quota * 2)    raise: nobody else waits
    otherwise:                     quota unchanged

It starts at the ceiling (default: every CPU of the host, i.e. work-conserving when the host is free); the
floor defaults to the paper's quota (50% of one CPU), so beside a co-tenant the service keeps what the
quota gives it. The quota is the service cgroup's cpu.max (v2) or cpu.cfs_quota_us (v1).

"Others stall" is never the service's own throttling, which a quota raises by itself (63-75% measured under
the paper's quota). Two signals:
  siblings: the largest `some` stall share (total= deltas) among the v2 sibling cgroups of the service's
            cgroup: work outside the service, where no quota of ours applies (v2, and hybrid hosts' unified);
  system:   the system's `some` stall share minus the service cgroup's throttled share of the interval
            (cpu.stat throttled_usec delta / interval, capped at 100%), floored at 0 (any host, v1 too).
auto takes siblings where the service's cgroup has a v2 directory, else system.

Every change of the quota is one timestamped log line; state() (quota in cores, the signal) goes to the
timeline and /metrics.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time

from llm_psi import cgroups
from llm_psi.control.pressure import PressureFile, stall_share

log = logging.getLogger("sharing")

SIGNALS = ("auto", "siblings", "system")


class SystemMinusThrottle:
    """others% = system some% - own throttled% over the interval since the last call (None on the first)."""

    def __init__(self, info, system_path=None, clock=time.monotonic):
        self.info, self.clock = info, clock
        self.system = PressureFile(system_path or cgroups.system_pressure_path("cpu"), clock)
        self.prev = None

    def _sample(self):
        t, total = self.system.timed_total()
        return t, total, cgroups.read_counters(self.info).get("throttled_usec") or 0

    def __call__(self):
        now, prev = self._sample(), self.prev
        self.prev = now
        if prev is None or now[0] <= prev[0]:
            return None
        some = stall_share(prev[:2], now[:2])
        throttled = min(100.0, 100.0 * (now[2] - prev[2]) / ((now[0] - prev[0]) * 1e6))
        return max(0.0, some - throttled)


class SiblingPressure:
    """others% = the largest some% among the v2 sibling cgroups of own_dir (cpu.pressure total= deltas over
    the interval since the last call; a sibling seen for the first time counts from then)."""

    def __init__(self, own_dir, clock=time.monotonic):
        self.own, self.parent, self.clock = os.path.normpath(own_dir), os.path.dirname(os.path.normpath(own_dir)), clock
        self.prev = None      # the sibling readings of the last call (None before the first)

    def _siblings(self):
        try:
            names = sorted(os.listdir(self.parent))
        except OSError:
            return []
        paths = [os.path.join(self.parent, n) for n in names]
        return [p for p in paths if p != self.own and os.path.isfile(os.path.join(p, "cpu.pressure"))]

    def __call__(self):
        now, shares = {}, []
        for d in self._siblings():
            try:
                now[d] = PressureFile(os.path.join(d, "cpu.pressure"), self.clock).timed_total()
            except Exception:       # a sibling removed meanwhile
                continue
            if self.prev and d in self.prev and now[d][0] > self.prev[d][0]:
                shares.append(stall_share(self.prev[d], now[d]))
        first = self.prev is None
        self.prev = now
        return None if first else max(shares, default=0.0)


def make_signal(kind, info, clock=time.monotonic):
    """The 'others stall' reader `kind` (SIGNALS) for the service cgroup info."""
    if kind not in SIGNALS:
        raise ValueError(f"unknown sharing signal {kind!r} (choose from {', '.join(SIGNALS)})")
    unified = info.get("unified")
    if kind == "siblings" or (kind == "auto" and unified):
        if not unified:
            raise ValueError("the siblings signal needs a v2 cgroup (v2, or a hybrid host's unified hierarchy)")
        return SiblingPressure(unified, clock), "siblings"
    return SystemMinusThrottle(info, clock=clock), "system"


def decide(quota_us, others, floor_us, ceiling_us, high_pct, low_pct):
    """The next quota (us per period) under the control law; unchanged when others is None or NaN."""
    if others is None or math.isnan(others):
        return quota_us
    if others >= high_pct:
        return max(floor_us, quota_us // 2)
    if others <= low_pct:
        return min(ceiling_us, quota_us * 2)
    return quota_us


def write_quota(info, quota_us, period_us):
    """The service cgroup's own CPU quota: cpu.max (v2) or cpu.cfs_quota_us (v1)."""
    if info["mode"] == "v2":
        cgroups.fs._write(os.path.join(info["cpu"], "cpu.max"), f"{quota_us} {period_us}")
    else:
        cgroups.fs._write(os.path.join(info["cpu"], "cpu.cfs_quota_us"), quota_us)


class ShareController:
    """The control law above, applied to the cgroup info every interval_s by a daemon thread (start/close),
    or one step() at a time (tests, with an injected signal and clock)."""

    def __init__(self, info, signal, signal_name="injected", *, floor_pct=50.0, ceiling_pct=None, high_pct=10.0,
                 low_pct=3.0, interval_s=1.0, clock=time.monotonic, cpus=None):
        if not 0 <= low_pct < high_pct:
            raise ValueError(f"need 0 <= low < high, got low {low_pct} and high {high_pct}")
        self.info, self.signal, self.signal_name, self.clock = info, signal, signal_name, clock
        self.period_us = cgroups.read_limits(info)["cpu_period_us"] or 100000
        ceiling_pct = 100.0 * (cpus or os.cpu_count() or 1) if ceiling_pct is None else ceiling_pct
        self.floor_us = max(1000, round(self.period_us * floor_pct / 100))
        self.ceiling_us = max(self.floor_us, round(self.period_us * ceiling_pct / 100))
        self.high, self.low, self.interval_s = high_pct, low_pct, interval_s
        self.quota_us, self.others, self.changes = self.ceiling_us, None, 0
        self.t0 = clock()
        write_quota(info, self.quota_us, self.period_us)
        self._stop = threading.Event()
        self._thread = None

    def step(self):
        """Read the signal, decide, write and log the quota if it changes; returns the quota (us)."""
        self.others = self.signal()
        new = decide(self.quota_us, self.others, self.floor_us, self.ceiling_us, self.high, self.low)
        if new != self.quota_us:
            write_quota(self.info, new, self.period_us)
            log.info("t=%.3f s share: quota %.2f -> %.2f CPUs (others stall %.1f%%, %s; cut at >= %g%%, raise "
                     "at <= %g%%)", self.clock() - self.t0, self.quota_us / self.period_us, new / self.period_us,
                     self.others, self.signal_name, self.high, self.low)
            self.quota_us, self.changes = new, self.changes + 1
        return self.quota_us

    def state(self):
        """For the timeline and /metrics: share_quota_cores, share_others_pct (NaN before the first reading)."""
        return {"share_quota_cores": round(self.quota_us / self.period_us, 4),
                "share_others_pct": math.nan if self.others is None else round(self.others, 2)}

    def start(self):
        self.signal()                      # the first reading: the origin of the first interval
        self._thread = threading.Thread(target=self._run, name="share-controller", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception as e:         # a failed read or write: logged, the quota stays
                log.warning("share: step failed: %s", e)

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def build(cfg, info=None):
    """The controller cfg asks for (cfg.sharing == 'share'), started, or None. It needs a cgroup made for this
    process (cgroup_lib.py run): ValueError otherwise."""
    if cfg.sharing == "off":
        return None
    if cfg.sharing != "share":
        raise ValueError(f"unknown sharing {cfg.sharing!r}")
    info = info or cgroups.own_cgroup()
    if not cgroups.own_cell_cgroup(info):
        raise ValueError("--sharing share writes the service cgroup's own quota, so it needs a cgroup made for it: "
                         "run it under sudo python cgroup_lib.py run --unlimited -- ...")
    signal, name = make_signal(cfg.share_signal, info)
    return ShareController(info, signal, name, floor_pct=cfg.share_floor_pct, ceiling_pct=cfg.share_ceiling_pct,
                           high_pct=cfg.share_high_pct, low_pct=cfg.share_low_pct,
                           interval_s=cfg.share_interval_ms / 1000.0).start()
