"""When each request is sent: the arrival schedules of open-loop load, and SLOs for goodput.

    closed    the paper's closed loop (the default): C workers, each sends its next request when its last
              one ends; there is no schedule, so ``schedule`` refuses it
    constant  open loop, every gap 1/rate
    poisson   open loop, independent exponential gaps of mean 1/rate (a Poisson process of that rate)
    gamma     open loop, independent gamma gaps with shape = burstiness and scale = 1/(rate * burstiness):
              mean 1/rate, coefficient of variation 1/sqrt(burstiness); burstiness 1 is Poisson, below 1
              burstier, above 1 more regular (as vLLM's benchmark_serving ``--burstiness``)

A schedule is computed before the trial starts, from its seed alone, so the load does not depend on how fast
the server answers (the MLPerf server scenario's rule). Pure functions.
"""
from __future__ import annotations

import math

import numpy as np

from llm_psi.analysis import metrics
from llm_psi.config import ARRIVALS



def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _times(kind: str, rate: float, burstiness: float, count: int, seed: int) -> np.ndarray:
    """The first ``count`` intended send times: 0, then the cumulative sums of count - 1 gaps."""
    if kind == "constant":
        return np.arange(count) / rate
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, size=count - 1)
    else:
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=count - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def schedule(kind: str, rate, *, n=None, duration=None, burstiness=1.0, seed: int = 0) -> np.ndarray:
    """Intended send times in seconds from the trial start, ascending, for an open-loop ``kind`` at ``rate``
    requests per second. The first request is sent at t = 0; request i at the sum of the first i gaps.

    Exactly one of ``n`` (that many requests) or ``duration`` (every request whose time is < duration seconds;
    these are the first times of the n-mode schedule of the same seed) is given. The gaps come from
    ``numpy.random.default_rng(seed)``: the same arguments give the same schedule. ValueError for kind
    'closed' or unknown, rate, burstiness or duration that is not a finite number > 0, n that is not an
    integer >= 1, and for both or neither of n and duration."""
    if kind == "closed":
        raise ValueError("the closed loop has no schedule: each worker sends when its last request ends")
    if kind not in ARRIVALS:
        raise ValueError(f"unknown arrival kind {kind!r}; choose one of {', '.join(ARRIVALS[1:])}")
    rate = _positive("rate", rate)
    burstiness = _positive("burstiness", burstiness)
    if (n is None) == (duration is None):
        raise ValueError("give exactly one of n (number of requests) and duration (seconds)")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        return _times(kind, rate, burstiness, int(n), seed)
    duration = _positive("duration", duration)
    expected = rate * duration  # draw generously, and twice as many again until the schedule passes duration
    count = int(expected + 10 * math.sqrt(expected) + 10)
    while True:
        t = _times(kind, rate, burstiness, count, seed)
        if t[-1] >= duration:
            return t[t < duration]
        count *= 2


SLO_KEYS = tuple(m[:-len("_ms")] for m in metrics.METRICS)


def parse_slo(text: str) -> dict:
    """Parse 'ttft:500,e2e:20000' into {'ttft_ms': 500.0, 'e2e_ms': 20000.0}: comma-separated
    metric:bound pairs, bounds in milliseconds, metric one of ``SLO_KEYS`` (the names of ``metrics.METRICS``
    without _ms). A request meets the SLO when each of these metrics is <= its bound (``metrics.goodput``).
    ValueError naming the bad part for an empty string, a part that is not metric:bound, an unknown or
    repeated metric, and a bound that is not a finite number > 0."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty SLO: give metric:milliseconds pairs, e.g. ttft:500,e2e:20000")
    slo = {}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition(":"))
        if not sep or not key or not value:
            raise ValueError(f"SLO part {part.strip()!r} is not metric:milliseconds")
        if key not in SLO_KEYS:
            raise ValueError(f"SLO part {part.strip()!r}: unknown metric {key!r}; choose from {', '.join(SLO_KEYS)}")
        if f"{key}_ms" in slo:
            raise ValueError(f"SLO part {part.strip()!r}: metric {key!r} given twice")
        try:
            bound = float(value)
        except ValueError:
            bound = float("nan")
        if not math.isfinite(bound) or bound <= 0:
            raise ValueError(f"SLO part {part.strip()!r}: the bound must be a finite number of milliseconds > 0")
        slo[f"{key}_ms"] = bound
    return slo
