"""The cell's timeline: one row every interval (default 250 ms) of the system's and the service cgroup's CPU
pressure, the throttling counters, and the service's own state (in flight, waiting, limit, batch)."""
import csv
import logging
import os
import threading
import time

from llm_psi.control.pressure import PressureProbe

log = logging.getLogger("timeline")

TIMELINE_COLUMNS = ["t_s", "trial", "sys_cpu_some_avg10", "sys_cpu_some_total_us", "sys_cpu_some_pct",
                    "cg_cpu_some_avg10", "cg_cpu_some_total_us", "cg_cpu_some_pct",
                    "nr_periods", "nr_throttled", "throttled_usec", "in_flight", "waiting", "limit", "batch",
                    "cotenant_units", "cotenant_cpu_s",
                    # sharing a host: the co-tenant's schedule and probe, our sharing controller's state
                    "cotenant_on", "probe_wake_p99_ms", "probe_delay_p99_ms", "share_quota_cores", "share_others_pct"]


class TimelineSampler:
    """Daemon thread appending one row every interval to <stem>_timeline.csv (header once, flushed)."""

    def __init__(self, path, interval_ms, trial, state_fn, t0):
        self.path, self.interval_s, self.trial, self.state_fn, self.t0 = path, interval_ms / 1000.0, trial, state_fn, t0
        self.probe = PressureProbe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="psi-timeline", daemon=True)

    def start(self) -> None:
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=TIMELINE_COLUMNS, extrasaction="ignore")
        if new:
            self._w.writeheader()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._f.close()

    def row(self) -> dict:
        row = {"t_s": round(time.monotonic() - self.t0, 4), "trial": self.trial, **self.probe.read()}
        try:
            row.update(self.state_fn() or {})
        except Exception as e:
            log.debug("timeline row incomplete: %s", e)
        return row

    def _run(self) -> None:
        deadline, stopped = time.monotonic(), False
        while not stopped:                     # a row at start, every interval, and one at stop
            self._w.writerow(self.row())
            self._f.flush()
            deadline += self.interval_s
            stopped = self._stop.wait(max(0.0, deadline - time.monotonic()))
        self._w.writerow(self.row())
        self._f.flush()
