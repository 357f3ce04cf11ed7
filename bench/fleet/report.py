"""The fleet study's report from its files alone (bench/fleet/__main__.py writes them): DIR/summary.csv and
DIR/timeline.png. --report-only rewrites summary.csv byte for byte.

Per trial (the complete cells only), from its rows and its cell JSON:
    p95_ttft_ms, p95_e2e_ms   over the requests that ended ok (analysis/metrics.summarize)
    goodput_rps               requests within the SLO per second of the trial (metrics.goodput)
    rejected_share            requests refused (503: an instance's shedding limit) over those sent
    busy_share                the share of the requests served that went to a host while its owner was busy
                              (owners.busy at the request's send time; the instance from x-llm-psi-instance)
    owner_<host>_p99_ms       that host's owner's interactive latency: the probe's completion delay, p99, over
                              the trial (the probe runs while its owner is busy)
summary.csv: balancer, metric, mean, ci_lo, ci_hi, n_trials (a 95% t-interval over the trials).
"""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pandas as pd

from llm_psi.analysis import metrics
from llm_psi.analysis.stats import t_interval
from llm_psi.fleet.haproxy import BALANCERS
from llm_psi.fleet.owners import busy
from llm_psi.load.arrivals import parse_slo

BIN_S = 5.0


def cells(d: str) -> list[dict]:
    """The complete cells' JSON records (with 'stem'), in (balancer, trial) order."""
    out = []
    for path in sorted(glob.glob(os.path.join(d, "trials", "*_t*.json"))):
        with open(path) as f:
            rec = json.load(f)
        if rec.get("complete") and os.path.exists(path[:-5] + ".csv"):
            out.append({**rec, "stem": path[:-5]})
    return sorted(out, key=lambda r: (BALANCERS.index(r["balancer"]) if r["balancer"] in BALANCERS else 99,
                                      r["trial"]))


def busy_share(df: pd.DataFrame, hosts: list[str], phase_s: float) -> float:
    """Share of the served requests (an instance named) sent to a host while its owner was busy."""
    served = df[df["instance"].astype(str).isin(hosts)]
    if served.empty:
        return math.nan
    flags = [busy(hosts.index(h), t, phase_s) for h, t in zip(served["instance"], served["t_submit_s"])]
    return float(np.mean(flags))


def trial_metrics(rec: dict) -> dict:
    df = pd.read_csv(rec["stem"] + ".csv")
    s = metrics.summarize(df, slo=parse_slo(rec["slo"]))
    hosts = [h["name"] for h in rec["hosts"]]
    out = {"p95_ttft_ms": s["p95_ttft_ms"], "p95_e2e_ms": s["p95_e2e_ms"], "goodput_rps": s["goodput_rps"],
           "rejected_share": s["n_rejected"] / s["n"] if s["n"] else math.nan,
           "busy_share": busy_share(df, hosts, rec["phase_s"])}
    for h in hosts:
        out[f"owner_{h}_p99_ms"] = (rec.get("owners") or {}).get(h, {}).get("delay_p99_ms", math.nan)
    return out


def summary(d: str) -> pd.DataFrame:
    rows, per = [], {}
    for rec in cells(d):
        per.setdefault(rec["balancer"], []).append(trial_metrics(rec))
    for balancer, ms in per.items():
        for metric in ms[0]:
            values = [m.get(metric, math.nan) for m in ms]
            mean, lo, hi = t_interval(values)
            rows.append({"balancer": balancer, "metric": metric, "mean": mean, "ci_lo": lo, "ci_hi": hi,
                         "n_trials": int(np.isfinite(np.asarray(values, float)).sum())})
    return pd.DataFrame(rows, columns=["balancer", "metric", "mean", "ci_lo", "ci_hi", "n_trials"])


def figure(d: str, path: str) -> None:
    """Per host (rows) and balancer (columns), the first complete trial over time: its owner busy (shaded),
    the agent's weight (line, %) and the requests routed to it per BIN_S (bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    firsts = {}
    for rec in cells(d):
        firsts.setdefault(rec["balancer"], rec)
    if not firsts:
        return
    hosts = [h["name"] for h in next(iter(firsts.values()))["hosts"]]
    fig, axes = plt.subplots(len(hosts), len(firsts), figsize=(4.5 * len(firsts), 2.6 * len(hosts)), squeeze=False,
                             sharex=True)
    for j, (balancer, rec) in enumerate(firsts.items()):
        df = pd.read_csv(rec["stem"] + ".csv")
        samples = pd.read_csv(rec["stem"] + "_hosts.csv") if os.path.exists(rec["stem"] + "_hosts.csv") else None
        end = rec["duration_s"]
        for i, h in enumerate(hosts):
            ax = axes[i][j]
            for k in range(int(math.ceil(end / rec["phase_s"])) if rec.get("owners") else 0):   # none: no owners
                if busy(i, k * rec["phase_s"], rec["phase_s"]):
                    ax.axvspan(k * rec["phase_s"], min(end, (k + 1) * rec["phase_s"]), color="0.85", lw=0)
            sent = pd.to_numeric(df.loc[df["instance"] == h, "t_submit_s"], errors="coerce").dropna()
            counts, edges = np.histogram(sent, bins=np.arange(0, end + BIN_S, BIN_S))
            ax.bar(edges[:-1], counts, width=BIN_S, align="edge", color="tab:blue", alpha=0.6, label="requests routed")
            ax.set_ylabel(f"{h}: requests / {BIN_S:g} s")
            if samples is not None:
                s = samples[samples["host"] == h]
                ax2 = ax.twinx()
                ax2.plot(s["t_s"], s["agent_weight_pct"], color="tab:red", lw=1, label="agent weight")
                ax2.set_ylim(-5, 105)
                ax2.set_ylabel("agent weight, %")
            if i == 0:
                ax.set_title(f"{balancer} (trial {rec['trial']}; grey: owner busy)")
        axes[-1][j].set_xlabel("s since the trial's start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(d: str) -> str:
    """Write DIR/summary.csv and DIR/timeline.png; returns the summary as text."""
    s = summary(d)
    s.to_csv(os.path.join(d, "summary.csv"), index=False, float_format="%.6g")
    figure(d, os.path.join(d, "timeline.png"))
    return s.to_string(index=False)
