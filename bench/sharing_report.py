"""The sharing experiment's report (bench/sharing.py, step 2), from the files of a results dir alone:
DIR/summary.csv (config, phase, metric, mean, ci_lo, ci_hi, n_trials; a 95% t-interval over trials),
DIR/timeline_<config>.png (its first trial) and DIR/frontier.png."""
from __future__ import annotations

import glob
import math
import os
import re

from llm_psi.analysis import metrics, phases, stats
from llm_psi.load import arrivals
from bench.cotenant_report import read_json  # noqa: F401  (one reader of a JSON that may be missing)

CONFIGS = ("baseline", "cgroups", "psi", "weight", "idle", "burst", "share", "share_batch")
DEFAULT_SLO = "ttft:5000,e2e:15000"
METRICS = ("capacity_alone_rps", "capacity_cotenant_rps", "cotenant_share", "probe_p99_ms", "e2e_p95_s",
           "ttft_p95_s", "goodput_rps", "react_arrive_s", "react_leave_s")
COLUMNS = ["config", "phase", "metric", "mean", "ci_lo", "ci_hi", "n_trials"]


def throughput(csv_path: str) -> float:
    """ok requests per second of a closed-loop run: metrics.summarize's throughput_rps (a trial ended by its
    --deadline-s has 'cut' rows ending at the deadline, so its span runs to it); NaN for a cell that is not
    complete or cannot be read."""
    import pandas as pd
    if not (read_json(csv_path[:-4] + ".json") or {}).get("complete"):
        return math.nan
    try:
        return float(metrics.summarize(pd.read_csv(csv_path))["throughput_rps"])
    except (OSError, ValueError, KeyError, pd.errors.EmptyDataError):
        return math.nan


def _phase_lengths(schedule) -> dict:
    """{phase: its seconds in the schedule}."""
    out = dict.fromkeys(phases.PHASES, 0.0)
    for (start, _), (_, secs) in zip(phases.boundaries(schedule), schedule):
        out[phases.phase_of(start, schedule)] += secs
    return out


def phase_rows(df, meta: dict, timeline, reference: dict, schedule, slo: dict) -> list[tuple[str, str, float]]:
    """(phase, metric, value) of one phased run: per phase the service's goodput (requests submitted in the
    phase that met the SLO / the phase's length), p95 e2e and TTFT, the co-tenant's share of its throughput
    alone and the probe's p99 delay; the controller's reaction times where its quota is in the timeline."""
    out, lengths = [], _phase_lengths(schedule)
    trial = (meta.get("trials") or [{}])[0]
    co = trial.get("cotenant") or {}
    ref_units = (reference or {}).get("units_per_s")
    per_second = co.get("per_second") or []
    for phase, rows in phases.split_rows(df, schedule).items():
        if lengths[phase] <= 0:
            continue
        d = metrics.derive(rows)
        ok = d[d["status"].astype(str) == "ok"]
        met = metrics.goodput(d, slo)["slo_met"] if len(d) else 0
        out += [(phase, "goodput_rps", met / lengths[phase]),
                (phase, "e2e_p95_s", metrics.percentile(ok["e2e_ms"], 95) / 1000),
                (phase, "ttft_p95_s", metrics.percentile(ok["ttft_ms"], 95) / 1000)]
        if phase == "with":
            rates = [r["units_per_s"] for r in per_second if r.get("units_per_s") is not None
                     and phases.phase_of(r["t_s"] - 0.5, schedule) == "with"]
            share = (sum(rates) / len(rates) / ref_units) if rates and ref_units else math.nan
            out.append((phase, "cotenant_share", share))
        p99 = ((co.get("probe_phases") or {}).get(phase) or {}).get("delay_p99_ms")
        if p99 is not None and phase == "with":
            out.append((phase, "probe_p99_ms", p99))
    if timeline is not None:
        react = phases.reaction_times(timeline, schedule)
        out += [("with", "react_arrive_s", react["react_arrive_s"]), ("after", "react_leave_s", react["react_leave_s"])]
    return out


def trial_rows(stem: str, schedule, slo: dict) -> list[tuple[str, str, float]]:
    """(phase, metric, value) of one trial: capacity, reference and phases."""
    import pandas as pd
    out = [("capacity", "capacity_alone_rps", throughput(stem + "_alone.csv")),
           ("capacity", "capacity_cotenant_rps", throughput(stem + "_cotenant.csv"))]
    reference = read_json(stem + "_reference.json") or {}
    p99 = (reference.get("probe") or {}).get("delay_p99_ms")
    out.append(("reference", "probe_p99_ms", math.nan if p99 is None else p99))
    meta = read_json(stem + "_phases.json")
    if isinstance(meta, dict) and meta.get("complete") and os.path.exists(stem + "_phases.csv"):
        tl = stem + "_phases_timeline.csv"
        timeline = pd.read_csv(tl) if os.path.exists(tl) else None
        out += phase_rows(pd.read_csv(stem + "_phases.csv"), meta, timeline, reference, schedule, slo)
    return out


def trials_in(d: str) -> list[tuple[str, int, str]]:
    """(config, trial, stem) of every trial under d/trials that has a reference."""
    out = []
    for path in sorted(glob.glob(os.path.join(d, "trials", "*_reference.json"))):
        m = re.fullmatch(r"(.+)_t(\d+)_reference\.json", os.path.basename(path))
        if m:
            out.append((m.group(1), int(m.group(2)), path[:-len("_reference.json")]))
    return out


def summary(d: str):
    """The summary frame of d (COLUMNS); empty without trials or plan.json."""
    import pandas as pd
    plan = read_json(os.path.join(d, "plan.json")) or {}
    if not plan:
        return pd.DataFrame(columns=COLUMNS)
    schedule, slo = phases.parse_schedule(plan["schedule"]), arrivals.parse_slo(plan.get("slo") or DEFAULT_SLO)
    values = {}
    for config, _, stem in trials_in(d):
        for phase, metric, value in trial_rows(stem, schedule, slo):
            values.setdefault((config, phase, metric), []).append(value)
    rows = []
    rank = {c: i for i, c in enumerate(CONFIGS)}
    order = ("capacity", "reference") + phases.PHASES
    for (config, phase, metric), vs in sorted(values.items(), key=lambda kv: (
            rank.get(kv[0][0], 99), kv[0][0], order.index(kv[0][1]), METRICS.index(kv[0][2]))):
        finite = [v for v in vs if v is not None and math.isfinite(v)]
        if not finite:
            continue
        mean, lo, hi = stats.t_interval(finite)
        rows.append(dict(config=config, phase=phase, metric=metric, mean=mean, ci_lo=lo, ci_hi=hi,
                         n_trials=len(finite)))
    return pd.DataFrame(rows, columns=COLUMNS)


def report(d: str) -> str:
    """Write summary.csv and the figures of d; return a short text table."""
    frame = summary(d)
    if frame.empty:
        return f"{d}: no finished trials to report\n"
    frame.to_csv(os.path.join(d, "summary.csv"), index=False)
    from bench.sharing_figures import figures
    figures(d, frame)
    lines = [f"{'config':<12} {'phase':<9} {'metric':<22} {'mean':>9} {'95% interval':>21} n"]
    for r in frame.itertuples():
        ci = f"[{r.ci_lo:.3g}, {r.ci_hi:.3g}]" if math.isfinite(r.ci_lo) else "-"
        lines.append(f"{r.config:<12} {r.phase:<9} {r.metric:<22} {r.mean:>9.3g} {ci:>21} {r.n_trials}")
    broken = incomplete_runs(d)
    if broken:
        lines.append(f"left out, incomplete (stopped past their deadline or interrupted): {', '.join(broken)}")
    return "\n".join(lines) + f"\nwritten: {os.path.join(d, 'summary.csv')}, timeline_<config>.png, frontier.png\n"


def incomplete_runs(d: str) -> list[str]:
    """The service runs under d/trials whose cell JSON is missing or not complete."""
    runs = glob.glob(os.path.join(d, "trials", "*.csv"))
    return sorted(os.path.basename(p)[:-4] for p in runs if not p.endswith("_timeline.csv")
                  and not (read_json(p[:-4] + ".json") or {}).get("complete"))
