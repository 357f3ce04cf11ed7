"""Adaptive concurrency control from fresh pressure and observed service latency.

A concurrency limit inside the process, in the spirit of Envoy's adaptive concurrency filter and Netflix's
concurrency-limits: requests over the limit wait in FIFO order (never dropped); a control loop re-decides
the limit every interval from two fresh signals:

  * pressure: the stall share (%) of the service's own cgroup over the last 2 s, from `total=` deltas
    (the system's /proc/pressure/cpu where the process has no cgroup of its own);
  * latency: the median service time of requests that started since the last change, over the minimum
    service time seen so far (the no-load latency).

AIMD with hysteresis and a floor of 1: halve the limit when pressure is high or latency has grown past
the tolerance; add one when pressure is low, latency is near its minimum and requests are waiting; else
hold. After each change it judges again once a request started under the new limit has finished, or
once the pressure window has turned over (``settle_s``).
Each decision is one timestamped log line (changes at INFO, holds at DEBUG); the limit is in the timeline.
"""
from __future__ import annotations

import logging
import math
import statistics
import threading
import time

from llm_psi import cgroups
from llm_psi.control.gate import Decision, Limit
from llm_psi.control.pressure import TRIGGER_WINDOW_S, PressureFile, PsiUnavailable, StallShare

log = logging.getLogger("adaptive")


class AdaptiveLimit(Limit):
    """A FIFO concurrency limit (control.gate.Limit) whose limit a background control loop adjusts."""

    def __init__(self, pressure, *, initial: int = 1, max_limit: int = 8, low_pct: float = 20.0,
                 high_pct: float = 90.0, tolerance: float = 1.5, interval_s: float = 0.5,
                 settle_s: float = 2 * TRIGGER_WINDOW_S, clock=time.monotonic, start: bool = True):
        if not 1 <= initial <= max_limit:
            raise ValueError(f"need 1 <= initial ({initial}) <= max limit ({max_limit})")
        if not 0 <= low_pct < high_pct:
            raise ValueError(f"need 0 <= low ({low_pct}) < high ({high_pct}) pressure")
        if tolerance <= 1:
            raise ValueError(f"latency tolerance must be > 1, got {tolerance}")
        super().__init__(initial)
        self.pressure, self.clock, self.interval_s, self.settle_s = pressure, clock, interval_s, settle_s
        self.max_limit, self.low, self.high, self.tolerance = max_limit, low_pct, high_pct, tolerance
        self.min_service = math.inf
        self.last_pressure = math.nan
        self._since_change: list[float] = []   # service times of requests started since the last change
        self._changed_at = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adaptive-limit", daemon=True)
        if start:
            self._thread.start()

    def admit(self, timeout: float | None = None) -> Decision:
        dec = super().admit(timeout)
        return dec if dec.decision == "expired" else Decision("admitted", 1, self.last_pressure)

    def release(self, service_s: float | None = None) -> None:
        super().release(service_s)
        if service_s is None:
            return
        with self._cv:
            self.min_service = min(self.min_service, service_s)
            if self.clock() - service_s >= self._changed_at:
                self._since_change.append(service_s)

    def decide(self, pressure: float) -> tuple[int, str]:
        """The next limit and the reason, from the pressure just read and the latencies so far (pure in
        its inputs; the loop applies the result)."""
        with self._cv:
            limit, waiting = self.limit, len(self._queue)
            samples = list(self._since_change)
        ratio = statistics.median(samples) / self.min_service if samples else math.nan
        if limit > 1 and (pressure >= self.high or ratio > self.tolerance):
            return max(1, limit // 2), f"decrease: pressure {pressure:.1f}% latency x{ratio:.2f}"
        if limit < self.max_limit and waiting and pressure < self.low and not ratio > self.tolerance:
            return limit + 1, f"increase: pressure {pressure:.1f}% latency x{ratio:.2f} waiting {waiting}"
        return limit, f"hold: pressure {pressure:.1f}% latency x{ratio:.2f} waiting {waiting}"

    def step(self) -> int:
        """Read pressure once and apply the decision; returns the limit in force."""
        p = self.pressure()
        self.last_pressure = p
        new, why = self.decide(p)
        with self._cv:
            if new != self.limit:
                log.info("limit %d -> %d (%s)", self.limit, new, why)
                self.limit, self._since_change, self._changed_at = new, [], self.clock()
                self._cv.notify_all()
            else:
                log.debug("limit %d (%s)", self.limit, why)
            return self.limit

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._cv:  # judge once a request started under the current limit has finished, or
                # the pressure window has turned over since the change
                settled = bool(self._since_change) or self.clock() - self._changed_at >= self.settle_s
            if settled:
                try:
                    self.step()
                except PsiUnavailable as e:
                    log.error("adaptive limit frozen at %d: %s", self.limit, e)
                    return

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def build(cfg, max_limit: int) -> AdaptiveLimit:
    """The adaptive controller for a service config, its limit within 1..max_limit: the service cgroup's
    stall share where it has one."""
    path = cgroups.pressure_path("cpu")
    if path is None:
        path = cgroups.system_pressure_path("cpu")
        log.warning("no cgroup cpu.pressure for this process: adapting to the system's %s", path)
    source = StallShare(PressureFile(path).timed_total, TRIGGER_WINDOW_S)
    return AdaptiveLimit(source, initial=1, max_limit=max_limit,
                         low_pct=cfg.adaptive_low_pct, high_pct=cfg.adaptive_high_pct,
                         tolerance=cfg.adaptive_tolerance, interval_s=cfg.psi_interval_ms / 1000.0)
