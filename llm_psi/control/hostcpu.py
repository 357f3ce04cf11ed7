"""The CPU the host's other work takes from the service: of the CPUs this process may run on (its affinity,
which a cpuset sets), the share that other processes kept busy over the last interval.

    others = (busy time of those CPUs, /proc/stat  -  this process's own CPU time) / (interval x CPUs)

clipped to 0-1. Unlike PSI, it sees an owner who keeps the CPUs busy while the service is idle (nothing
stalls then, so no pressure shows). A daemon thread samples it every interval; ``share`` is the last value
(None before the first interval). busy = user + nice + system + irq + softirq + steal (no idle, no iowait).
"""
from __future__ import annotations

import os
import threading
import time

BUSY_FIELDS = (0, 1, 2, 5, 6, 7)    # user nice system (idle iowait) irq softirq steal
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def busy_s(cpus, text: str) -> float:
    """Seconds the CPUs (ids) were busy since boot, from /proc/stat text."""
    total = 0
    for line in text.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            total += sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields))
    return total * TICK_S


class OthersCpu:
    def __init__(self, interval_s: float = 1.0, stat: str = "/proc/stat", cpus=None, clock=time.monotonic,
                 own=time.process_time):
        self.interval_s, self.stat, self.clock, self.own = interval_s, stat, clock, own
        self.cpus = set(cpus if cpus is not None else os.sched_getaffinity(0))
        self.share = None
        self._prev = self._read()
        self._stop = threading.Event()

    def _read(self):
        with open(self.stat) as f:
            return self.clock(), busy_s(self.cpus, f.read()), self.own()

    def sample(self) -> float | None:
        """The share since the previous sample (None where no time passed); kept in ``share``."""
        now, prev = self._read(), self._prev
        self._prev = now
        dt = now[0] - prev[0]
        if dt <= 0:
            return self.share
        others = (now[1] - prev[1]) - (now[2] - prev[2])
        self.share = min(1.0, max(0.0, others / (dt * len(self.cpus))))
        return self.share

    def start(self) -> "OthersCpu":
        threading.Thread(target=self._run, name="host-cpu", daemon=True).start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except (OSError, ValueError):
                self.share = None

    def close(self):
        self._stop.set()
