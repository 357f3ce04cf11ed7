"""Overload by queueing delay (``--max-queue-delay-ms T``): refuse a request whose wait would exceed T.

The control law, as ``--help`` states it:

    queued   requests that passed this check and have not yet had their first token
    gap      the measured service rate, as the time between two departures while the service is busy
             (idle time excluded): an EWMA, weight ALPHA to the newest departure. The first departure is
             not a sample: it carries the model's warm-up (a cold first request would hold the estimate
             high, and refuse requests at low load, for many departures)
    wait     = queued x gap: what a request arriving now would wait before its first token

    predicted: a request arriving while wait > T is refused at once (503, overloaded), with
               Retry-After = wait - T, the time the queue ahead needs to shrink to T at the measured rate;
    observed:  a request still waiting for admission T after its arrival is refused then (the FIFO limits
               give up at T; any other wait is checked once admission returns).

Until the second departure no rate is known and nothing is predicted (the observed check still holds). The
estimate needs no knowledge of the concurrency: one-at-a-time service, a batch or processor sharing all show
up as the time between departures. The controller logs one line when it starts refusing, and one when it
admits again with no refusal in the last HOLD_S seconds (or T, if longer), never one per request.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("overload")
ALPHA = 0.2
HOLD_S = 1.0


class DelayShedder:
    """The state of the queueing-delay check: what is queued, the measured time between departures."""

    def __init__(self, max_delay_s: float, clock=time.monotonic, alpha: float = ALPHA):
        if not max_delay_s > 0:
            raise ValueError(f"max queue delay must be > 0 s, got {max_delay_s}")
        self.max_delay_s, self.clock, self.alpha = max_delay_s, clock, alpha
        self._lock = threading.Lock()
        self.queued = 0          # passed the check, no first token yet
        self.in_system = 0       # passed the check, not yet gone
        self.gap_s: float | None = None
        self._last_departure = -float("inf")
        self._busy_since = 0.0
        self.shedding = False
        self.refused = 0
        self.departures = 0
        self._last_refusal = -float("inf")
        self._refused_at_start = 0

    def _wait(self) -> float:
        return 0.0 if self.gap_s is None else self.queued * self.gap_s

    def predicted_wait(self) -> float:
        """Seconds a request arriving now would wait for its first token, by the control law."""
        with self._lock:
            return self._wait()

    def arrive(self) -> float | None:
        """None: the request may go on (it now counts as queued); else the Retry-After (s) of its refusal."""
        with self._lock:
            wait = self._wait()
            if wait > self.max_delay_s:
                self._refuse(f"predicted wait {wait * 1000:.0f} ms")
                return wait - self.max_delay_s
            now = self.clock()
            if self.in_system == 0:
                self._busy_since = now
            self.queued += 1
            self.in_system += 1
            if self.shedding and now - self._last_refusal >= max(HOLD_S, self.max_delay_s):
                self.shedding = False
                log.info("admitting: predicted wait %.0f ms, limit %.0f ms (%d refused while shedding)",
                         wait * 1000, self.max_delay_s * 1000, self.refused - self._refused_at_start)
        return None

    def expired(self, waited_s: float) -> float:
        """A request has waited ``waited_s`` > T: it is refused (the caller then calls ``leave``); the
        Retry-After (s) is the predicted wait's excess over T, at least what this one overran."""
        with self._lock:
            self._refuse(f"a request waited {waited_s * 1000:.0f} ms")
            return max(self._wait(), waited_s) - self.max_delay_s

    def started(self) -> None:
        """The request's first token: it no longer queues."""
        with self._lock:
            self.queued -= 1

    def leave(self, started: bool) -> None:
        """The request is gone (done, failed, refused after the check or abandoned). A departure that had
        started is a sample of the time between departures."""
        with self._lock:
            now = self.clock()
            if not started:
                self.queued -= 1
            self.in_system -= 1
            if started:
                gap = now - max(self._last_departure, self._busy_since)
                self.departures += 1
                if self.departures > 1:
                    self.gap_s = gap if self.gap_s is None else (1 - self.alpha) * self.gap_s + self.alpha * gap
                self._last_departure = now

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._last_refusal = self.clock()
        if not self.shedding:
            self.shedding, self._refused_at_start = True, self.refused - 1
            log.info("shedding: %s, limit %.0f ms (%d queued, %s between departures)", why,
                     self.max_delay_s * 1000, self.queued,
                     "unknown" if self.gap_s is None else f"{self.gap_s * 1000:.0f} ms")

    def state(self) -> dict:
        with self._lock:
            return {"queue_delay_predicted_s": self._wait(), "queue_delay_shedding": int(self.shedding),
                    "queue_delay_queued": self.queued}
