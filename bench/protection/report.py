"""The protection study's report, from the files of a results dir alone (llm_psi.analysis.protection's metrics):
DIR/summary.csv (config, owner, llm_load, metric, mean, ci_lo, ci_hi, n_trials: the mean over trials with a
95% t-interval; lat_imp_p99_pooled_pct: over the requests of every trial pooled, with a bootstrap
interval over trials) and DIR/power.csv (each goal metric's per-trial SD pooled over the cells, the fewest trials of
any cell, the difference to resolve and the power a two-sample t-test has to resolve it with them) and
DIR/differences.csv (for each owner and LLM load, each pair of configurations and each per-trial metric: the
difference of their means, config_a minus config_b, with a Welch 95% interval; `resolved` where it excludes 0).
Only complete trials count (their cell JSON says complete: true); the others are named and left out."""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re

from llm_psi.analysis import metrics, protection, stats
from llm_psi.load import arrivals
from llm_psi.load import owner as owners

CONFIGS = ("baseline", "cgroups", "weight100", "weight", "weight10", "weight1", "idle", "pinned", "burst", "share",
           "headroom")
OWNERS = ("interactive", "batch")
LOADS = ("idle", "interactive", "saturated")
METRICS = ("isol_mean_pct", "isol_p01_pct", "lat_imp_p50_pct", "lat_imp_p99_pct", "lat_imp_p99_pooled_pct",
           "owner_cpu_share",
           "llm_work_conservation", "llm_tokens_per_s", "llm_goodput_rps", "llm_send_lateness_max_ms")
RESOLVE = {"isol_mean_pct": 5.0, "isol_p01_pct": 5.0, "lat_imp_p99_pct": 10.0}   # the goal's differences
COLUMNS = ["config", "owner", "llm_load", "metric", "mean", "ci_lo", "ci_hi", "n_trials"]
DIFF_COLUMNS = ["owner", "llm_load", "metric", "config_a", "config_b", "diff", "ci_lo", "ci_hi", "n_a", "n_b",
                "resolved"]
DEFAULT_SLO = "ttft:5000,e2e:15000"


def stem(d, config, owner, load, k) -> str:
    return os.path.join(d, "trials", f"{config}_{owner}_{load}_t{k}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _rows(path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _col(rows, name) -> list[float]:
    out = []
    for r in rows:
        try:
            out.append(float(r[name]))
        except (KeyError, TypeError, ValueError):
            out.append(math.nan)
    return out


def llm_rates(path: str, seconds: float, slo: dict | None = None,
              closed_loop: bool = False) -> tuple[float, float]:
    """(ok requests per second, output tokens of the ok requests per second) of the generator's rows over a
    phase of `seconds` (requests cut at the deadline count nothing); with slo, the first is the goodput.
    ``closed_loop`` (the saturated load): a request is sent when one of the loop's workers takes it
    (t_dequeue_s), so its TTFT and end-to-end time count from there. The generator puts a closed loop's
    requests in its queue at once at the start (t_submit_s), and timed from that, every request after the
    first few would miss the SLO by its place in a queue that no user stands in (the pilot of 2026-12-07
    counted 4 of 24 completions so)."""
    import pandas as pd
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return math.nan, math.nan
    if df.empty:
        return 0.0, 0.0
    if closed_loop:
        df = df.assign(t_submit_s=pd.to_numeric(df["t_dequeue_s"], errors="coerce"))
    ok = df["status"].astype(str) == "ok"
    n = metrics.goodput(df, slo)["slo_met"] if slo else int(ok.sum())
    tokens = float(pd.to_numeric(df.loc[ok, "output_tokens"], errors="coerce").fillna(0).sum())
    return n / seconds, tokens / seconds


def _lateness_max_ms(path: str) -> float:
    import pandas as pd
    try:
        s = metrics.summarize(pd.read_csv(path))
    except (OSError, ValueError, KeyError, pd.errors.EmptyDataError):
        return math.nan
    return s.get("max_lateness_ms", math.nan)


def trial_metrics(st: str, rec: dict, slo: dict) -> dict:
    """{metric: value} of one complete trial (NaN where it does not apply: latency for the batch owner, the
    LLM's rates at idle)."""
    alone, with_ = rec["alone"], rec["with"]
    kind, arg = owners.parse(rec["owner_spec"])
    a_rows, w_rows = _rows(st + "_alone_owner.csv"), _rows(st + "_with_owner.csv")
    out = dict.fromkeys(METRICS, math.nan)
    if kind == "interactive":
        offset = metrics.percentile(_col(a_rows, "latency_ms"), 50) / 1000.0   # where completions fall alone
        per_s = protection.isolation_per_second(_col(w_rows, "t_end_s"), rec["with_s"], arg[0], offset)
        for q in (50, 99):
            out[f"lat_imp_p{q}_pct"] = protection.lat_imp_pct(_col(a_rows, "latency_ms"), _col(w_rows, "latency_ms"), q)
    else:
        per_s = protection.batch_isolation_per_second(_col(w_rows, "units_per_s"), _col(a_rows, "units_per_s"))
    out["isol_mean_pct"], out["isol_p01_pct"] = protection.isolation(per_s)
    out["owner_cpu_share"] = protection.cpu_share(with_["cpu_s"], with_["seconds"], alone["cpu_s"], alone["seconds"])
    out["llm_work_conservation"] = protection.work_conservation(with_.get("llm_cpu_s"), alone["cpu_s"],
                                                                alone["seconds"], with_["seconds"], rec["cpus"])
    if rec["llm_load"] != "idle":
        llm = st + "_llm.csv"
        out["llm_goodput_rps"], out["llm_tokens_per_s"] = llm_rates(llm, rec["with_s"], slo,
                                                                    closed_loop=rec["llm_load"] == "saturated")
        out["llm_send_lateness_max_ms"] = _lateness_max_ms(llm)
    return out


def trials_in(d: str) -> list[tuple[str, dict]]:
    """(stem, record) of every trial cell JSON under d/trials, complete or not, sorted by name."""
    out = []
    for path in sorted(glob.glob(os.path.join(d, "trials", "*_t*.json"))):
        if re.fullmatch(r"[A-Za-z0-9_]+_t\d+\.json", os.path.basename(path)) and not re.search(
                r"_(llm|service)\.json$", path):
            rec = read_json(path)
            if isinstance(rec, dict) and "owner" in rec:
                out.append((path[:-5], rec))
    return out


def trial_values(d: str) -> dict:
    """{(config, owner, llm_load, metric): [per-trial values, finite only, in trial order]} of the complete trials."""
    plan = read_json(os.path.join(d, "plan.json")) or {}
    slo = arrivals.parse_slo(plan.get("slo") or DEFAULT_SLO)
    values = {}
    for st, rec in sorted(trials_in(d), key=lambda sr: sr[1]["trial"]):
        if not rec.get("complete"):
            continue
        for metric, v in trial_metrics(st, rec, slo).items():
            if v is not None and math.isfinite(v):
                values.setdefault((rec["config"], rec["owner"], rec["llm_load"], metric), []).append(v)
    return values


def pooled_rows(d: str) -> list[dict]:
    """Per interactive-owner cell of complete trials: lat_imp_p99_pooled_pct, the p99 latency increase over
    every request of its trials pooled, with a bootstrap interval over trials (protection.pooled_lat_imp)."""
    cells = {}
    for st, rec in sorted(trials_in(d), key=lambda sr: sr[1]["trial"]):
        if rec.get("complete") and owners.parse(rec["owner_spec"])[0] == "interactive":
            a, w = _col(_rows(st + "_alone_owner.csv"), "latency_ms"), _col(_rows(st + "_with_owner.csv"), "latency_ms")
            cells.setdefault((rec["config"], rec["owner"], rec["llm_load"]), []).append((a, w))
    out = []
    for (c, o, l), pairs in cells.items():
        est, lo, hi = protection.pooled_lat_imp([p[0] for p in pairs], [p[1] for p in pairs], 99)
        if math.isfinite(est):
            out.append(dict(config=c, owner=o, llm_load=l, metric="lat_imp_p99_pooled_pct", mean=est, ci_lo=lo,
                            ci_hi=hi, n_trials=len(pairs)))
    return out


def _rank(seq, x):
    return seq.index(x) if x in seq else len(seq)


def summary_rows(values: dict, pooled: list[dict] = ()) -> list[dict]:
    """The t-interval rows of the per-trial values, and the pooled rows, in one order."""
    rows = list(pooled)
    for (c, o, l, m), vs in values.items():
        mean, lo, hi = stats.t_interval(vs)
        rows.append(dict(config=c, owner=o, llm_load=l, metric=m, mean=mean, ci_lo=lo, ci_hi=hi, n_trials=len(vs)))
    return sorted(rows, key=lambda r: (_rank(CONFIGS, r["config"]), r["config"], _rank(OWNERS, r["owner"]),
                                       _rank(LOADS, r["llm_load"]), METRICS.index(r["metric"])))


def pooled_sd(values: dict, metric: str) -> tuple[float, int, int]:
    """(the per-trial SD of metric pooled over the cells with >= 2 trials: the root mean of their variances, those
    cells, the fewest trials of any of them); (NaN, 0, 0) without any."""
    import numpy as np
    cells = [v for (_, _, _, m), v in values.items() if m == metric and len(v) >= 2]
    if not cells:
        return math.nan, 0, 0
    return float(np.sqrt(np.mean([np.var(v, ddof=1) for v in cells]))), len(cells), min(len(v) for v in cells)


def power_rows(values: dict, metrics_=RESOLVE) -> list[dict]:
    """Per metric: its pooled SD, and for the goal's differences (RESOLVE) the power with the trials there are
    and the trials that give 80% (stats.power, stats.trials_needed)."""
    out = []
    for metric in metrics_:
        sd, cells, n = pooled_sd(values, metric)
        if not cells:
            continue
        row = dict(metric=metric, sd_pooled=sd, cells=cells, n_trials_min=n, resolve=RESOLVE.get(metric))
        if metric in RESOLVE:
            row.update(power=stats.power(n, sd, RESOLVE[metric]), trials_for_80pct=stats.trials_needed(sd, RESOLVE[metric]))
        out.append(row)
    return out


def difference_rows(values: dict) -> list[dict]:
    """Per owner, LLM load and per-trial metric, every pair of configurations with >= 2 trials each, in the
    study's order (config_a before config_b): mean(a) - mean(b) with its Welch interval (stats.difference)."""
    cells = {}
    for (c, o, l, m), vs in values.items():
        if len(vs) >= 2 and m != "llm_send_lateness_max_ms":
            cells.setdefault((o, l, m), []).append((c, vs))
    out = []
    for (o, l, m), group in cells.items():
        group.sort(key=lambda cv: (_rank(CONFIGS, cv[0]), cv[0]))
        for i, (ca, va) in enumerate(group):
            for cb, vb in group[i + 1:]:
                d, lo, hi = stats.difference(va, vb)
                out.append(dict(owner=o, llm_load=l, metric=m, config_a=ca, config_b=cb, diff=d, ci_lo=lo, ci_hi=hi,
                                n_a=len(va), n_b=len(vb), resolved=bool(lo > 0 or hi < 0)))
    return sorted(out, key=lambda r: (_rank(OWNERS, r["owner"]), _rank(LOADS, r["llm_load"]), METRICS.index(r["metric"]),
                                      _rank(CONFIGS, r["config_a"]), r["config_a"], _rank(CONFIGS, r["config_b"]),
                                      r["config_b"]))


def _write(path, rows, columns):
    import pandas as pd
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def report(d: str) -> str:
    """Write DIR/summary.csv and DIR/power.csv; return a short text table."""
    values = trial_values(d)
    if not values:
        return f"{d}: no complete trials to report\n"
    rows = summary_rows(values, pooled_rows(d))
    _write(os.path.join(d, "summary.csv"), rows, COLUMNS)
    power = power_rows(values)
    _write(os.path.join(d, "power.csv"), power, ["metric", "sd_pooled", "cells", "n_trials_min", "resolve", "power",
                                                 "trials_for_80pct"])
    _write(os.path.join(d, "differences.csv"), difference_rows(values), DIFF_COLUMNS)
    lines = [f"{'config':<10} {'owner':<11} {'llm':<11} {'metric':<24} {'mean':>9} {'95% interval':>21} n"]
    for r in rows:
        ci = f"[{r['ci_lo']:.3g}, {r['ci_hi']:.3g}]" if math.isfinite(r["ci_lo"]) else "-"
        lines.append(f"{r['config']:<10} {r['owner']:<11} {r['llm_load']:<11} {r['metric']:<24} {r['mean']:>9.3g} "
                     f"{ci:>21} {r['n_trials']}")
    for p in power:
        lines.append(f"power: {p['metric']} SD {p['sd_pooled']:.3g}, n >= {p['n_trials_min']}: {100 * p['power']:.0f}% "
                     f"to resolve {p['resolve']:g} (80% needs {p['trials_for_80pct']})")
    broken = [os.path.basename(st) for st, rec in trials_in(d) if not rec.get("complete")]
    if broken:
        lines.append(f"left out, not complete: {', '.join(broken)}")
    return "\n".join(lines) + f"\nwritten: {os.path.join(d, 'summary.csv')}, power.csv, differences.csv\n"
