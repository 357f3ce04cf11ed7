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
"""
from __future__ import annotations

import numpy as np
import pandas as pd

PERCENTILES = (50, 95, 99)
TIME_COLUMNS = ["t_submit_s", "t_dequeue_s", "t_admit_s", "t_start_s", "t_first_token_s", "t_end_s"]
METRICS = ["e2e_ms", "service_ms", "ttft_ms", "tpot_ms", "queue_ms", "defer_ms", "sched_ms"]
_SPANS = {  # metric: (later timestamp, earlier timestamp)
    "queue_ms": ("t_dequeue_s", "t_submit_s"),
    "defer_ms": ("t_admit_s", "t_dequeue_s"),
    "sched_ms": ("t_start_s", "t_admit_s"),
    "service_ms": ("t_end_s", "t_start_s"),
    "ttft_ms": ("t_first_token_s", "t_submit_s"),
    "e2e_ms": ("t_end_s", "t_submit_s"),
}
STATUSES = ("ok", "rejected", "failed")


def derive(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of ``df`` with the derived ``*_ms`` columns recomputed from the ``t_*_s`` columns.
    Missing timestamps (a rejected request never starts) give NaN, never 0."""
    out = df.copy()
    t = {c: pd.to_numeric(out[c], errors="coerce") for c in TIME_COLUMNS}
    for name, (late, early) in _SPANS.items():
        out[name] = (t[late] - t[early]) * 1000.0
    decode_tokens = pd.to_numeric(out["output_tokens"], errors="coerce") - 1
    out["tpot_ms"] = ((t["t_end_s"] - t["t_first_token_s"]) * 1000.0 / decode_tokens.where(decode_tokens > 0))
    return out


def percentile(values, q: float) -> float:
    """numpy's default (linear) percentile of the finite values; NaN when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.percentile(v, q)) if v.size else float("nan")


def summarize(df: pd.DataFrame) -> dict:
    """Counts by status and p50/p95/p99/mean of every metric over the ok requests of ``df``.
    Rejected and failed requests are counted, never folded into the latency statistics."""
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
