"""Admission controllers: what each worker calls before its request (admit) and after it (release).

The gate (the paper): before each request, ask the detector (control.pressure) whether pressure is over the
threshold; if not, admit at once, else sleep the interval and check again; after the last of max_checks checks
over the threshold admit anyway (on_timeout=admit, the paper) or reject (on_timeout=reject). Each decision is
one DEBUG log line; run with -v to see them. Limit is a plain FIFO concurrency limit.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time

log = logging.getLogger("psi_admission")


@dataclasses.dataclass
class Decision:
    decision: str     # admitted | admitted_after_timeout | rejected | expired (gave up at the caller's timeout)
    checks: int
    pressure: float   # the signal's value at the decision (NaN: no reading: limit, trigger)


class Admission:
    """What each worker calls: admit() before its request, release() after it."""

    def admit(self, timeout: float | None = None) -> Decision:
        """The decision for one request. ``timeout`` (s): a controller that queues gives up after that long
        with the decision ``expired`` (the service refuses the request); others may ignore it."""
        raise NotImplementedError

    def release(self, service_s: float | None = None) -> None:
        pass

    def state(self) -> dict:
        return {}

    def saturated(self) -> bool:
        """Would a request arriving now wait? (The service's --max-waiting refuses only those.)"""
        return False

    def close(self) -> None:
        pass


class Gate(Admission):
    """The paper's gate over any detector: check, defer while over, give up after max_checks checks."""

    def __init__(self, detector, interval_s: float, max_checks: int, on_timeout: str = "admit",
                 sleep=time.sleep, clock=time.monotonic):
        if on_timeout not in ("admit", "reject"):
            raise ValueError(f"on_timeout must be admit or reject, got {on_timeout!r}")
        if max_checks < 1:
            raise ValueError(f"max_checks must be >= 1, got {max_checks}")
        self.detector, self.interval_s, self.max_checks = detector, interval_s, max_checks
        self.on_timeout, self.sleep, self.clock = on_timeout, sleep, clock
        self._waiting = 0
        self._lock = threading.Lock()

    def admit(self, timeout: float | None = None) -> Decision:
        t0 = self.clock()  # the deferral is bounded by max_checks: the timeout is the caller's to check
        with self._lock:
            self._waiting += 1
        try:
            for check in range(1, self.max_checks + 1):
                over, value = self.detector.check()
                if not over:
                    dec = Decision("admitted", check, value)
                    break
                if check < self.max_checks:
                    self.sleep(self.interval_s)
            else:
                dec = Decision("admitted_after_timeout" if self.on_timeout == "admit" else "rejected",
                               self.max_checks, value)
        finally:
            with self._lock:
                self._waiting -= 1
        log.debug("%s checks=%d pressure=%.2f deferred=%.0fms [%s]", dec.decision, dec.checks, dec.pressure,
                  (self.clock() - t0) * 1000, self.detector.label)
        return dec

    def state(self) -> dict:
        return {"waiting": self._waiting}

    def saturated(self) -> bool:
        return self._waiting > 0  # a request is being deferred: the pressure is over the threshold

    def close(self) -> None:
        self.detector.close()


class Limit(Admission):
    """A plain concurrency limit: FIFO, admit() waits until one of `limit` slots is free."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"concurrency limit must be >= 1, got {limit}")
        self.limit, self._in_use, self._queue = limit, 0, collections.deque()
        self._cv = threading.Condition()

    def admit(self, timeout: float | None = None) -> Decision:
        me = object()
        with self._cv:
            self._queue.append(me)
            if not self._cv.wait_for(lambda: self._queue[0] is me and self._in_use < self.limit, timeout):
                self._queue.remove(me)
                self._cv.notify_all()  # the next in line may now be first
                return Decision("expired", 1, math.nan)
            self._queue.popleft()
            self._in_use += 1
            self._cv.notify_all()
        log.debug("admitted (limit %d, %d in use)", self.limit, self._in_use)
        return Decision("admitted", 1, math.nan)

    def release(self, service_s: float | None = None) -> None:
        with self._cv:
            self._in_use -= 1
            self._cv.notify_all()

    def state(self) -> dict:
        return {"limit": self.limit, "waiting": len(self._queue)}

    def saturated(self) -> bool:
        with self._cv:
            return self._in_use >= self.limit or bool(self._queue)

