"""The protection study's metrics (issue 32): what a resident LLM costs the host's owner, and what it gets.
One pure function per metric, over raw samples (the owner's per-request times, the batch owner's per-second
work) and cgroup CPU counters (seconds of CPU time used over a phase). Each trial has an owner-alone phase
and an owner-with-the-LLM phase; every "alone" below is that trial's own.

    isolation_per_second  the owner's achieved / target rate in each whole second of a phase (%): interactive,
                          requests completed in [i, i+1) (shifted by its median latency alone) / the target rate; batch, work units done in second i /
                          the mean units per second alone (resctl-bench's isol% per second)
    isolation             their mean and 1st percentile (isol_mean_pct, isol_p01_pct)
    lat_imp_pct           the p-th percentile of request latency with the LLM over the same percentile alone,
                          minus 1, in % (lat_imp_p50_pct, lat_imp_p99_pct); latency counts from the request's
                          scheduled time (open loop), so time queued behind a late request counts
    cpu_share             the owner's cgroup CPU time per second with the LLM over its CPU time per second alone
    work_conservation     the LLM's CPU time / the CPU time the owner leaves idle: cpus x the phase's length minus
                          the owner's CPU time alone, scaled to the phase (what the owner would use undisturbed)
    tokens_per_s          tokens the LLM generated in the phase / the phase's length
"""
from __future__ import annotations

import math

import numpy as np


def _finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


def isolation_per_second(done_s, seconds: float, target_per_s: float, offset_s: float = 0.0) -> np.ndarray:
    """100 x (events with done time in [offset_s + i, offset_s + i + 1)) / target_per_s for each whole second i of a
    phase of `seconds` (times since the phase began; events outside those seconds, or missing, are not counted).
    offset_s aligns the seconds with where completions fall undisturbed (the report passes the owner's median
    latency alone), so that a delay shorter than half a period does not move a completion into the next second."""
    if not (target_per_s > 0 and seconds >= 1):
        raise ValueError(f"need a target > 0 and a phase of at least 1 s, got {target_per_s!r} and {seconds!r}")
    n = int(math.floor(seconds))
    t = _finite(done_s) - (offset_s if math.isfinite(offset_s) else 0.0)
    counts = np.bincount(np.floor(t[(t >= 0) & (t < n)]).astype(int), minlength=n)
    return 100.0 * counts / target_per_s


def batch_isolation_per_second(units_per_s_with, units_per_s_alone) -> np.ndarray:
    """100 x each second's work units with the LLM / the mean units per second alone (the batch owner's isol%
    per second; NaN where there is no reference)."""
    ref = _finite(units_per_s_alone)
    ref = float(ref.mean()) if ref.size else math.nan
    with_ = _finite(units_per_s_with)
    return 100.0 * with_ / ref if ref > 0 else np.full(with_.shape, math.nan)


def isolation(per_second_pct) -> tuple[float, float]:
    """(mean, 1st percentile) of per-second isol% values (NaN, NaN without any)."""
    v = _finite(per_second_pct)
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(np.percentile(v, 1))


def lat_imp_pct(alone_ms, with_ms, q: float) -> float:
    """100 x (q-th percentile of with_ms / q-th percentile of alone_ms - 1); NaN where either has no finite
    value or the reference is not > 0."""
    a, w = _finite(alone_ms), _finite(with_ms)
    if not a.size or not w.size:
        return math.nan
    ref = float(np.percentile(a, q))
    return 100.0 * (float(np.percentile(w, q)) / ref - 1.0) if ref > 0 else math.nan


def pooled_lat_imp(alone_by_trial, with_by_trial, q: float, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(lat_imp_pct of the q-th percentile over every trial's requests pooled, and its bootstrap interval over
    trials): each resample draws trials with replacement (a trial's alone and with samples together, since the
    reference is measured inside the same trial) and pools their requests; percentile interval at ``level``.
    A tail percentile from a few hundred requests per trial is nearly a per-trial maximum; pooled, it rests on
    all of them, while the resampling of whole trials keeps the trial-to-trial variation in the interval.
    (NaN, NaN, NaN) without trials; the interval is NaN with one."""
    pairs = [(_finite(a), _finite(w)) for a, w in zip(alone_by_trial, with_by_trial)]
    pairs = [(a, w) for a, w in pairs if a.size and w.size]
    if not pairs:
        return math.nan, math.nan, math.nan

    def imp(idx):
        return lat_imp_pct(np.concatenate([pairs[i][0] for i in idx]), np.concatenate([pairs[i][1] for i in idx]), q)
    est = imp(range(len(pairs)))
    if len(pairs) < 2:
        return est, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = np.array([imp(rng.integers(0, len(pairs), len(pairs))) for _ in range(n_boot)])
    lo, hi = np.nanpercentile(boots, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return est, float(lo), float(hi)


def cpu_share(cpu_with_s: float, with_s: float, cpu_alone_s: float, alone_s: float) -> float:
    """The owner's CPU seconds per second with the LLM over its CPU seconds per second alone (NaN if unknown)."""
    try:
        ref = cpu_alone_s / alone_s
        return (cpu_with_s / with_s) / ref if ref > 0 and with_s > 0 else math.nan
    except (TypeError, ZeroDivisionError):
        return math.nan


def idle_left_s(owner_cpu_alone_s: float, alone_s: float, with_s: float, cpus: float) -> float:
    """CPU seconds the owner leaves idle over a phase of with_s: cpus x with_s minus what it used alone per
    second x with_s."""
    return cpus * with_s - owner_cpu_alone_s / alone_s * with_s


def work_conservation(llm_cpu_s: float, owner_cpu_alone_s: float, alone_s: float, with_s: float,
                      cpus: float, least_idle: float = 0.1) -> float:
    """The LLM's CPU seconds over the CPU seconds the owner leaves idle (idle_left_s); NaN if unknown, or where
    the owner leaves less than ``least_idle`` of the host idle (a batch owner that fills the host: the ratio of
    two small numbers then says nothing; the pilot of 2026-12-07 gave 26-34 there)."""
    try:
        idle = idle_left_s(owner_cpu_alone_s, alone_s, with_s, cpus)
        return llm_cpu_s / idle if idle > least_idle * cpus * with_s else math.nan
    except (TypeError, ZeroDivisionError):
        return math.nan


def tokens_per_s(tokens: float, seconds: float) -> float:
    """Tokens generated per second of the phase (NaN if unknown)."""
    try:
        return tokens / seconds if seconds > 0 else math.nan
    except TypeError:
        return math.nan
