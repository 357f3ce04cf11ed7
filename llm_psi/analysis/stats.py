"""Statistics with the trial as the unit: requests of one trial share its host state, so intervals and
drift checks are computed over per-trial values, never over pooled requests.

    t_interval    mean of per-trial values with a t-interval
    trial_ratio   ratio of geometric means of two sets of per-trial values, Welch interval on the log scale
    difference    difference of the means of two sets of per-trial values, with a Welch interval
    drift         per-trial medians against the run order: Spearman's rho and p, least-squares slope with its
                  t-interval
    interleaving  how often consecutive trials of a sweep switch configuration
"""
from __future__ import annotations

from itertools import permutations

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
EXACT_P_MAX = 8  # up to this many points the drift p is the exact permutation p


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of the finite values with its t-interval (scipy.stats.t); the interval is NaN with fewer than 2."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return (float(v[0]) if v.size else np.nan), np.nan, np.nan
    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def trial_ratio(a, b, level: float = LEVEL) -> tuple[float, float, float]:
    """Geometric mean of a / geometric mean of b with a Welch t-interval on the difference of their mean logs
    (difference() on the logs of the finite positive values), exponentiated, so it always contains the ratio;
    NaN unless both have >= 2."""
    la, lb = (np.log(v[np.isfinite(v) & (v > 0)]) for v in (np.asarray(a, float), np.asarray(b, float)))
    return tuple(float(np.exp(x)) for x in difference(la, lb, level))


def difference(a, b, level: float = LEVEL) -> tuple[float, float, float]:
    """mean(a) - mean(b) of the finite values with a Welch t-interval (Welch–Satterthwaite df): the two-sample
    comparison whose power stats.power states. Zero width where neither set varies; NaN interval unless
    both have >= 2 values."""
    va_, vb_ = (v[np.isfinite(v)] for v in (np.asarray(a, float), np.asarray(b, float)))
    if not va_.size or not vb_.size:
        return np.nan, np.nan, np.nan
    d = float(va_.mean() - vb_.mean())
    if va_.size < 2 or vb_.size < 2:
        return d, np.nan, np.nan
    sa, sb = va_.var(ddof=1) / va_.size, vb_.var(ddof=1) / vb_.size
    if sa + sb == 0:
        return d, d, d
    df = (sa + sb) ** 2 / (sa ** 2 / (va_.size - 1) + sb ** 2 / (vb_.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df) * np.sqrt(sa + sb))
    return d, d - half, d + half


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rho with its two-sided p: scipy.stats.spearmanr's (a t approximation) above EXACT_P_MAX
    points; at or below it the exact permutation p over every ordering of y, since the approximation
    gives p = 0 for any three points in perfect order."""
    rho, p = stats.spearmanr(x, y)
    if 2 < len(x) <= EXACT_P_MAX and np.isfinite(rho):
        rx, ry = stats.rankdata(x), stats.rankdata(y)
        rx, perms = rx - rx.mean(), np.array(list(permutations(ry))) - ry.mean()
        r = perms @ rx / (np.linalg.norm(perms, axis=1) * np.linalg.norm(rx))
        p = np.mean(np.abs(r) >= abs(rho) - 1e-12)
    return float(rho), float(p)


def drift(runs: pd.DataFrame, rows: pd.DataFrame) -> dict:
    """Each trial's median ok service_ms against its place in the sweep (``runs``: trial, run_index,
    started_at; run_index is used when every trial has one, else started_at): Spearman's rho and p, and the
    least-squares slope in % of the mean per trial position with its 95% t-interval (scipy.stats.linregress's
    standard error, n - 2 df), which says how large a trend the data still allow where p does not reject.
    status: drift (p < 0.05), none found, or why there is no test."""
    runs = runs.dropna(subset=["trial"])
    key = next((k for k in ("run_index", "started_at") if len(runs) and runs[k].notna().all()), None)
    if key is None:
        return {"status": "no run order recorded"}
    median = rows[rows["status"] == "ok"].groupby("trial")["service_ms"].median()
    runs = runs[runs["trial"].isin(median.index)].sort_values([key, "trial"])
    if len(runs) < 3:
        return {"status": f"{len(runs)} trials: too few"}
    y, x = median.loc[runs["trial"]].to_numpy(float), np.arange(len(runs))
    rho, p = spearman(x, y)
    fit = stats.linregress(x, y)
    half = stats.t.ppf(0.5 + LEVEL / 2, len(y) - 2) * fit.stderr
    pct = lambda v: float(100 * v / y.mean())
    return {"status": "drift" if p < 0.05 else "none found", "n": len(y), "rho": rho, "p": p,
            "slope_pct": pct(fit.slope), "slope_ci_lo_pct": pct(fit.slope - half),
            "slope_ci_hi_pct": pct(fit.slope + half), "order": key}


def interleaving(runs_by_config) -> tuple[int, int] | None:
    """``runs_by_config``: (config, runs) pairs, one per cell. Of all trials sorted by started_at, how many
    consecutive pairs switch configuration, and how many pairs there are (None without two start times)."""
    starts = sorted((r.started_at, config) for config, runs in runs_by_config
                    for r in runs.itertuples() if pd.notna(r.started_at))
    if len(starts) < 2:
        return None
    return sum(a[1] != b[1] for a, b in zip(starts, starts[1:])), len(starts) - 1


def power(n: int, sd: float, delta: float, level: float = LEVEL) -> float:
    """The power of a two-sided two-sample t-test with n trials per group to find a true difference delta between
    two configurations whose per-trial values have standard deviation sd (noncentral t, 2n - 2 df)."""
    if n < 2 or not sd > 0:
        return float("nan") if n < 2 else 1.0
    df, nc = 2 * n - 2, abs(delta) / (sd * np.sqrt(2.0 / n))
    crit = stats.t.ppf(0.5 + level / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def trials_needed(sd: float, delta: float, target: float = 0.8, level: float = LEVEL, most: int = 10000) -> int:
    """The fewest trials per configuration (>= 2) whose two-sample t-test has at least `target` power to resolve
    delta at `level` (power()); `most` where even that many would not."""
    if not sd > 0:
        return 2
    z = stats.norm.ppf(0.5 + level / 2) + stats.norm.ppf(target)
    start = max(2, int(2 * (z * sd / abs(delta)) ** 2) - 2)  # the normal approximation, which t only raises
    for n in range(min(start, most), most + 1):
        if power(n, sd, delta, level) >= target:
            return n
    return most
