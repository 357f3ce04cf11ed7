"""The paper's Table I from the cell files, with intervals over trials, beside the published values and the
paper's own raw files.

    python analyze_results.py [--results-dir results] [--paper PDF] [--no-figures] [--include-incomplete]

Reads every ``{config}_c{N}.csv`` (with its ``.json`` and ``_timeline.csv``) in the results directory and
writes there summary.csv, latency_distributions.csv, speedups.csv, table.md and the figures; the report goes
beside them (``<results-dir>/paper.pdf``; for this repository's own results/ the root paper.pdf), or to --paper.
Every metric comes from metrics.py. Only ok requests enter latency statistics; the others are counted.
A cell is complete when its JSON says so and it holds every planned request; an incomplete cell is warned
about and left out of every table and figure but summary.csv, unless --include-incomplete.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from itertools import product

import numpy as np
import pandas as pd

from llm_psi.analysis import artifact
from llm_psi.analysis import metrics
from llm_psi.analysis import report
from llm_psi.analysis.report import md_table
from llm_psi.config import CONFIGS
from llm_psi.analysis.stats import EXACT_P_MAX, drift, interleaving, t_interval, trial_ratio
from llm_psi import REPO

HERE = REPO  # the repository root: the root scripts, reference/, results/
PUBLISHED = os.path.join(HERE, "reference", "paper_table1.csv")
LABELS = {"baseline": "baseline", "cgroups": "cgroups-only", "psi": "cgroups+PSI"}
PAPER_COLUMNS = {"baseline": "baseline_p95_ms", "cgroups": "cgroups_only_p95_ms", "psi": "cgroups_psi_p95_ms"}
PAPER_CONCURRENCY = (1, 2, 4, 8)
IDEAL_REFERENCE = ("cgroups_threads", "limit1", "cgroups")  # c=1 cells giving S, in order of preference
# (config, reference): the ratios written to speedups.csv, each where both cells have >= 2 trials
PAIRS = [("cgroups", "baseline"), ("psi", "cgroups"), ("limit1", "cgroups"), ("cgroups_threads", "cgroups"),
         ("psi_threads", "cgroups_threads"), ("limit1", "cgroups_threads"), ("adaptive", "cgroups_threads"),
         ("batch", "cgroups_threads"), ("batch_psi", "batch")]
SPEEDUP_COLUMNS = ["config", "reference_config", "concurrency", "metric", "ratio", "ci_lo", "ci_hi", "n_trials"]
BOOT_RESAMPLES, BOOT_SEED = 2000, 0
NEEDED = ["trial", "request_id", "status", "output_tokens", *metrics.TIME_COLUMNS, "gate_decision", "gate_checks"]
CELL_RE = re.compile(r"^(?P<config>.+)_c(?P<concurrency>\d+)\.csv$")
RULE = ("Latency statistics use ok requests only: rejected and failed requests are left out of every "
        "percentile and mean, and their counts are shown beside the value where non-zero.")
NOTES = ["Values: the mean over trials of each trial's p95 in ms (the paper's value is one trial's p95); "
         "[a–b]: 95% t-interval of that mean over trials (none with one trial); percentiles by numpy's default "
         "(linear) method; — : no such cell, or an incomplete one left out.",
         f"† a trial of the cell has fewer than {metrics.min_samples_for(95)} ok requests "
         "(metrics.min_samples_for(95)): its p95 is an interpolation between its few largest values.",
         "speedup = cgroups-only p95 / cgroups+PSI p95, a ratio of geometric means of per-trial p95 with a Welch "
         "interval (see the ratios below); ours/paper = our value / the published one.",
         f"summary.csv also gives each cell's pooled p95 with a percentile bootstrap over its requests "
         f"(p95_*_iid_boot_*; {BOOT_RESAMPLES} resamples, seed {BOOT_SEED}): it treats requests as independent, "
         "ignores how trials differ, and is too narrow.", RULE]
THROTTLE_KEYS = ("nr_periods", "nr_throttled", "throttled_usec")
METRIC_NAMES = {"e2e": "end-to-end latency", "service": "service time"}


class AnalysisError(Exception):
    """Bad input: reported as 'error: <file>: <problem>', exit status 2."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def label(config: str) -> str:
    return LABELS.get(config, config)


def order(configs) -> list[str]:
    """The paper's three configurations first, then configs.CONFIGS order, then alphabetical."""
    known = list(LABELS) + [c for c in CONFIGS if c not in LABELS]
    return [c for c in known if c in configs] + sorted(c for c in configs if c not in known)


@dataclasses.dataclass
class Cell:
    config: str
    concurrency: int
    path: str
    rows: pd.DataFrame          # the CSV with the derived *_ms columns recomputed by metrics.derive
    meta: dict
    timeline: pd.DataFrame | None
    runs: pd.DataFrame          # per trial of the JSON: trial, run_index (NaN if absent), started_at (NaT if absent)

    @property
    def limited(self) -> bool:
        return bool(self.meta.get("limited", CONFIGS.get(self.config, {}).get("limited", False)))

    @property
    def quota_us(self):
        return ((self.meta.get("cgroup") or {}).get("limits") or {}).get("cpu_quota_us")

    @property
    def complete(self) -> bool:
        """The JSON's complete flag (old JSONs: not interrupted) and every planned request written."""
        run = self.meta.get("config") or {}
        flag = self.meta["complete"] if "complete" in self.meta else not self.meta.get("interrupted", False)
        try:
            planned = int(run["num_requests"]) * int(self.meta.get("trials_planned", run.get("trials")))
        except (KeyError, TypeError, ValueError):
            return False
        return bool(flag) and len(self.rows) == planned

    @property
    def limits_match(self) -> bool:
        """A limited cell ran under a CPU quota, an unlimited one without."""
        return self.limited == bool(self.quota_us)


def _numeric(df: pd.DataFrame, col: str, path: str) -> pd.Series:
    v = pd.to_numeric(df[col], errors="coerce")
    if (v.isna() & df[col].notna()).any():
        raise AnalysisError(f"{path}: column {col} has non-numeric values")
    return v


def trial_runs(meta: dict, path: str) -> pd.DataFrame:
    """Where each trial of the JSON stands in the sweep: trial, run_index, started_at (UTC)."""
    out = []
    for t in meta.get("trials") or []:
        try:
            started = pd.to_datetime(t.get("started_at"), utc=True)
        except (ValueError, TypeError):
            raise AnalysisError(f"{path}: trial {t.get('trial')}: started_at is not an ISO-8601 time")
        index = t.get("run_index")
        if index is not None and not isinstance(index, int):
            raise AnalysisError(f"{path}: trial {t.get('trial')}: run_index must be an integer or null")
        out.append({"trial": t.get("trial"), "run_index": np.nan if index is None else index, "started_at": started})
    return pd.DataFrame(out, columns=["trial", "run_index", "started_at"])


def read_cell(path: str, config: str, concurrency: int) -> Cell:
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise AnalysisError(f"{path}: empty file")
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise AnalysisError(f"{path}: cannot parse CSV ({str(e).strip().splitlines()[0]})")
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise AnalysisError(f"{path}: missing columns {', '.join(missing)}")
    if df.empty:
        raise AnalysisError(f"{path}: no rows")
    unknown = sorted(set(df["status"].astype(str)) - set(metrics.STATUSES))
    if unknown:
        raise AnalysisError(f"{path}: unknown status {unknown[0]!r}")
    trial = _numeric(df, "trial", path)
    if trial.isna().any() or (trial % 1 != 0).any() or (trial < 1).any():
        raise AnalysisError(f"{path}: trial must be a positive integer in every row")
    df["trial"] = trial.astype(int)
    for col in metrics.TIME_COLUMNS + ["gate_checks", "output_tokens"]:
        df[col] = _numeric(df, col, path)
    ok = df["status"] == "ok"
    if df["t_submit_s"].isna().any() or df.loc[ok, ["t_start_s", "t_end_s"]].isna().any(axis=None):
        raise AnalysisError(f"{path}: a request lacks t_submit_s, or an ok request lacks t_start_s/t_end_s")
    stem = path[:-len(".csv")]
    meta = {}
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
    except FileNotFoundError:
        warn(f"{stem}.json: missing; configuration presets assumed")
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{stem}.json: cannot parse JSON ({e})")
    if not isinstance(meta, dict):
        raise AnalysisError(f"{stem}.json: not a JSON object")
    timeline = None
    if os.path.exists(stem + "_timeline.csv"):
        try:
            timeline = pd.read_csv(stem + "_timeline.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            warn(f"{stem}_timeline.csv: ignored ({str(e).strip().splitlines()[0]})")
    cell = Cell(config, concurrency, path, metrics.derive(df), meta, timeline, trial_runs(meta, stem + ".json"))
    if not cell.complete:
        warn(f"{path}: incomplete cell ({len(df)} rows; the JSON does not record every planned request as written"
             f"{', the run was interrupted' if meta.get('interrupted') else ''}); left out of Table I")
    if not cell.limits_match:
        warn(f"{stem}.json: labelled {'limited' if cell.limited else 'unlimited'} but its cgroup limits read back "
             + (f"a CPU quota of {cell.quota_us} us" if cell.quota_us else "no CPU quota"))
    return cell


def load_cells(results_dir: str) -> dict[tuple[str, int], Cell]:
    if not os.path.isdir(results_dir):
        raise AnalysisError(f"{results_dir}: no such directory")
    found = [(m, n) for n in sorted(os.listdir(results_dir)) if (m := CELL_RE.match(n))]
    if not found:
        raise AnalysisError(f"{results_dir}: no cell files ({{config}}_c{{N}}.csv)")
    return {(m["config"], int(m["concurrency"])): read_cell(os.path.join(results_dir, n), m["config"],
                                                            int(m["concurrency"])) for m, n in found}


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


def load_published(path: str = PUBLISHED) -> pd.DataFrame:
    try:
        pub = pd.read_csv(path)
        return pub.set_index(pub["concurrency"].astype(int))[list(PAPER_COLUMNS.values())].astype(float)
    except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise AnalysisError(f"{path}: cannot read the published table ({e})")


def fmt(v: float) -> str:
    return f"{v:.1f}" if np.isfinite(v) else "—"


def g3(v: float) -> str:
    return f"{v:.3g}" if np.isfinite(v) else "—"


def ratio(a: float, b: float) -> str:
    return g3(a / b) if b else "—"


def interval(v: float, lo: float, hi: float, show=lambda x: f"{x:.2f}") -> str:
    """'v [lo–hi]', 'v' without an interval, '—' without a value."""
    return "—" if not np.isfinite(v) else show(v) + (f" [{show(lo)}–{show(hi)}]" if np.isfinite(lo) else "")


@dataclasses.dataclass
class Analysis:
    results_dir: str
    cells: dict
    summary: pd.DataFrame
    published: pd.DataFrame
    reference: str | None
    ideal_ms: float | None
    include_incomplete: bool = False
    artifact: pd.DataFrame | None = None        # the paper's per-request rows (artifact.load)
    artifact_files: pd.DataFrame | None = None  # one row per artifact file, in recording order (artifact.files)
    collapse: pd.DataFrame | None = None        # collapse.csv's slowdowns (artifact.collapse_slowdowns), or None
    speedups: pd.DataFrame | None = None        # speedups.csv (speedup_table)
    table_md: str = ""
    modes: pd.DataFrame | None = None           # modes.csv: in-process vs service mode (mode_table), or None

    def __post_init__(self):
        self.configs = order({k[0] for k in self.cells})
        self.palette = order(set(LABELS) | set(self.configs))  # colour i: the i-th of these
        self.paper_columns = PAPER_COLUMNS
        self.concurrencies = sorted({k[1] for k in self.cells} | set(PAPER_CONCURRENCY))
        self.used = {k for k, cell in self.cells.items() if cell.complete or self.include_incomplete}
        self.drift = {k: drift(cell.runs, cell.rows) for k, cell in self.cells.items()}
        self.interleave = interleaving((cell.config, cell.runs) for _, cell in sorted(self.cells.items()))
        self._rows = {(r["config"], r["concurrency"], r["trial"]): r for r in self.summary.to_dict("records")
                      if (r["config"], r["concurrency"]) in self.used}

    @staticmethod
    def label(config: str) -> str:
        return label(config)

    def used_summary(self) -> pd.DataFrame:
        """The pooled summary rows (trial = all) of the cells in use."""
        s = self.summary[self.summary["trial"] == "all"]
        return s[[(k, c) in self.used for k, c in zip(s["config"], s["concurrency"])]]

    def pooled(self, config: str, c: int) -> dict | None:
        """The pooled summary row of a cell in use (None if absent, or incomplete and left out)."""
        return self._rows.get((config, c, "all"))

    def per_trial(self, config: str, c: int, column: str) -> list:
        """A column's finite values over the trials of a cell in use."""
        return [r[column] for k, r in self._rows.items() if k[:2] == (config, c) and k[2] != "all"
                and pd.notna(r[column])]

    def p95(self, config: str, c: int, metric: str = "e2e") -> float:
        """The mean over trials of the per-trial p95 (ms)."""
        r = self.pooled(config, c)
        return r[f"p95_{metric}_trial_mean_ms"] if r else float("nan")

    def ratio(self, config: str, reference: str, c: int, metric: str = "e2e") -> tuple[float, float, float]:
        """config's p95 / reference's p95 at c (trial_ratio): ratio, interval low, interval high."""
        return trial_ratio(self.per_trial(config, c, f"p95_{metric}_ms"),
                           self.per_trial(reference, c, f"p95_{metric}_ms"))

    def paper(self, config: str, c: int) -> float:
        """The published p95 (ms) of a paper configuration at concurrency c (NaN if not published)."""
        return self.published.at[c, PAPER_COLUMNS[config]] if c in self.published.index else float("nan")

    def service_s(self, config: str, c: int | None) -> np.ndarray:
        """Ok service times (s) of a cell in use, or of every level of the config when c is None."""
        rows = [self.cells[k].rows for k in sorted(self.used) if k[0] == config and (c is None or k[1] == c)]
        return np.concatenate([np.array([])] + [r.loc[r["status"] == "ok", "service_ms"].to_numpy(float) / 1000
                                                for r in rows])


def speedup_table(an: Analysis) -> pd.DataFrame:
    """speedups.csv: the ratio of each PAIRS at every concurrency where both cells have >= 2 trials."""
    out = []
    for (config, reference), c, m in product(PAIRS, an.concurrencies, METRIC_NAMES):
        n = min(len(an.per_trial(config, c, f"p95_{m}_ms")), len(an.per_trial(reference, c, f"p95_{m}_ms")))
        if n >= 2:
            out.append([config, reference, c, m, *an.ratio(config, reference, c, m), n])
    return pd.DataFrame(out, columns=SPEEDUP_COLUMNS)


def cell_text(an: Analysis, config: str, c: int, metric: str) -> str:
    r = an.pooled(config, c)
    if r is None:
        return "—"
    txt = interval(*(r[f"p95_{metric}_trial_{k}_ms"] for k in ("mean", "ci_low", "ci_high")), show=fmt)
    txt += "†" if any(an.per_trial(config, c, "small_n_p95")) else ""
    extra = ", ".join(f"{r[f'n_{s}']} {s}" for s in ("rejected", "failed") if r[f"n_{s}"])
    return txt + (f" ({extra})" if extra else "")


def table_one(an: Analysis, metric: str) -> list[str]:
    """Our Table I (paper columns, speedup, further configurations) and the published one beside it."""
    speedup = lambda c: interval(*an.ratio("cgroups", "psi", c, metric))
    ours = md_table(["c"] + [label(k) for k in LABELS] + ["speedup"],
                    [[str(c)] + [cell_text(an, k, c, metric) for k in LABELS] + [speedup(c)] for c in an.concurrencies])
    further = [k for k in an.configs if k not in LABELS]
    for i in range(0, len(further), 4):  # further configurations, at most four per table
        ours += ["", "Further configurations:", ""] if i == 0 else [""]
        ours += md_table(["c"] + further[i:i + 4], [[str(c)] + [cell_text(an, k, c, metric) for k in further[i:i + 4]]
                                                    for c in an.concurrencies])
    beside = []
    for c in an.concurrencies:
        row = [str(c)]
        for k in LABELS:
            row += [fmt(an.p95(k, c, metric)), fmt(an.paper(k, c)), ratio(an.p95(k, c, metric), an.paper(k, c))]
        beside.append(row + [g3(an.ratio("cgroups", "psi", c, metric)[0]),
                             ratio(an.paper("cgroups", c), an.paper("psi", c))])
    header = ["c"] + sum(([f"{label(k)} ours", "paper", "ours/paper"] for k in LABELS), []) + ["speedup ours", "paper"]
    return ours + ["", f"Beside the published Table I (the paper labels its values end-to-end; its raw files hold "
                       f"service times; ours here are {METRIC_NAMES[metric]}):", ""] + md_table(header, beside)


def ratio_lines(an: Analysis) -> list[str]:
    lines = ["## Ratios between configurations: p95 over the reference's, with 95% intervals over trials", "",
             "ratio = geometric mean of the configuration's per-trial p95 / that of the reference; interval: Welch "
             "t-interval (Welch–Satterthwaite df) on the difference of the mean log per-trial p95, exponentiated; "
             "n = the smaller trial count. Only cells with at least 2 trials each; also in speedups.csv.", ""]
    if an.speedups.empty:
        return lines + ["— (no pair of cells with at least 2 trials each)"]
    verdict = lambda r: ("yes, higher" if r.ci_lo > 1 else "yes, lower" if r.ci_hi < 1 else "no")
    return lines + md_table(["config", "reference", "c", "metric", "ratio [95% interval]", "n", "differs from 1"],
                            [[label(r.config), label(r.reference_config), str(r.concurrency), r.metric,
                              interval(r.ratio, r.ci_lo, r.ci_hi), str(r.n_trials), verdict(r)]
                             for r in an.speedups.itertuples()])


def drift_lines(an: Analysis) -> list[str]:
    lines = ["## Drift over the run order", "",
             "Per cell: each trial's median ok service time against its place in the sweep (run_index, else "
             f"started_at); Spearman's rho and two-sided p (exact permutation p up to {EXACT_P_MAX} trials, "
             "scipy.stats.spearmanr's above); slope: least squares, in % of the cell's mean per trial position. "
             "drift: p < 0.05.", ""]
    if all(d["status"] == "no run order recorded" for d in an.drift.values()):
        lines += ["No cell records its trials' run order (run_index or started_at): no run order recorded, drift "
                  "not measured."]
    else:
        rows = []
        for config in an.configs:
            for c in sorted(k[1] for k in an.cells if k[0] == config):
                d = an.drift[(config, c)]
                test = [f"{d['rho']:.2f}", f"{d['p']:.3g}", f"{d['slope_pct']:+.1f}"] if "rho" in d else ["—"] * 3
                rows.append([label(config), str(c), str(d.get("n", "—")), *test, d["status"]])
        lines += md_table(["config", "c", "trials", "rho", "p", "slope %/trial", "drift"], rows)
    mixed = an.interleave
    return lines + ["", "Interleaving: " + (
        f"{mixed[0]} of {mixed[1]} consecutive trials (all cells, by started_at) switch configuration "
        f"({100 * mixed[0] / mixed[1]:.0f}%)." if mixed else "no trial start times recorded.")]


def render(an: Analysis) -> str:
    s, used = an.summary[an.summary["trial"] == "all"], an.used_summary()
    lines = ["# Table I, reproduced", "", *NOTES, "",
             "## p95 end-to-end latency (ms): submission to last token, what the paper says it reports", "",
             *table_one(an, "e2e"), "",
             "## p95 service time (ms): generation start to last token, what the paper's raw files hold", "",
             *table_one(an, "service"), "", *ratio_lines(an), "",
             *artifact.section(an.artifact, an.artifact_files, an.service_s, an.collapse,
                               os.path.join(an.results_dir, "collapse.csv")), "",
             *drift_lines(an), "", "## Every cell, pooled over trials (ms)", "",
             "check: incomplete (left out of the other tables unless --include-incomplete) or limits ≠ label (the "
             "cgroup limits read back do not match the cell's limited label).", ""]
    check = lambda r: ", ".join([w for w, bad in (("incomplete", not r.complete),
                                                  ("limits ≠ label", not r.limits_match)) if bad]) or "ok"
    detail = [[r.label, str(r.concurrency), check(r), str(r.n_ok), str(r.n_rejected), str(r.n_failed),
               fmt(r.p50_e2e_ms), fmt(r.p95_e2e_ms) + ("†" if r.small_n_p95 and r.n_ok else ""), fmt(r.p99_e2e_ms),
               fmt(r.mean_e2e_ms), fmt(r.p95_service_ms), fmt(r.p95_ttft_ms), fmt(r.p95_tpot_ms), fmt(r.p95_queue_ms),
               fmt(r.p95_defer_ms)] for r in s.itertuples()]
    lines += md_table(["config", "c", "check", "ok", "rejected", "failed", "p50 e2e", "p95 e2e", "p99 e2e", "mean e2e",
                       "p95 service", "p95 ttft", "p95 tpot", "p95 queue", "p95 defer"], detail)
    lines += ["", "## p95 per trial (ms), and their mean with a 95% t-interval over trials", ""]
    per_trial = lambda r, m: " / ".join(map(fmt, an.per_trial(r.config, r.concurrency, f"p95_{m}_ms")))
    mean = lambda r, m: interval(*(getattr(r, f"p95_{m}_trial_{k}_ms") for k in ("mean", "ci_low", "ci_high")),
                                 show=fmt)
    lines += md_table(["config", "c", "e2e per trial", "e2e mean [95%]", "service per trial", "service mean [95%]"],
                      [[r.label, str(r.concurrency), per_trial(r, "e2e"), mean(r, "e2e"), per_trial(r, "service"),
                        mean(r, "service")] for r in used.itertuples()])
    lines += ["", "## Against the ideal one-at-a-time FIFO server", ""]
    lim = used[used["limited"]]
    if an.reference is None or lim.empty:
        lines += ["— (no limited cells, or no reference cell " + ", ".join(f"{c}_c1" for c in IDEAL_REFERENCE) + ")"]
    else:
        lines += [f"S = {fmt(an.ideal_ms)} ms: the median ok service time of {an.reference}. Ideal end-to-end: each "
                  "trial's real submission times served one at a time in FIFO order, S each (metrics.ideal_fifo).", ""]
        lines += md_table(["config", "c", "p95 service", "÷ S", "p95 e2e", "ideal p95 e2e", "÷ ideal",
                           "÷ ideal per trial"],
                          [[r.label, str(r.concurrency), fmt(r.p95_service_ms),
                            ratio(r.p95_service_ms, r.ideal_service_ms), fmt(r.p95_e2e_ms), fmt(r.ideal_p95_e2e_ms),
                            ratio(r.p95_e2e_ms, r.ideal_p95_e2e_ms),
                            " / ".join(f"{v:.2f}" for v in an.per_trial(r.config, r.concurrency, "e2e_vs_ideal"))]
                           for r in lim.itertuples()])
    lines += ["", "## PSI gate and CPU throttling (pooled over trials)", "",
              "deferred: share of gated requests held (defer_ms > 0 with more than one check) or not plainly admitted; "
              "throttled share: nr_throttled / nr_periods of the cell's cgroup.", ""]
    gate = used[used["limited"] | used["gate_mean_checks"].notna()]
    pct = lambda v: f"{100 * v:.0f}%" if np.isfinite(v) else "—"
    num = lambda v: f"{v:.0f}" if np.isfinite(v) else "—"
    lines += md_table(["config", "c", "deferred", "mean checks", "timeouts", "rejected", "nr_throttled",
                       "throttled share"],
                      [[r.label, str(r.concurrency), pct(r.gate_deferred_frac),
                        f"{r.gate_mean_checks:.2f}" if np.isfinite(r.gate_mean_checks) else "—", str(r.gate_timeouts),
                        str(r.n_rejected), num(r.nr_throttled), pct(r.throttled_share)] for r in gate.itertuples()]
                      ) if len(gate) else ["— (no limited or gated cells)"]
    return "\n".join(lines) + "\n"


def mode_table(an: Analysis, service_dir: str) -> tuple[pd.DataFrame, list[str]]:
    """In-process cells (an) beside the service-mode cells of ``service_dir`` (llm_server.py serve in the cell's
    cgroup, the generator outside it): p95 end-to-end and service, the mean of the per-trial p95s in each mode,
    and service / in-process. Returns (tidy rows, markdown lines)."""
    svc = summarize_cells(load_cells(service_dir), None)
    svc = svc[svc["trial"] == "all"].set_index(["config", "concurrency"])
    rows = []
    for r in an.used_summary().itertuples():
        if (r.config, r.concurrency) not in svc.index:
            continue
        o = svc.loc[(r.config, r.concurrency)]
        for metric in ("e2e", "service"):
            a, b = getattr(r, f"p95_{metric}_trial_mean_ms"), o[f"p95_{metric}_trial_mean_ms"]
            rows.append(dict(config=r.config, concurrency=r.concurrency, metric=metric,
                             in_process_trials=int(r.n_trials), service_trials=int(o["n_trials"]),
                             in_process_p95_ms=a, service_p95_ms=b, service_over_in_process=b / a))
    df = pd.DataFrame(rows)
    lines = [f"## In-process vs service mode ({service_dir})", "",
             "Service mode: `llm_server.py serve` alone in the cell's cgroup, the generator outside it sending HTTP "
             "and timing at the client. p95 (s): the mean of the per-trial p95s of each mode (trials in brackets).", ""]
    if df.empty:
        return df, lines + ["— (no cell in both modes)"]
    body = []
    for (config, metric), g in df.groupby(["config", "metric"], sort=False):
        for mode, col, n in (("in-process", "in_process_p95_ms", "in_process_trials"),
                             ("service", "service_p95_ms", "service_trials")):
            body.append([label(config), metric, mode] + [f"{v / 1000:.2f} ({k})" for v, k in zip(g[col], g[n])])
        body.append([label(config), metric, "service ÷ in-process"] + [f"{v:.2f}" for v in g["service_over_in_process"]])
    levels = sorted(df["concurrency"].unique())
    # one column per level, in the order of the first config's levels
    return df, lines + md_table(["config", "p95 of", "mode"] + [f"c={c}" for c in levels], body)


def analyze(results_dir: str, include_incomplete: bool = False, service_dir: str | None = None) -> Analysis:
    cells = load_cells(results_dir)
    used = {k: cell for k, cell in cells.items() if cell.complete or include_incomplete}
    reference, ideal_ms = ideal_reference(used)
    published = load_published()
    art = artifact.load()
    paper = {(k, c): published.at[c, col] for k, col in PAPER_COLUMNS.items() for c in published.index}
    collapse = artifact.load_collapse(os.path.join(results_dir, "collapse.csv"))
    an = Analysis(results_dir, cells, summarize_cells(cells, ideal_ms), published, reference, ideal_ms,
                  include_incomplete, art, artifact.files(art, paper),
                  None if collapse is None else artifact.collapse_slowdowns(collapse))
    missing = [f"{k}_c{c}" for c in an.concurrencies for k in order(set(LABELS) | {k[0] for k in cells})
               if (k, c) not in cells]
    if missing:
        warn(f"missing cells, shown as —: {', '.join(missing)}")
    if any(c.limited for c in used.values()) and reference is None:
        warn("no reference cell for the ideal (" + ", ".join(f"{c}_c1" for c in IDEAL_REFERENCE) + "): shown as —")
    an.speedups = speedup_table(an)
    an.table_md = render(an)
    an.modes = None
    service_dir = service_dir or os.path.join(results_dir, "service")
    if os.path.isdir(service_dir) and any(CELL_RE.match(n) for n in os.listdir(service_dir)):
        an.modes, lines = mode_table(an, service_dir)
        an.table_md += "\n" + "\n".join(lines) + "\n"
    return an


def write_outputs(an: Analysis) -> None:
    d = an.results_dir
    if an.modes is not None:
        an.modes.to_csv(os.path.join(d, "modes.csv"), index=False)
    an.summary.to_csv(os.path.join(d, "summary.csv"), index=False)
    an.speedups.to_csv(os.path.join(d, "speedups.csv"), index=False)
    keys = ["config", "concurrency", "trial", "request_id", "status"]
    long = pd.concat([cell.rows.assign(config=cell.config, concurrency=cell.concurrency)[keys + metrics.METRICS]
                      .melt(id_vars=keys, var_name="metric", value_name="value_ms") for cell in an.cells.values()])
    long.to_csv(os.path.join(d, "latency_distributions.csv"), index=False)
    with open(os.path.join(d, "table.md"), "w", encoding="utf-8") as f:
        f.write(an.table_md)


def default_paper(results_dir: str) -> str:
    """The report goes beside the results it was made from; this repository's results/ keeps the root paper.pdf."""
    if os.path.realpath(results_dir) == os.path.realpath(os.path.join(HERE, "results")):
        return os.path.join(HERE, "paper.pdf")
    return os.path.join(results_dir, "paper.pdf")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the paper's Table I (with intervals) beside the published one.")
    p.add_argument("--results-dir", default="results", help="directory of the cell files (default: results)")
    p.add_argument("--paper", default=None, help="report PDF path (default: paper.pdf in the results directory; "
                                                 "for this repository's results/, the root paper.pdf)")
    p.add_argument("--no-figures", action="store_true", help="tables and CSVs only: no PNGs, no PDF")
    p.add_argument("--include-incomplete", action="store_true",
                   help="keep incomplete cells in Table I and the other tables (they are warned about either way)")
    p.add_argument("--service-dir", default=None,
                   help="service-mode cells to set beside the in-process ones (default: <results-dir>/service, "
                        "where it exists)")
    a = p.parse_args(argv)
    try:
        an = analyze(a.results_dir, a.include_incomplete, a.service_dir)
        write_outputs(an)
        print(an.table_md, end="")
        if not a.no_figures:
            paper = a.paper or default_paper(a.results_dir)
            figures = report.write_figures(an)
            report.write_paper(an, figures, paper)
            if not any(name.startswith("timeline_c") for name in map(os.path.basename, figures)):
                warn(f"no timeline files at concurrency {report.focus(an)}: no timeline figure")
            print(f"wrote {', '.join(map(os.path.basename, figures))} in {a.results_dir}; {paper}", file=sys.stderr)
    except (AnalysisError, artifact.ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0
