"""table.md and its data: Table I beside the published values, the speedup ratios (speedups.csv), the
drift checks, the per-cell tables and the in-process vs service-mode table (modes.csv)."""
from __future__ import annotations

import os
from itertools import product

import numpy as np
import pandas as pd

from llm_psi.analysis import artifact
from llm_psi.analysis import metrics
from llm_psi.analysis.cells import LABELS, label, load_cells
from llm_psi.analysis.markdown import fmt, g3, interval, md_table, ratio
from llm_psi.analysis.stats import EXACT_P_MAX
from llm_psi.analysis.summary import BOOT_RESAMPLES, BOOT_SEED, IDEAL_REFERENCE, summarize_cells
from llm_psi.analysis.view import Analysis


# (config, reference): the ratios written to speedups.csv, each where both cells have >= 2 trials
PAIRS = [("cgroups", "baseline"), ("psi", "cgroups"), ("limit1", "cgroups"), ("cgroups_threads", "cgroups"),
         ("psi_threads", "cgroups"), ("adaptive", "cgroups"), ("batch", "cgroups"), ("batch_psi", "cgroups"),
         ("psi_threads", "cgroups_threads"), ("limit1", "cgroups_threads"), ("adaptive", "cgroups_threads"),
         ("batch", "cgroups_threads"), ("batch_psi", "batch"),
         # batching apart from precision: batch_fp32 is batch in float32
         ("batch_fp32", "cgroups"), ("batch_fp32", "cgroups_threads"), ("batch", "batch_fp32")]
SPEEDUP_COLUMNS = ["config", "reference_config", "concurrency", "metric", "ratio", "ci_lo", "ci_hi", "n_trials"]
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
METRIC_NAMES = {"e2e": "end-to-end latency", "service": "service time"}


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
             "scipy.stats.spearmanr's above); slope: least squares, in % of the cell's mean per trial position, with "
             "its 95% t-interval (n - 2 df): with few trials p rarely falls below 0.05, and the interval shows how "
             "large a trend the trials still allow. drift: p < 0.05.", ""]
    if all(d["status"] == "no run order recorded" for d in an.drift.values()):
        lines += ["No cell records its trials' run order (run_index or started_at): no run order recorded, drift "
                  "not measured."]
    else:
        rows = []
        for config in an.configs:
            for c in sorted(k[1] for k in an.cells if k[0] == config):
                d = an.drift[(config, c)]
                slope = lambda: f"{d['slope_pct']:+.1f} [{d['slope_ci_lo_pct']:+.1f} to {d['slope_ci_hi_pct']:+.1f}]"
                test = [f"{d['rho']:.2f}", f"{d['p']:.3g}", slope()] if "rho" in d else ["—"] * 3
                rows.append([label(config), str(c), str(d.get("n", "—")), *test, d["status"]])
        lines += md_table(["config", "c", "trials", "rho", "p", "slope %/trial [95%]", "drift"], rows)
    mixed = an.interleave
    return lines + ["", "Interleaving: " + (
        f"{mixed[0]} of {mixed[1]} consecutive trials (all cells, by started_at) switch configuration "
        f"({100 * mixed[0] / mixed[1]:.0f}%)." if mixed else "no trial start times recorded.")]


def render(an: Analysis) -> str:
    lines = ["# Table I, reproduced", "", *NOTES, "",
             "## p95 end-to-end latency (ms): submission to last token, what the paper says it reports", "",
             *table_one(an, "e2e"), "",
             "## p95 service time (ms): generation start to last token, what the paper's raw files hold", "",
             *table_one(an, "service"), "", *ratio_lines(an), "",
             *artifact.section(an.artifact, an.artifact_files, an.service_s, an.collapse,
                               os.path.join(an.results_dir, "collapse.csv")), "", *cell_sections(an)]
    return "\n".join(lines) + "\n"


def cell_sections(an: Analysis) -> list[str]:
    """The sections every table.md ends with: drift, every cell pooled, the per-trial p95s, the ideal server,
    the gate and throttling."""
    s, used = an.summary[an.summary["trial"] == "all"], an.used_summary()
    lines = [*drift_lines(an), "", "## Every cell, pooled over trials (ms)", "",
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
    return lines


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
