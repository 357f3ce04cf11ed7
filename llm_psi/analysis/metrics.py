"""Every latency metric, computed by pure functions over the raw per-request timestamps.

A run records only timestamps (seconds since its trial began, on a monotonic clock). ``derive`` turns them
into the per-request metrics and ``summarize`` into per-cell statistics; the request generator and the
analysis both call these, so there is exactly one definition of each metric:

    queue_ms    t_dequeue - t_submit      waiting in the thread pool's queue for a worker
    defer_ms    t_admit - t_dequeue       held by the admission controller (the PSI gate)
    sched_ms    t_start - t_admit         waiting inside the engine (batching scheduler)
    service_ms  t_end - t_start           generating: what the original artifact timed
    ttft_ms     t_first_token - t_submit  time to first token, as the user sees it
    tpot_ms     (t_end - t_first_token) / (output_tokens - 1)   time per output token after the first
    e2e_ms      t_end - t_submit          end to end: what the paper says it reports
    lateness_ms t_submit - t_intended     the client's lateness: how late the load generator sent the request
                                          versus its open-loop schedule (``arrivals.schedule``); NaN
                                          without the optional t_intended_s column (closed loop)

The same spans of one request as plain numbers: ``derive_row`` (one CSV row, no pandas: the request
generator writes each row while it is measured) and ``request_spans`` (the HTTP service's view, from its own
clock, which starts when the request arrives at the server and has no dequeue step). ``deferred`` says
whether the admission controller held a request, ``request_seed`` which seed a request samples with.

Throughput (ok requests per second) and goodput (requests that met an SLO per second) are counts over one
trial's span: the last t_end_s of any row minus the first t_submit_s of any row (``span_s``).
"""
from __future__ import annotations  # pandas is imported inside the functions over frames: the per-request path needs none

import math

import numpy as np

PERCENTILES = (50, 95, 99)
TIME_COLUMNS = ["t_submit_s", "t_dequeue_s", "t_admit_s", "t_start_s", "t_first_token_s", "t_end_s"]
INTENDED = "t_intended_s"  # optional: when an open-loop schedule meant to send the request
METRICS = ["e2e_ms", "service_ms", "ttft_ms", "tpot_ms", "queue_ms", "defer_ms", "sched_ms"]
_SPANS = {  # metric: (later timestamp, earlier timestamp)
    "queue_ms": ("t_dequeue_s", "t_submit_s"),
    "defer_ms": ("t_admit_s", "t_dequeue_s"),
    "sched_ms": ("t_start_s", "t_admit_s"),
    "service_ms": ("t_end_s", "t_start_s"),
    "ttft_ms": ("t_first_token_s", "t_submit_s"),
    "e2e_ms": ("t_end_s", "t_submit_s"),
}
STATUSES = ("ok", "rejected", "failed", "cut")  # cut: in flight at the trial's --deadline-s, stopped there
SERVER_SPANS = {  # the server's view of one request (seconds): (later step, earlier step)
    "deferral_s": ("t_admit", "t_arrive"), "queue_s": ("t_start", "t_admit"), "ttft_s": ("t_first_token", "t_arrive"),
    "service_s": ("t_end", "t_start"), "e2e_s": ("t_end", "t_arrive")}
_SEED_RUN, _SEED_TRIAL = 1_000_003, 10_007  # spread the run's seed, then the trial, apart from the request ids


def request_seed(base_seed: int, trial: int, rid: int) -> int:
    """The sampling seed of request ``rid`` of ``trial`` in a run seeded with ``base_seed`` (the HTTP service,
    which has no trials, passes trial 0): distinct for every request of a run, repeatable between runs."""
    return base_seed * _SEED_RUN + trial * _SEED_TRIAL + rid


def schedule_seed(base_seed: int, trial: int) -> int:
    """The seed of ``trial``'s open-loop arrival schedule in a run seeded with ``base_seed``."""
    return base_seed * _SEED_RUN + trial


def deferred(checks, decision):
    """Whether the admission controller held a request: more than one check (the gate re-checked the
    pressure), or admitted only after its last check timed out. Works on scalars (a bool) and elementwise on
    arrays or Series of gate_checks and gate_decision (missing checks are not > 1)."""
    return (checks > 1) | (decision == "admitted_after_timeout")


def _num(v) -> float:
    """A timestamp or count as a float; NaN when missing (None, empty) or not a number."""
    try:
        return float(v) if v is not None and v != "" else math.nan
    except (TypeError, ValueError):
        return math.nan


def request_spans(t_arrive: float, t_admit=None, t_start=None, t_first_token=None, t_end=None) -> dict:
    """The spans of ``SERVER_SPANS`` (seconds) of one request from its steps' times; None where a step
    never happened (a rejected request is never admitted)."""
    t = {"t_arrive": t_arrive, "t_admit": t_admit, "t_start": t_start, "t_first_token": t_first_token, "t_end": t_end}
    return {name: (t[a] - t[b] if t[a] is not None and t[b] is not None else None)
            for name, (a, b) in SERVER_SPANS.items()}


def derive_row(row: dict) -> dict:
    """The derived ``*_ms`` values of one row as ``derive`` computes them, with plain floats (NaN where a
    timestamp is missing): the request generator's per-request path, which uses no pandas."""
    t = {c: _num(row.get(c)) for c in TIME_COLUMNS}
    out = {name: (t[late] - t[early]) * 1000.0 for name, (late, early) in _SPANS.items()}
    decode_tokens = _num(row.get("output_tokens")) - 1
    out["tpot_ms"] = ((t["t_end_s"] - t["t_first_token_s"]) * 1000.0 / decode_tokens if decode_tokens > 0
                      else math.nan)
    out["lateness_ms"] = (t["t_submit_s"] - _num(row.get(INTENDED))) * 1000.0
    return out


def derive(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of ``df`` with the derived ``*_ms`` columns recomputed from the ``t_*_s`` columns.
    Missing timestamps (a rejected request never starts) give NaN, never 0, and so does ``lateness_ms``
    where the optional t_intended_s column is absent."""
    import pandas as pd
    out = df.copy()
    t = {c: pd.to_numeric(out[c], errors="coerce") for c in TIME_COLUMNS}
    for name, (late, early) in _SPANS.items():
        out[name] = (t[late] - t[early]) * 1000.0
    decode_tokens = pd.to_numeric(out["output_tokens"], errors="coerce") - 1
    out["tpot_ms"] = ((t["t_end_s"] - t["t_first_token_s"]) * 1000.0 / decode_tokens.where(decode_tokens > 0))
    intended = pd.to_numeric(out[INTENDED], errors="coerce") if INTENDED in out else np.nan
    out["lateness_ms"] = (t["t_submit_s"] - intended) * 1000.0
    return out


def percentile(values, q: float) -> float:
    """numpy's default (linear) percentile of the finite values; NaN when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.percentile(v, q)) if v.size else float("nan")


def span_s(df: pd.DataFrame) -> float:
    """Seconds from the first submission to the last completion of one trial: the largest t_end_s of any row
    (any status) minus the smallest t_submit_s of any row, missing values ignored. NaN when either is
    missing, when the span is not > 0, and when ``df`` holds rows of more than one trial (a ``trial``
    column with several values: each trial's clock starts at its own 0)."""
    import pandas as pd
    if "trial" in df and df["trial"].nunique() > 1:
        return float("nan")
    end = pd.to_numeric(df["t_end_s"], errors="coerce").max()
    start = pd.to_numeric(df["t_submit_s"], errors="coerce").min()
    span = float(end - start)
    return span if span > 0 else float("nan")


def goodput(df: pd.DataFrame, slo: dict) -> dict:
    """Requests that met the SLO, over one trial. ``slo`` maps metric columns of ``METRICS`` to bounds in
    milliseconds (``arrivals.parse_slo``). A request meets it when its status is ok and every bounded
    metric is <= its bound; a missing metric (NaN) does not meet its bound. Returns ``slo_met`` (that count),
    ``goodput_rps`` = slo_met / ``span_s`` and ``throughput_rps`` = ok requests / ``span_s`` (both NaN where the
    span is). An empty ``slo`` is met by every ok request. ValueError for a metric not in ``METRICS``."""
    import pandas as pd
    bad = [k for k in slo if k not in METRICS]
    if bad:
        raise ValueError(f"SLO metrics {bad} are not among {METRICS}")
    d = derive(df)
    met = d["status"].astype(str) == "ok"
    n_ok = int(met.sum())
    for m, bound in slo.items():
        met &= pd.to_numeric(d[m], errors="coerce") <= float(bound)
    span, n_met = span_s(d), int(met.sum())
    return {"slo_met": n_met, "goodput_rps": n_met / span, "throughput_rps": n_ok / span}


def summarize(df: pd.DataFrame, slo: dict | None = None) -> dict:
    """Counts by status and p50/p95/p99/mean of every metric over the ok requests of ``df``.
    Rejected and failed requests are counted, never folded into the latency statistics.
    Also ``throughput_rps`` (ok requests / ``span_s``, so NaN over rows of several trials); where ``df``
    has a t_intended_s value, ``p50_lateness_ms``, ``p95_lateness_ms`` and ``max_lateness_ms`` over every
    row (every sent request, whatever its status); with an ``slo``, ``slo_met`` and ``goodput_rps`` as
    ``goodput`` defines them."""
    import pandas as pd
    d = derive(df)
    status = d["status"].astype(str)
    res = {f"n_{s}": int((status == s).sum()) for s in STATUSES}
    res["n"] = int(len(d))
    ok = d[status == "ok"]
    for m in METRICS:
        for q in PERCENTILES:
            res[f"p{q}_{m}"] = percentile(ok[m], q)
        vals = pd.to_numeric(ok[m], errors="coerce").dropna()
        res[f"mean_{m}"] = float(vals.mean()) if len(vals) else float("nan")
    res["throughput_rps"] = goodput(d, {})["throughput_rps"]
    if INTENDED in d and pd.to_numeric(d[INTENDED], errors="coerce").notna().any():
        for q in (50, 95):
            res[f"p{q}_lateness_ms"] = percentile(d["lateness_ms"], q)
        res["max_lateness_ms"] = percentile(d["lateness_ms"], 100)
    if slo is not None:
        res.update(goodput(d, slo))
    return res


def min_samples_for(q: float, confidence: float = 0.95) -> int:
    """Smallest n for which the sample maximum bounds the q-th percentile from above with the given
    confidence (1 - (q/100)^n >= confidence); below it a tail percentile is an interpolation between the
    few largest samples and should be flagged (p95 at 95%: 59 samples)."""
    p = q / 100.0
    if p >= 1:
        return np.iinfo(np.int64).max
    return int(np.ceil(np.log(1 - confidence) / np.log(p)))


def ideal_fifo(t_submit_s, service_s) -> np.ndarray:
    """End-to-end seconds of each request under a perfect one-at-a-time FIFO server taking ``service_s``
    (one value, or one per request) for each: start_i = max(t_submit_i, end_{i-1}), end_i = start_i + S_i.
    Requests are served in submission order; the result is in the input order."""
    t = np.asarray(t_submit_s, dtype=float)
    s = np.broadcast_to(np.asarray(service_s, dtype=float), t.shape)
    e2e = np.empty_like(t)
    end = -np.inf
    for i in np.argsort(t, kind="stable"):
        end = max(t[i], end) + s[i]
        e2e[i] = end - t[i]
    return e2e
