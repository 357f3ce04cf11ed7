"""The hosts' owners: when each one's own work (its co-tenant) runs.

With phases of phase_s seconds, owner i is busy in phase k when (k + i) is even: on two hosts, A's owner
is busy while B's is idle, then the reverse; on N hosts, every other host's owner at a time. ``busy`` is the
law as a pure function; ``Schedule`` applies it to the co-tenants (resume when busy, pause when idle) from a
thread, and keeps the transitions it made.
"""
from __future__ import annotations

import threading
import time


def busy(host: int, t_s: float, phase_s: float) -> bool:
    """Is host's owner busy t_s seconds after the schedule's start?"""
    if not phase_s > 0:
        raise ValueError(f"phase_s must be > 0, got {phase_s!r}")
    return (int(t_s // phase_s) + host) % 2 == 0


class Schedule:
    """Daemon thread moving the owners (co-tenants with pause/resume) through their phases from t0 (a
    time.monotonic()); transitions: (t_s, host, busy) for every change it made, the start included."""

    def __init__(self, owners: list, phase_s: float, t0: float | None = None, log=print):
        self.owners, self.phase_s, self.log = owners, phase_s, log
        self.t0 = time.monotonic() if t0 is None else t0
        self.transitions: list[tuple[float, int, bool]] = []
        self.state: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="owners", daemon=True)

    def apply(self, t_s: float) -> None:
        for i, owner in enumerate(self.owners):
            want = busy(i, t_s, self.phase_s)
            if self.state.get(i) != want:
                (owner.resume if want else owner.pause)()
                self.state[i] = want
                self.transitions.append((round(t_s, 3), i, want))

    def _run(self):
        while True:
            t = time.monotonic() - self.t0
            self.apply(t)
            nxt = (int(t // self.phase_s) + 1) * self.phase_s
            if self._stop.wait(max(0.0, nxt - (time.monotonic() - self.t0))):
                return

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
