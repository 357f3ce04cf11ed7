"""The paper's Table I from the cell files: p95 with bootstrap confidence intervals, beside the published values.

    python analyze_results.py [--results-dir results] [--paper paper.pdf] [--no-figures]

Reads every ``{config}_c{N}.csv`` (with its ``.json`` and ``_timeline.csv``) in the results directory and
writes there summary.csv, latency_distributions.csv, table.md and the figures; the report goes to --paper.
Every metric comes from metrics.py. Only ok requests enter latency statistics; the others are counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

import numpy as np
import pandas as pd

import metrics
from request_generator import CONFIGS

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLISHED = os.path.join(HERE, "reference", "paper_table1.csv")
LABELS = {"baseline": "baseline", "cgroups": "cgroups-only", "psi": "cgroups+PSI"}
PAPER_COLUMNS = {"baseline": "baseline_p95_ms", "cgroups": "cgroups_only_p95_ms", "psi": "cgroups_psi_p95_ms"}
PAPER_CONCURRENCY = (1, 2, 4, 8)
IDEAL_REFERENCE = ("cgroups_threads", "limit1", "cgroups")  # c=1 cells giving S, in order of preference
BOOT_RESAMPLES, BOOT_SEED = 2000, 0
NEEDED = ["trial", "request_id", "status", "output_tokens", *metrics.TIME_COLUMNS, "gate_decision", "gate_checks"]
CELL_RE = re.compile(r"^(?P<config>.+)_c(?P<concurrency>\d+)\.csv$")
RULE = ("Latency statistics use ok requests only: rejected and failed requests are left out of every "
        "percentile and mean, and their counts are shown beside the value where non-zero.")
NOTES = [f"Values: p95 in ms, pooled over trials; percentiles by numpy's default (linear) method; [a–b]: 95% "
         f"percentile-bootstrap CI of p95 ({BOOT_RESAMPLES} resamples, seed {BOOT_SEED}); — : no such cell.",
         f"† fewer than {metrics.min_samples_for(95)} ok requests (metrics.min_samples_for(95)): the p95 is an "
         f"interpolation between the few largest values.",
         "speedup = cgroups-only p95 / cgroups+PSI p95; ours/paper = our value / the published one.", RULE]
THROTTLE_KEYS = ("nr_periods", "nr_throttled", "throttled_usec")
METRIC_NAMES = {"e2e": "end-to-end latency", "service": "service time"}


class AnalysisError(Exception):
    """Bad input: reported as 'error: <file>: <problem>', exit status 2."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def label(config: str) -> str:
    return LABELS.get(config, config)


def order(configs) -> list[str]:
    """The paper's three configurations first, then request_generator.CONFIGS order, then alphabetical."""
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

    @property
    def limited(self) -> bool:
        return bool(self.meta.get("limited", CONFIGS.get(self.config, {}).get("limited", False)))


def _numeric(df: pd.DataFrame, col: str, path: str) -> pd.Series:
    v = pd.to_numeric(df[col], errors="coerce")
    if (v.isna() & df[col].notna()).any():
        raise AnalysisError(f"{path}: column {col} has non-numeric values")
    return v


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
    if meta.get("interrupted"):
        warn(f"{stem}.json: the run was interrupted; its finished requests are analysed")
    timeline = None
    if os.path.exists(stem + "_timeline.csv"):
        try:
            timeline = pd.read_csv(stem + "_timeline.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            warn(f"{stem}_timeline.csv: ignored ({str(e).strip().splitlines()[0]})")
    return Cell(config, concurrency, path, metrics.derive(df), meta, timeline)


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
        s[f"p95_{m}_ci_low_ms"], s[f"p95_{m}_ci_high_ms"] = bootstrap_ci(ok[f"{m}_ms"])
    for q in metrics.PERCENTILES:
        s[f"small_n_p{q}"] = s["n_ok"] < metrics.min_samples_for(q)
    decision = rows["gate_decision"].astype(str)
    gated = decision != "none"
    nan = float("nan")
    deferred = ((rows["defer_ms"] > 0) & (rows["gate_checks"] > 1)) | (decision != "admitted")
    s["gate_deferred_frac"] = float(deferred[gated].mean()) if gated.any() else nan
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
    """One row per config x concurrency x trial, plus the pooled row (trial = all)."""
    out = []
    for config in order({k[0] for k in cells}):
        for c in sorted(k[1] for k in cells if k[0] == config):
            cell = cells[(config, c)]
            deltas = {t.get("trial"): t.get("cgroup_delta") for t in cell.meta.get("trials", [])}
            ideal = ideal_ms if cell.limited else None
            for trial in sorted(cell.rows["trial"].unique()) + ["all"]:
                rows = cell.rows if trial == "all" else cell.rows[cell.rows["trial"] == trial]
                d = list(deltas.values()) if trial == "all" else [deltas.get(int(trial))]
                out.append({"config": config, "label": label(config), "limited": cell.limited, "concurrency": c,
                            "trial": str(trial), **group_stats(rows, d, ideal)})
    df = pd.DataFrame(out)
    first = ["config", "label", "limited", "concurrency", "trial", "n", "n_ok", "n_rejected", "n_failed",
             "p50_e2e_ms", "p95_e2e_ms", "p99_e2e_ms", "p95_e2e_ci_low_ms", "p95_e2e_ci_high_ms"]
    return df[first + [c for c in df.columns if c not in first]]


def load_published(path: str = PUBLISHED) -> pd.DataFrame:
    try:
        pub = pd.read_csv(path)
        return pub.set_index(pub["concurrency"].astype(int))[list(PAPER_COLUMNS.values())].astype(float)
    except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise AnalysisError(f"{path}: cannot read the published table ({e})")


def fmt(v: float) -> str:
    return f"{v:.1f}" if np.isfinite(v) else "—"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}" if np.isfinite(a) and np.isfinite(b) and b else "—"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table padded to fixed width (first column left-aligned, the rest right-aligned)."""
    w = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r)) + " |"
    sep = "|" + "|".join("-" * (n + 2) if i == 0 else "-" * (n + 1) + ":" for i, n in enumerate(w)) + "|"
    return [line(header), sep] + [line(r) for r in rows]


@dataclasses.dataclass
class Analysis:
    results_dir: str
    cells: dict
    summary: pd.DataFrame
    published: pd.DataFrame
    reference: str | None
    ideal_ms: float | None
    table_md: str = ""

    def __post_init__(self):
        self.configs = order({k[0] for k in self.cells})
        self.concurrencies = sorted({k[1] for k in self.cells} | set(PAPER_CONCURRENCY))
        self._rows = {(r["config"], r["concurrency"], r["trial"]): r for r in self.summary.to_dict("records")}

    def pooled(self, config: str, c: int) -> dict | None:
        return self._rows.get((config, c, "all"))

    def per_trial(self, config: str, c: int, column: str) -> list:
        return [r[column] for k, r in self._rows.items() if k[:2] == (config, c) and k[2] != "all"]

    def p95(self, config: str, c: int, metric: str = "e2e") -> float:
        r = self.pooled(config, c)
        return r[f"p95_{metric}_ms"] if r else float("nan")

    def paper(self, config: str, c: int) -> float:
        """The published p95 (ms) of a paper configuration at concurrency c (NaN if not published)."""
        return self.published.at[c, PAPER_COLUMNS[config]] if c in self.published.index else float("nan")

    def speedup(self, c: int, metric: str = "e2e") -> float:
        return self.p95("cgroups", c, metric) / self.p95("psi", c, metric)


def cell_text(r: dict | None, metric: str) -> str:
    if r is None:
        return "—"
    lo, hi = r[f"p95_{metric}_ci_low_ms"], r[f"p95_{metric}_ci_high_ms"]
    txt = fmt(r[f"p95_{metric}_ms"]) + (f" [{fmt(lo)}–{fmt(hi)}]" if np.isfinite(lo) else "")
    txt += "†" if r["small_n_p95"] and r["n_ok"] else ""
    extra = ", ".join(f"{r[f'n_{s}']} {s}" for s in ("rejected", "failed") if r[f"n_{s}"])
    return txt + (f" ({extra})" if extra else "")


def table_one(an: Analysis, metric: str) -> list[str]:
    """Our Table I (paper columns, speedup, further configurations) and the published one beside it."""
    ours = md_table(["c"] + [label(k) for k in LABELS] + ["speedup"],
                    [[str(c)] + [cell_text(an.pooled(k, c), metric) for k in LABELS]
                     + [ratio(an.p95("cgroups", c, metric), an.p95("psi", c, metric))] for c in an.concurrencies])
    further = [k for k in an.configs if k not in LABELS]
    for i in range(0, len(further), 4):  # further configurations, at most four per table
        ours += ["", "Further configurations:", ""] if i == 0 else [""]
        ours += md_table(["c"] + further[i:i + 4], [[str(c)] + [cell_text(an.pooled(k, c), metric)
                                                             for k in further[i:i + 4]] for c in an.concurrencies])
    beside = []
    for c in an.concurrencies:
        row = [str(c)]
        for k in LABELS:
            row += [fmt(an.p95(k, c, metric)), fmt(an.paper(k, c)), ratio(an.p95(k, c, metric), an.paper(k, c))]
        beside.append(row + [ratio(an.p95("cgroups", c, metric), an.p95("psi", c, metric)),
                             ratio(an.paper("cgroups", c), an.paper("psi", c))])
    header = ["c"] + sum(([f"{label(k)} ours", "paper", "ours/paper"] for k in LABELS), []) + ["speedup ours", "paper"]
    return ours + ["", f"Beside the published Table I (the paper's values are labelled end-to-end; ours here are "
                       f"{METRIC_NAMES[metric]}):", ""] + md_table(header, beside)


def render(an: Analysis) -> str:
    s = an.summary[an.summary["trial"] == "all"]
    lines = ["# Table I, reproduced", "", *NOTES, "",
             "## p95 end-to-end latency (ms): submission to last token, what the paper says it reports", "",
             *table_one(an, "e2e"), "",
             "## p95 service time (ms): generation start to last token, what the original artifact logged", "",
             *table_one(an, "service"), "", "## Every cell, pooled over trials (ms)", ""]
    detail = [[r.label, str(r.concurrency), str(r.n_ok), str(r.n_rejected), str(r.n_failed), fmt(r.p50_e2e_ms),
               fmt(r.p95_e2e_ms) + ("†" if r.small_n_p95 and r.n_ok else ""), fmt(r.p99_e2e_ms), fmt(r.mean_e2e_ms),
               fmt(r.p95_service_ms), fmt(r.p95_ttft_ms), fmt(r.p95_tpot_ms), fmt(r.p95_queue_ms), fmt(r.p95_defer_ms),
               " / ".join(map(fmt, an.per_trial(r.config, r.concurrency, "p95_e2e_ms")))] for r in s.itertuples()]
    lines += md_table(["config", "c", "ok", "rejected", "failed", "p50 e2e", "p95 e2e", "p99 e2e", "mean e2e",
                       "p95 service", "p95 ttft", "p95 tpot", "p95 queue", "p95 defer", "p95 e2e per trial"], detail)
    lines += ["", "## Against the ideal one-at-a-time FIFO server", ""]
    lim = s[s["limited"]]
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
    gate = s[s["limited"] | s["gate_mean_checks"].notna()]
    pct = lambda v: f"{100 * v:.0f}%" if np.isfinite(v) else "—"
    num = lambda v: f"{v:.0f}" if np.isfinite(v) else "—"
    lines += md_table(["config", "c", "deferred", "mean checks", "timeouts", "rejected", "nr_throttled",
                       "throttled share"],
                      [[r.label, str(r.concurrency), pct(r.gate_deferred_frac),
                        f"{r.gate_mean_checks:.2f}" if np.isfinite(r.gate_mean_checks) else "—", str(r.gate_timeouts),
                        str(r.n_rejected), num(r.nr_throttled), pct(r.throttled_share)] for r in gate.itertuples()]
                      ) if len(gate) else ["— (no limited or gated cells)"]
    return "\n".join(lines) + "\n"


def analyze(results_dir: str) -> Analysis:
    cells = load_cells(results_dir)
    reference, ideal_ms = ideal_reference(cells)
    an = Analysis(results_dir, cells, summarize_cells(cells, ideal_ms), load_published(), reference, ideal_ms)
    missing = [f"{k}_c{c}" for c in an.concurrencies for k in order(set(LABELS) | {k[0] for k in cells})
               if (k, c) not in cells]
    if missing:
        warn(f"missing cells, shown as —: {', '.join(missing)}")
    if any(c.limited for c in cells.values()) and reference is None:
        warn("no reference cell for the ideal (" + ", ".join(f"{c}_c1" for c in IDEAL_REFERENCE) + "): shown as —")
    an.table_md = render(an)
    return an


def write_outputs(an: Analysis) -> None:
    d = an.results_dir
    an.summary.to_csv(os.path.join(d, "summary.csv"), index=False)
    keys = ["config", "concurrency", "trial", "request_id", "status"]
    long = pd.concat([cell.rows.assign(config=cell.config, concurrency=cell.concurrency)[keys + metrics.METRICS]
                      .melt(id_vars=keys, var_name="metric", value_name="value_ms") for cell in an.cells.values()])
    long.to_csv(os.path.join(d, "latency_distributions.csv"), index=False)
    with open(os.path.join(d, "table.md"), "w", encoding="utf-8") as f:
        f.write(an.table_md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the paper's Table I (with CIs) beside the published one.")
    p.add_argument("--results-dir", default="results", help="directory of the cell files (default: results)")
    p.add_argument("--paper", default="paper.pdf", help="report PDF path (default: paper.pdf)")
    p.add_argument("--no-figures", action="store_true", help="tables and CSVs only: no PNGs, no PDF")
    a = p.parse_args(argv)
    try:
        an = analyze(a.results_dir)
        write_outputs(an)
        print(an.table_md, end="")
        if not a.no_figures:
            import report
            figures = report.write_figures(an)
            report.write_paper(an, figures, a.paper)
            print(f"wrote {', '.join(map(os.path.basename, figures))} in {a.results_dir}; {a.paper}", file=sys.stderr)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
