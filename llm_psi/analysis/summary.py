"""Per-cell statistics (summary.csv): counts, percentiles, intervals, small-n flags, the gate's and the
throttling's counters and the ideal FIFO, per trial and pooled; every metric from metrics.py."""
from __future__ import annotations

import numpy as np
import pandas as pd

from llm_psi.analysis import metrics
from llm_psi.analysis.cells import label, order
from llm_psi.analysis.stats import t_interval


IDEAL_REFERENCE = ("cgroups_threads", "limit1", "cgroups")  # c=1 cells giving S, in order of preference
BOOT_RESAMPLES, BOOT_SEED = 2000, 0
THROTTLE_KEYS = ("nr_periods", "nr_throttled", "throttled_usec")


def bootstrap_ci(values, q: float = 95, level: float = 95) -> tuple[float, float]:
    """Percentile-bootstrap CI of the q-th percentile (BOOT_RESAMPLES resamples, seed BOOT_SEED)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan")
    idx = np.random.default_rng(BOOT_SEED).integers(0, v.size, (BOOT_RESAMPLES, v.size))
    boot = np.percentile(v[idx], q, axis=1)
    lo, hi = np.percentile(boot, [(100 - level) / 2, 100 - (100 - level) / 2])
    return float(lo), float(hi)


def group_stats(rows: pd.DataFrame, deltas: list, ideal_ms: float | None) -> dict:
    """Counts, percentiles, CIs, small-n flags, gate, throttling and ideal-FIFO statistics of some rows."""
    s = metrics.summarize(rows)
    ok = rows[rows["status"] == "ok"]
    for m in ("e2e", "service"):
        s[f"p95_{m}_iid_boot_low_ms"], s[f"p95_{m}_iid_boot_high_ms"] = bootstrap_ci(ok[f"{m}_ms"])
    for q in metrics.PERCENTILES:
        s[f"small_n_p{q}"] = s["n_ok"] < metrics.min_samples_for(q)
    decision = rows["gate_decision"].astype(str)
    gated = decision != "none"
    nan = float("nan")
    held = metrics.deferred(rows["gate_checks"], decision) | (decision != "admitted")  # or refused
    s["gate_deferred_frac"] = float(held[gated].mean()) if gated.any() else nan
    s["gate_mean_checks"] = float(rows.loc[gated, "gate_checks"].mean()) if gated.any() else nan
    s["gate_timeouts"] = int((decision == "admitted_after_timeout").sum())
    for k in THROTTLE_KEYS:
        vals = [d.get(k) for d in deltas if d and d.get(k) is not None]
        s[k] = float(sum(vals)) if vals else nan
    s["throttled_share"] = s["nr_throttled"] / s["nr_periods"] if s["nr_periods"] > 0 else nan
    ideal = np.concatenate([metrics.ideal_fifo(g["t_submit_s"], ideal_ms / 1000) for _, g in rows.groupby("trial")]
                           ) * 1000 if ideal_ms else np.array([])
    s["ideal_service_ms"] = ideal_ms if ideal_ms else nan
    s["ideal_p95_e2e_ms"] = metrics.percentile(ideal, 95)
    s["service_vs_ideal"] = s["p95_service_ms"] / s["ideal_service_ms"]
    s["e2e_vs_ideal"] = s["p95_e2e_ms"] / s["ideal_p95_e2e_ms"]
    return s


def ideal_reference(cells) -> tuple[str | None, float | None]:
    """The c=1 cell whose median ok service time is the ideal single-request time S (ms), and S."""
    for config in IDEAL_REFERENCE:
        cell = cells.get((config, 1))
        if cell is not None:
            service = cell.rows.loc[cell.rows["status"] == "ok", "service_ms"]
            if service.notna().any():
                return f"{config}_c1", float(service.median())
    return None, None


def summarize_cells(cells, ideal_ms) -> pd.DataFrame:
    """One row per config x concurrency x trial, plus the pooled row (trial = all), which also holds the mean
    of the per-trial p95s with its t-interval over trials."""
    out = []
    for config in order({k[0] for k in cells}):
        for c in sorted(k[1] for k in cells if k[0] == config):
            cell = cells[(config, c)]
            deltas = {t.get("trial"): t.get("cgroup_delta") for t in cell.meta.get("trials", [])}
            ideal = ideal_ms if cell.limited else None
            head = {"config": config, "label": label(config), "limited": cell.limited, "concurrency": c,
                    "complete": cell.complete, "limits_match": cell.limits_match}
            trials = [{**head, "trial": str(t), "n_trials": 1,
                       **group_stats(cell.rows[cell.rows["trial"] == t], [deltas.get(t)], ideal)}
                      for t in sorted(cell.rows["trial"].unique())]
            pooled = {**head, "trial": "all", **group_stats(cell.rows, list(deltas.values()), ideal),
                      "n_trials": len(trials)}
            for m in ("e2e", "service"):
                keys = [f"p95_{m}_trial_{k}_ms" for k in ("mean", "ci_low", "ci_high")]
                pooled.update(zip(keys, t_interval([t[f"p95_{m}_ms"] for t in trials])))
            out += trials + [pooled]
    df = pd.DataFrame(out)
    first = ["config", "label", "limited", "concurrency", "trial", "complete", "limits_match", "n", "n_ok",
             "n_rejected", "n_failed", "p50_e2e_ms", "p95_e2e_ms", "p99_e2e_ms", "n_trials", "p95_e2e_trial_mean_ms",
             "p95_e2e_trial_ci_low_ms", "p95_e2e_trial_ci_high_ms", "p95_service_trial_mean_ms",
             "p95_service_trial_ci_low_ms", "p95_service_trial_ci_high_ms"]
    return df[first + [c for c in df.columns if c not in first]]
