"""A co-tenant that comes and goes: its schedule, the phase of a moment, the metrics split by phase, and how
fast a controller reacts to each change. Pure functions (no clock, no files).

A schedule is "off:45,on:60,off:45": the co-tenant's state and how many seconds it keeps it, from the
trial's start; after the last item it keeps the last state. A moment's phase is "before" (off, before the
first on), "with" (on), "after" (off after an on).
"""
from __future__ import annotations

import math

PHASES = ("before", "with", "after")


def parse_schedule(text: str) -> list[tuple[str, float]]:
    """'off:45,on:60,off:45' -> [('off', 45.0), ('on', 60.0), ('off', 45.0)]; ValueError (one line) if bad."""
    items = []
    for part in (text or "").split(","):
        state, _, secs = part.strip().partition(":")
        try:
            value = float(secs)
        except ValueError:
            value = math.nan
        if state not in ("on", "off") or not (math.isfinite(value) and value > 0):
            raise ValueError(f"bad schedule item {part.strip()!r} in {text!r} (expected on:SECONDS or off:SECONDS, "
                             f"e.g. off:45,on:60,off:45)")
        items.append((state, value))
    return items


def boundaries(schedule) -> list[tuple[float, str]]:
    """[(start time, state)] of each schedule item."""
    out, t = [], 0.0
    for state, secs in schedule:
        out.append((t, state))
        t += secs
    return out


def state_at(t: float, schedule) -> str:
    """'on' or 'off' at t seconds after the start (the first state before 0, the last after the end)."""
    current = schedule[0][0]
    for start, state in boundaries(schedule):
        if t >= start:
            current = state
    return current


def phase_of(t: float, schedule) -> str:
    """'before', 'with' or 'after' the co-tenant at t seconds after the trial's start."""
    seen_on = False
    for start, state in boundaries(schedule):
        if start > t:
            break
        seen_on = seen_on or state == "on"
    return "with" if state_at(t, schedule) == "on" else "after" if seen_on else "before"


def changes(schedule) -> dict:
    """{'arrive': time of the first off->on, 'leave': time of the first on->off after it}; None where none."""
    out, prev = {"arrive": None, "leave": None}, schedule[0][0] if schedule else None
    for start, state in boundaries(schedule)[1:]:
        if prev == "off" and state == "on" and out["arrive"] is None:
            out["arrive"] = start
        elif prev == "on" and state == "off" and out["arrive"] is not None and out["leave"] is None:
            out["leave"] = start
        prev = state
    return out


def split_rows(df, schedule, column="t_submit_s"):
    """{phase: the rows of df whose `column` (a request's submission) falls in it}."""
    phase = df[column].map(lambda t: phase_of(t, schedule))
    return {p: df[phase == p] for p in PHASES}


def reaction_time(times, values, t_change, before_level=None, after_level=None, settle_s=None):
    """Seconds from t_change until `values` (a controller's state sampled at `times`) first crossed halfway
    between its level before the change and its level after it; NaN if it never did or did not move.

    Levels: before = the last value at or before t_change; after = the last value before t_change + settle_s
    (default: the last value of the series). Both may be given."""
    pairs = [(t, v) for t, v in zip(times, values) if v is not None and not math.isnan(v)]
    if not pairs:
        return math.nan
    prior = [v for t, v in pairs if t <= t_change]
    before = before_level if before_level is not None else (prior[-1] if prior else pairs[0][1])
    horizon = [v for t, v in pairs if t > t_change and (settle_s is None or t <= t_change + settle_s)]
    after = after_level if after_level is not None else (horizon[-1] if horizon else math.nan)
    if math.isnan(after) or after == before:
        return math.nan
    half = (before + after) / 2
    for t, v in pairs:
        if t > t_change and (v - half) * (after - before) >= 0:
            return t - t_change
    return math.nan


def reaction_times(timeline, schedule, column="share_quota_cores") -> dict:
    """{'react_arrive_s', 'react_leave_s'} of `column` in one trial's timeline (a frame with t_s) under the
    schedule: the settled level of each phase is its last sample."""
    out = {"react_arrive_s": math.nan, "react_leave_s": math.nan}
    if column not in timeline or timeline[column].isna().all():
        return out
    times, values = list(timeline["t_s"]), [float(v) for v in timeline[column]]
    ch, starts = changes(schedule), [s for s, _ in boundaries(schedule)] + [math.inf]
    for key, name in (("arrive", "react_arrive_s"), ("leave", "react_leave_s")):
        t = ch[key]
        if t is not None:
            nxt = min(s for s in starts if s > t)
            out[name] = reaction_time(times, values, t, settle_s=None if math.isinf(nxt) else nxt - t)
    return out
