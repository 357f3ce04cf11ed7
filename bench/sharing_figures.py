"""The sharing experiment's figures (bench/sharing_report.py): a timeline per configuration (its first trial's
phased run) and the frontier."""
from __future__ import annotations

import json
import math
import os

from llm_psi.analysis import phases


def _shade(ax, schedule):
    for (start, state), (_, secs) in zip(phases.boundaries(schedule), schedule):
        if state == "on":
            ax.axvspan(start, start + secs, color="0.9", zorder=0)


def timeline(stem: str, schedule, path: str, title: str) -> bool:
    """Service tokens/s, the co-tenant's units/s, the pressure signals and the controller's quota over one phased
    run, the co-tenant's phase shaded; False where the run's files are missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    if not all(os.path.exists(stem + s) for s in (".csv", ".json", "_timeline.csv")):
        return False
    rows, tl = pd.read_csv(stem + ".csv"), pd.read_csv(stem + "_timeline.csv")
    with open(stem + ".json") as f:
        per_second = ((json.load(f).get("trials") or [{}])[0].get("cotenant") or {}).get("per_second") or []
    fig, axes = plt.subplots(4, 1, figsize=(8, 8), sharex=True)
    ok = rows[rows["status"] == "ok"]
    tokens = ok.groupby(ok["t_end_s"].astype(float).floordiv(1))["output_tokens"].sum()
    axes[0].bar(tokens.index + 0.5, tokens.values, width=1.0)
    axes[0].set_ylabel("service tokens/s")
    axes[1].plot([r["t_s"] for r in per_second], [r["units_per_s"] for r in per_second])
    axes[1].set_ylabel("co-tenant units/s")
    for col, label in (("sys_cpu_some_pct", "system some %"), ("cg_cpu_some_pct", "service some %"),
                       ("share_others_pct", "others stall % (share)"), ("probe_delay_p99_ms", "probe p99 ms")):
        if col in tl and pd.to_numeric(tl[col], errors="coerce").notna().any():
            axes[2].plot(tl["t_s"], pd.to_numeric(tl[col], errors="coerce"), label=label)
    axes[2].set_ylabel("pressure, delay")
    axes[2].legend(fontsize=7)
    if "share_quota_cores" in tl and pd.to_numeric(tl["share_quota_cores"], errors="coerce").notna().any():
        axes[3].step(tl["t_s"], tl["share_quota_cores"], where="post")
    axes[3].set_ylabel("share quota (CPUs)")
    axes[3].set_xlabel("seconds since the trial's start (co-tenant on: shaded)")
    for ax in axes:
        _shade(ax, schedule)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def frontier(frame, path: str) -> None:
    """The co-tenant's share during its phase against the service's capacity alone, per configuration, with
    95% intervals and the service's p95 end-to-end time during the phase written beside each point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(config, phase, metric):
        r = frame[(frame.config == config) & (frame.phase == phase) & (frame.metric == metric)]
        return (math.nan,) * 3 if r.empty else tuple(r.iloc[0][["mean", "ci_lo", "ci_hi"]])
    fig, ax = plt.subplots(figsize=(9, 5))
    for config in dict.fromkeys(frame.config):  # labels in the legend: nearby points overlap
        x, y, p95 = get(config, "capacity", "capacity_alone_rps"), get(config, "with", "cotenant_share"), \
            get(config, "with", "e2e_p95_s")[0]
        if math.isnan(x[0]) or math.isnan(y[0]):
            continue
        err = lambda v: [[v[0] - v[1]], [v[2] - v[0]]] if math.isfinite(v[1]) else None  # noqa: E731
        ax.errorbar([x[0]], [y[0]], xerr=err(x), yerr=err(y), fmt="o", capsize=3,
                    label=f"{config} (p95 {p95:.2g} s)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="service's e2e p95\nbeside the co-tenant",
              title_fontsize=8)  # outside the axes: inside, it hid an error bar
    ax.set_xlabel("service capacity alone (req/s, closed loop c=8)")
    ax.set_ylabel("co-tenant throughput with the service / alone")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figures(d: str, frame) -> None:
    with open(os.path.join(d, "plan.json")) as f:
        schedule = phases.parse_schedule(json.load(f)["schedule"])
    for config in dict.fromkeys(frame.config):
        stem = os.path.join(d, "trials", f"{config}_t1_phases")
        timeline(stem, schedule, os.path.join(d, f"timeline_{config}.png"), f"{config}: trial 1")
    frontier(frame, os.path.join(d, "frontier.png"))
