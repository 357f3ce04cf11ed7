"""The co-tenant experiment's report (bench/cotenant.py, step 4): DIR/table.md, DIR/summary.csv and
DIR/cotenant.png from the files of a results dir alone; pure functions over the files' contents."""
from __future__ import annotations

import glob
import json
import math
import os

from llm_psi import config as configs
from llm_psi.analysis import metrics
from llm_psi.load import arrivals

CONFIGS = ("cgroups", "cgroups_threads", "psi", "psi_cgroup", "adaptive", "batch_psi", "baseline", "psi_unlimited")
ADAPTIVE = ("adaptive", "batch_psi")     # configurations whose admission limit moves
THRESHOLD = 95.0                         # the paper's gate threshold (some avg10, percent)
DEFAULT_SLO = "ttft:5000,e2e:15000"


class StepError(Exception):
    """A step failed: a child's exit status, or a file it should have written."""


def setting(config: str) -> str:
    return "limited" if configs.is_limited(config) else "unlimited"


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def crossing(timeline, column: str, threshold: float = THRESHOLD) -> tuple[float, float]:
    """(share of the timeline samples with a value in which column > threshold, first t_s where it is);
    (NaN, NaN) without samples, (0.0, NaN) where it never crosses."""
    import pandas as pd
    if timeline is None or column not in timeline or "t_s" not in timeline:
        return math.nan, math.nan
    v, t = pd.to_numeric(timeline[column], errors="coerce"), pd.to_numeric(timeline["t_s"], errors="coerce")
    if not v.notna().any():
        return math.nan, math.nan
    over = v > threshold
    return float(over.sum() / v.notna().sum()), float(t[over].min()) if over.any() else math.nan


def deferred(df) -> int:
    """Requests the gate held: more than one check, or admitted after the last check."""
    import pandas as pd
    checks = pd.to_numeric(df.get("gate_checks", pd.Series(dtype=float)), errors="coerce")
    decision = df.get("gate_decision", pd.Series(dtype=str)).astype(str)
    return int(metrics.deferred(checks, decision).sum())


def cotenant_share(meta: dict, reference) -> float:
    """The co-tenant's mean units/s over the cell's trials / its units/s alone; NaN without a co-tenant, without
    a reference, or where the reference ran another co-tenant spec."""
    spec = (meta.get("config") or {}).get("antagonist")
    rates = [t["cotenant"]["mean_units_per_s"] for t in meta.get("trials", [])
             if (t.get("cotenant") or {}).get("mean_units_per_s") is not None]
    ref = (reference or {}).get("units_per_s")
    if not spec or not rates or not ref or (reference or {}).get("antagonist") != spec:
        return math.nan
    return sum(rates) / len(rates) / ref


def cell_row(df, meta: dict, timeline, reference, slo: dict) -> dict:
    """One row of summary.csv from a cell's rows, metadata and timeline."""
    import pandas as pd
    cfg = meta.get("config") or {}
    s = metrics.summarize(df, slo)
    row = dict(config=cfg.get("config"), limited="yes" if configs.is_limited(cfg.get("config", "")) else "no",
               cotenant=cfg.get("antagonist") or "none", rate_rps=cfg.get("rate"), n_ok=s["n_ok"],
               n_rejected=s["n_rejected"], p95_e2e_s=s["p95_e2e_ms"] / 1000, p95_service_s=s["p95_service_ms"] / 1000,
               goodput_rps=s["goodput_rps"], cotenant_share=cotenant_share(meta, reference), deferred=deferred(df),
               complete=bool(meta.get("complete")))
    row["sys_over_frac"], row["sys_first_cross_s"] = crossing(timeline, "sys_cpu_some_avg10")
    row["cg_over_frac"], row["cg_first_cross_s"] = crossing(timeline, "cg_cpu_some_avg10")
    limit = (pd.to_numeric(timeline["limit"], errors="coerce") if timeline is not None and "limit" in timeline
             and row["config"] in ADAPTIVE else pd.Series(dtype=float))
    row["limit_min"], row["limit_max"] = (float(limit.min()), float(limit.max())) if limit.notna().any() else (
        math.nan, math.nan)
    return row


def _order(frame, key="config"):
    rank = {c: i for i, c in enumerate(CONFIGS)}
    return frame.assign(_r=frame[key].map(lambda c: rank.get(c, len(rank))), _t=frame["cotenant"] != "none") \
        .sort_values(["_r", key, "_t", "cotenant"]).drop(columns=["_r", "_t"]).reset_index(drop=True)


def cells_in(d: str) -> list[tuple[str, dict]]:
    """(stem, metadata) of every cell in d: a JSON with a 'config' object and a CSV beside it."""
    found = [(path[:-5], read_json(path)) for path in sorted(glob.glob(os.path.join(d, "*.json")))]
    return [(stem, meta) for stem, meta in found if isinstance(meta, dict) and isinstance(meta.get("config"), dict)
            and os.path.exists(stem + ".csv")]


def summary_frame(d: str, slo: dict):
    """summary.csv: one row per cell in d."""
    import pandas as pd
    reference, rows = read_json(os.path.join(d, "reference.json")), []
    for stem, meta in cells_in(d):
        tl = pd.read_csv(stem + "_timeline.csv") if os.path.exists(stem + "_timeline.csv") else None
        rows.append(cell_row(pd.read_csv(stem + ".csv"), meta, tl, reference, slo))
    return _order(pd.DataFrame(rows)) if rows else pd.DataFrame()


def capacity_frame(d: str):
    """The capacity cells in d/capacity: setting, config, co-tenant, capacity (ok requests / span), p95 service."""
    import pandas as pd
    rows = []
    for stem, meta in cells_in(os.path.join(d, "capacity")):
        s, cfg = metrics.summarize(pd.read_csv(stem + ".csv")), meta["config"]
        rows.append(dict(setting=setting(cfg["config"]), config=cfg["config"], cotenant=cfg.get("antagonist") or "none",
                         capacity_rps=s["throughput_rps"], n_ok=s["n_ok"], p95_service_s=s["p95_service_ms"] / 1000))
    return _order(pd.DataFrame(rows)) if rows else pd.DataFrame()


def e2e_panel(summary):
    """p95 e2e (s): configs (in CONFIGS order) x co-tenant ('none' first)."""
    p = summary.pivot_table(index="config", columns="cotenant", values="p95_e2e_s", aggfunc="first")
    cols = sorted(p.columns, key=lambda c: (c != "none", c))
    return p.reindex(index=list(dict.fromkeys(summary["config"])), columns=cols)


def share_panel(summary):
    """The co-tenant's share of its throughput alone, per config (cells with a co-tenant only)."""
    s = summary[summary["cotenant"] != "none"]
    return s.groupby("config", sort=False)["cotenant_share"].first()


def figure(summary, path: str) -> None:
    from matplotlib.figure import Figure
    e2e, share = e2e_panel(summary), share_panel(summary)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    width, x = 0.8 / max(1, len(e2e.columns)), range(len(e2e))
    for j, tenant in enumerate(e2e.columns):
        ax1.bar([i + j * width for i in x], e2e[tenant].to_numpy(float), width, label=f"co-tenant {tenant}")
    ax1.set_xticks([i + width * (len(e2e.columns) - 1) / 2 for i in x], e2e.index, rotation=30, ha="right")
    ax1.set_ylabel("p95 end-to-end (s)")
    ax1.set_title("service: p95 end-to-end")
    ax1.legend()
    ax2.bar(range(len(share)), share.to_numpy(float), 0.6, color="tab:red")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.set_xticks(range(len(share)), share.index, rotation=30, ha="right")
    ax2.set_ylabel("co-tenant throughput / alone")
    ax2.set_title("co-tenant: share of its throughput alone")
    fig.savefig(path, dpi=120)


def _f(v, digits=2, pct=False):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{100 * v:.0f}%" if pct else f"{v:.{digits}f}"


def table_md(summary, capacity, reference, slo_text: str) -> str:
    ref = (reference or {}).get("units_per_s")
    lines = ["# Co-tenant experiment", "",
             f"Co-tenant alone (reference.json): {reference.get('antagonist')}, {_f(ref, 1)} units/s over "
             f"{_f(reference.get('elapsed_s'), 1)} s." if reference else "No reference.json: no co-tenant shares.",
             "", "## Capacity (closed loop, c=4, 12 requests, no spacing): ok requests / span", "",
             "| setting | config | co-tenant | capacity (req/s) | n ok | p95 service (s) |",
             "|---|---|---|---:|---:|---:|"]
    for _, r in capacity.iterrows():
        lines.append(f"| {r.setting} | {r.config} | {r.cotenant} | {_f(r.capacity_rps, 3)} | {r.n_ok} | "
                     f"{_f(r.p95_service_s)} |")
    lines += ["", "## Cells (open-loop Poisson)", "",
              "- rate: the cell's --rate, load x the capacity of its setting with the same co-tenant",
              "- n ok, rejected: requests by status; p95 e2e / p95 service: numpy linear p95 over the ok requests of "
              "t_end - t_submit / t_end - t_start",
              f"- goodput: ok requests meeting the SLO {slo_text} (every bound, ms) / span (first submit to last end)",
              "- co-tenant share: its mean units/s during the trial (trials[].cotenant.mean_units_per_s) / "
              "units/s alone (reference.json); — without a co-tenant or a sample of it (a trial under 1 s)",
              f"- sys > {THRESHOLD:g}: share of timeline samples (every 250 ms) with /proc/pressure/cpu some avg10 > "
              f"{THRESHOLD:g} (the paper's gate threshold), and the first t (s from the trial start) it was; cg > "
              f"{THRESHOLD:g}: the same for the service cgroup's cpu.pressure (cg_cpu_some_avg10); "
              "— never, or no samples",
              "- deferred: requests with gate_checks > 1 or gate_decision admitted_after_timeout",
              "- limit: min–max of the admission limit in the timeline (adaptive, batch_psi)",
              "- *: the cell's JSON does not say complete", "",
              f"| config | limited | co-tenant | rate (req/s) | n ok | rejected | p95 e2e (s) | p95 service (s) | "
              f"goodput (req/s) | co-tenant share | sys > {THRESHOLD:g} | first (s) | cg > {THRESHOLD:g} | first (s) | "
              f"deferred | limit |", "|---|---|---|" + "---:|" * 13]
    for _, r in summary.iterrows():
        limit = "—" if not math.isfinite(r.limit_min) else f"{r.limit_min:.0f}–{r.limit_max:.0f}"
        lines.append(
            f"| {r.config}{'' if r.complete else '*'} | {r.limited} | {r.cotenant} | {_f(r.rate_rps, 3)} | {r.n_ok} | "
            f"{r.n_rejected} | {_f(r.p95_e2e_s)} | {_f(r.p95_service_s)} | {_f(r.goodput_rps, 3)} | "
            f"{_f(r.cotenant_share, pct=True)} | {_f(r.sys_over_frac, pct=True)} | {_f(r.sys_first_cross_s, 1)} | "
            f"{_f(r.cg_over_frac, pct=True)} | {_f(r.cg_first_cross_s, 1)} | {r.deferred} | {limit} |")
    return "\n".join(lines) + "\n"


def report(d: str, slo_text=None) -> str:
    """Write d/table.md, d/summary.csv and d/cotenant.png from the files in d; return the table. Goodput is
    under slo_text; None: the SLO the cells ran with where they agree, else DEFAULT_SLO."""
    ran = {meta["config"].get("slo") for _, meta in cells_in(d)} - {None}
    slo_text = slo_text or (ran.pop() if len(ran) == 1 else DEFAULT_SLO)
    summary, capacity = summary_frame(d, arrivals.parse_slo(slo_text)), capacity_frame(d)
    if summary.empty:
        raise StepError(f"no cells in {d}")
    text = table_md(summary, capacity, read_json(os.path.join(d, "reference.json")), slo_text)
    with open(os.path.join(d, "table.md"), "w") as f:
        f.write(text)
    summary.to_csv(os.path.join(d, "summary.csv"), index=False)
    figure(summary, os.path.join(d, "cotenant.png"))
    return text
