"""The figures (PNG, and pages of paper.pdf), with matplotlib only (no pyplot state). write_figures(an)
saves them into the results directory and returns {path: Figure}. ``an`` is the analysis (view.Analysis)."""
from __future__ import annotations

import math
import os

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator


DPI = 120
RC = {"pdf.fonttype": 42, "font.size": 10, "axes.titlesize": 10}  # TrueType: the PDF's text is extractable
TITLES = {"e2e": "end-to-end latency (submission → last token)",
          "service": "service time (generation start → last token)"}
def color(an, config: str) -> str:
    return f"C{an.palette.index(config) % 10}"


def focus(an) -> int:
    """The concurrency of the CDF and timeline figures: 8, the paper's hardest level, or the highest run."""
    levels = {k[1] for k in an.cells}
    return 8 if 8 in levels else max(levels)


def column(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(np.nan, index=df.index)


def fig_p95(an) -> Figure:
    fig = Figure(figsize=(11, 5.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric in zip(axes, TITLES):
        for cfg in an.configs:
            rows = [r for c in an.concurrencies if (r := an.pooled(cfg, c))]
            y, lo, hi = (np.array([r[f"p95_{metric}_trial_{k}_ms"] for r in rows]) / 1000
                         for k in ("mean", "ci_low", "ci_high"))
            bars = [np.nan_to_num(np.clip(d, 0, None)) for d in (y - lo, hi - y)]  # no bar without an interval
            ax.errorbar([r["concurrency"] for r in rows], y, yerr=bars,
                        marker="o", capsize=3, color=color(an, cfg), label=f"{an.label(cfg)} (ours)")
        for cfg, col in an.paper_columns.items():
            ax.plot(an.published.index, an.published[col] / 1000, ls="--", marker="s", mfc="none",
                    color=color(an, cfg), label=f"{an.label(cfg)} (published)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(an.concurrencies, [str(c) for c in an.concurrencies])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.set(title=f"p95 {TITLES[metric]}", xlabel="concurrency (worker threads)")
    axes[0].set_ylabel("p95 latency (s, log scale)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("p95 vs concurrency: ours (mean of per-trial p95; bars: 95% t-interval over trials) and the "
                 "published Table I\n"
                 "(dashed; labelled end-to-end in the paper, service times in its raw files: drawn on both panels)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return fig


def fig_cdf(an, c: int) -> Figure:
    fig = Figure(figsize=(11, 4.6))
    for ax, metric in zip(fig.subplots(1, 2), TITLES):
        for cfg in an.configs:
            if (cell := an.cells.get((cfg, c))) is not None and (cfg, c) in an.used:
                v = np.sort(cell.rows.loc[cell.rows["status"] == "ok", f"{metric}_ms"].dropna().to_numpy(float)) / 1000
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", color=color(an, cfg),
                        label=f"{an.label(cfg)} (n={len(v)})")
        ax.axhline(0.95, ls=":", color="grey", lw=1)
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set(title=TITLES[metric].capitalize(), xlabel="latency (s, log scale)", ylabel="share of ok requests ≤ x",
               ylim=(0, 1.02))
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Latency CDF at concurrency {c}, all trials pooled (dotted line: p95)")
    fig.tight_layout()
    return fig


PSI_LINES = {"sys_cpu_some_avg10": dict(color="C0", label="system, avg10"),
             "sys_cpu_some_pct": dict(color="C0", ls=":", label="system, per sample"),
             "cg_cpu_some_avg10": dict(color="C1", ls="--", label="cgroup, avg10"),
             "cg_cpu_some_pct": dict(color="C1", ls="-.", label="cgroup, per sample")}


def fig_timeline(an, c: int) -> Figure | None:
    cells = [cell for cfg in an.configs if (cell := an.cells.get((cfg, c))) is not None and (cfg, c) in an.used
             and cell.timeline is not None and "t_s" in cell.timeline and len(cell.timeline)]
    if not cells:
        return None
    fig = Figure(figsize=(11, 1.0 + 2.6 * len(cells)))
    for (a, b), cell in zip(fig.subplots(len(cells), 2, squeeze=False), cells):
        tl = cell.timeline[column(cell.timeline, "trial") == 1] if "trial" in cell.timeline else cell.timeline
        t, name = column(tl, "t_s"), f"{an.label(cell.config)} c={c}, trial 1"
        for col, style in PSI_LINES.items():
            if column(tl, col).notna().any():
                a.plot(t, column(tl, col), **style)
        if cell.meta.get("config", {}).get("admission") == "gate":
            a.axhline(cell.meta["config"].get("psi_threshold", np.nan), color="red", lw=1, label="gate threshold")
        a.set(ylim=(0, 105), ylabel="CPU some (%)", title=f"{name}: CPU pressure")
        counts = [col for col in ("in_flight", "waiting", "limit") if column(tl, col).notna().any()]
        for col in counts:
            b.step(t, column(tl, col), where="post", label=col.replace("_", "-"))
        top = max([column(tl, col).max() for col in counts] + [1])
        b.set(ylim=(0, 1.1 * top), ylabel="requests", title=f"{name}: requests and throttling")
        b.yaxis.set_major_locator(MaxNLocator(integer=True))
        throttled = column(tl, "nr_throttled")
        if throttled.notna().any():
            since = throttled - throttled.dropna().iloc[0]
            b2 = b.twinx()
            b2.plot(t, since, color="C3", lw=1, label="throttled periods since start")
            b2.set(ylim=(0, max(1.0, 1.05 * since.max())), ylabel="throttled periods")
            b2.legend(fontsize=7, loc="upper right")
        for ax in (a, b):
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("time since trial start (s)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"PSI and throttling timeline at concurrency {c}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # leave the suptitle its own band
    return fig


def fig_breakdown(an) -> Figure:
    cols = min(4, len(an.configs))
    rows = math.ceil(len(an.configs) / cols)
    fig = Figure(figsize=(11, 0.8 + 3.0 * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    x = np.arange(len(an.concurrencies))
    for ax, cfg in zip(axes, an.configs):
        bottom = np.zeros(len(x))
        for i, part in enumerate(("queue", "defer", "sched", "service")):
            v = np.nan_to_num([r[f"mean_{part}_ms"] / 1000 if (r := an.pooled(cfg, c)) else 0
                               for c in an.concurrencies])
            ax.bar(x, v, bottom=bottom, color=f"C{i}", label=part)
            bottom += v
        ax.set_xticks(x, [str(c) for c in an.concurrencies])
        ax.set(title=an.label(cfg), xlabel="concurrency", ylabel="mean time (s)")
    for ax in axes[len(an.configs):]:
        ax.axis("off")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Where the end-to-end time goes: mean queue + defer + sched + service = mean end-to-end (ok requests)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def fig_artifact(an) -> Figure:
    """The paper's raw files: each request's latency against wall-clock time, one colour per configuration,
    each file labelled with its concurrency (files recorded close together share one label)."""
    art = an.artifact
    t0 = art["timestamp"].min()
    fig = Figure(figsize=(11, 5))
    ax = fig.subplots()
    labels = []  # [config, hours, top latency, levels]: one label per run of files close in time
    for (cfg, c), g in sorted(art.groupby(["config", "concurrency"]), key=lambda kg: kg[1]["timestamp"].min()):
        h, y = (g["timestamp"] - t0) / 3600, g["latency_ms"] / 1000
        ax.plot(h, y, marker="o", ms=3, lw=0.7, color=color(an, cfg),
                label=an.label(cfg) if cfg not in [x[0] for x in labels] else None)
        if labels and labels[-1][0] == cfg and h.min() - labels[-1][1] < 0.15:
            labels[-1][2], labels[-1][3] = max(labels[-1][2], y.max()), labels[-1][3] + [c]
        else:
            labels.append([cfg, h.min(), y.max(), [c]])
    for cfg, h, top, levels in labels:
        ax.annotate("c=" + ",".join(map(str, levels)), (h, top), xytext=(0, 6), textcoords="offset points",
                    fontsize=8, color=color(an, cfg))
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set(xlabel=f"hours since the first row ({pd.to_datetime(t0, unit='s', utc=True):%Y-%m-%d %H:%M} UTC)",
           ylabel="latency_ms of one request (s, log scale)")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("The paper's raw files (reference/artifact_results/): each request's service time against the time "
                 "it was recorded")
    fig.tight_layout()
    return fig


def write_figures(an) -> dict:
    """Save the PNG figures into the results directory; returns {path: Figure} for write_paper."""
    c, out = focus(an), {}
    makers = {"p95_vs_concurrency": lambda: fig_p95(an), f"latency_cdf_c{c}": lambda: fig_cdf(an, c),
              f"timeline_c{c}": lambda: fig_timeline(an, c), "latency_breakdown": lambda: fig_breakdown(an),
              "artifact_timeline": lambda: fig_artifact(an)}
    with matplotlib.rc_context(RC):
        for name, make in makers.items():
            if (fig := make()) is None:  # no timeline files: the analysis warns
                continue
            out[os.path.join(an.results_dir, name + ".png")] = fig
            fig.savefig(os.path.join(an.results_dir, name + ".png"), dpi=DPI)
    return out
