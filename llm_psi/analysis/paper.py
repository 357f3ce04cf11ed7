"""paper.pdf: the findings against the published values on its first page, then the environment and method as
run (from the cell JSONs), the tables, the findings phrased from the measured numbers and the paper's raw files,
the figures with captions, and the per-cell tables in an appendix. ``an`` is the analysis (view.Analysis);
layout.py sets the text on pages."""
from __future__ import annotations

import math
import os

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages

from llm_psi.analysis import artifact
from llm_psi.analysis import metrics
from llm_psi.analysis.controllers import controller_table
from llm_psi.analysis.figures import RC
from llm_psi.analysis.layout import Layout
from llm_psi.analysis.markdown import interval, md_table
from llm_psi.analysis.tables import cell_sections, ratio_lines, table_one


# The paper's method as it states it (reference/README.md): what the run is compared with.
PAPER_METHOD = {"cpu_count": 4, "num_requests": 20, "trials": 1, "max_new_tokens": 50, "temperature": 0.7,
                "spacing_ms": 100.0, "quota_cores": 0.5, "memory_gib": 4.0, "psi_threshold": 95.0,
                "psi_interval_ms": 500.0, "psi_max_checks": 10}



def distinct(values) -> str:
    """'v' when all cells agree, else 'v1 (n cells); v2 (m cells)'."""
    counts = pd.Series([str(v) for v in values], dtype=object).value_counts(sort=False)
    return counts.index[0] if len(counts) == 1 else "; ".join(f"{v} ({n} cells)" for v, n in counts.items())


def limits(cell) -> dict:
    return cell.meta.get("cgroup", {}).get("limits") or {}


def quota(cell) -> str:
    """CPU quota of the cell's cgroup as recorded, in cores ('none' if it had none)."""
    q, period = limits(cell).get("cpu_quota_us"), limits(cell).get("cpu_period_us")
    return f"{q / period:.3g} cores" if q and period else "none"


def environment(an) -> list[str]:
    env = [cell.meta.get("environment", {}) for cell in an.cells.values()]
    of = lambda key, items=env: distinct(x.get(key) for x in items)
    model = [e.get("model", {}) for e in env]
    limited = [cell for cell in an.cells.values() if cell.limited]
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "unlimited"
    versions = distinct(", ".join(f"{k} {v}" for k, v in (e.get("versions") or {}).items()) for e in env)
    return [f"Host: {of('cpu_model')}, {of('cpu_count')} CPUs, {distinct(gib(e.get('mem_total_bytes')) for e in env)}"
            f" RAM, kernel {of('kernel')}.",
            f"Software: Python {of('python')}; {versions}; git commit {of('git_commit')}.",
            f"Model: {of('source', model)}, {of('n_params', model)} parameters, pretrained: {of('pretrained', model)}, "
            f"{of('dtype', model)}, temperature {of('temperature', model)}.",
            "Limited cells, cgroup as recorded: " + (
                f"CPU quota {distinct(map(quota, limited))}, memory.max "
                f"{distinct(gib(limits(c).get('memory_max_bytes')) for c in limited)}." if limited else "none.")]


def method(an) -> list[str]:
    rows = []
    for cfg in an.configs:
        cells = [cell for k, cell in sorted(an.cells.items()) if k[0] == cfg]
        run = [cell.meta.get("config", {}) for cell in cells]
        get = lambda key: distinct("default" if r.get(key, "—") is None else r.get(key, "—") for r in run)
        gate = (f"{get('psi_source')} {get('psi_signal')} > {get('psi_threshold')}, every {get('psi_interval_ms')} "
                f"ms, ≤ {get('psi_max_checks')} checks" if any(r.get("admission") == "gate" for r in run) else "")
        rows.append([an.label(cfg), ", ".join(str(cell.concurrency) for cell in cells)]
                    + [get(k) for k in ("num_requests", "trials", "max_new_tokens", "spacing_ms", "torch_threads",
                                        "admission")] + [gate])
    return md_table(["config", "c", "requests", "trials", "new tokens", "spacing ms", "torch threads", "admission",
                        "gate"], rows)


def span(values, unit="×", digits=2) -> str:
    """'lo–hi<unit>' of the finite values ('v<unit>' when they agree, '—' when there are none)."""
    v = [x for x in values if np.isfinite(x)]
    lo, hi = (f"{x:.{digits}f}" for x in (min(v), max(v))) if v else ("", "")
    return "—" if not v else f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"


def resolved(r: float, lo: float, hi: float) -> str:
    """Whether an interval of a ratio excludes 1."""
    return ("one trial: no interval" if not np.isfinite(lo) else
            "interval excludes 1" if lo > 1 or hi < 1 else "interval includes 1: not resolved")


def findings(an) -> list[str]:
    """Plain-language findings, each phrased from the measured numbers (used cells only)."""
    cs, out = an.concurrencies, []
    s = an.used_summary()
    static = span([an.ratio("cgroups", "baseline", c)[0] for c in cs])
    service = span([an.ratio("cgroups", "baseline", c, "service")[0] for c in cs])
    published = span([an.paper("cgroups", c) / an.paper("baseline", c) for c in cs])
    out.append(f"Static limits (cgroups-only) put p95 latency at {static} the baseline's end-to-end and {service} on "
               f"service time (paper, whose values are service times: {published})." if static != "—" else
               "No concurrency level has both a baseline and a cgroups-only cell: the cost of static limits is not "
               "measured.")
    both = [c for c in cs if np.isfinite(an.ratio("cgroups", "psi", c)[0])]
    verdict = []
    for c in both:
        r, lo, hi = an.ratio("cgroups", "psi", c)
        band = f" [{lo:.2f}–{hi:.2f}]" if np.isfinite(lo) else ""
        verdict.append(f"c={c}: {r:.2f}×{band} (paper {span([an.paper('cgroups', c) / an.paper('psi', c)])}; "
                       f"{resolved(r, lo, hi)})")
    out.append("Speedup of the PSI gate over cgroups-only (cgroups-only p95 / cgroups+PSI p95, end-to-end, 95% "
               "interval over trials): " + "; ".join(verdict) + ". On service time the same speedup is "
               f"{span([an.ratio('cgroups', 'psi', c, 'service')[0] for c in both])}: time spent deferred by the "
               "gate or queued for a worker counts in end-to-end latency but not in service time." if both else
               "No concurrency level has both a cgroups-only and a cgroups+PSI cell: the gate's effect is not "
               "measured.")
    lim = s[s["limited"] & s["e2e_vs_ideal"].notna()]
    if len(lim):
        per_config = "; ".join(f"{span(g['e2e_vs_ideal'])} the ideal for {an.label(k)}"
                               for k, g in lim.groupby("config", sort=False))
        out.append(f"Against a perfect one-at-a-time FIFO server needing S = {an.ideal_ms:.1f} ms per request (median "
                   f"service time of {an.reference}), p95 end-to-end is {per_config}; p95 service is "
                   f"{span(lim['service_vs_ideal'])} S.")
    n = PAPER_METHOD["num_requests"]
    out.append(f"{int(s['small_n_p95'].sum())} of {len(s)} cells have fewer than {metrics.min_samples_for(95)} ok "
               f"requests (†): their p95 interpolates between the few largest values. With the paper's {n} requests "
               f"per cell, p95 lies between the {n - math.floor((n - 1) * 0.95)} largest values of a single run.")
    width = ((s["p95_e2e_trial_ci_high_ms"] - s["p95_e2e_trial_ci_low_ms"]) / s["p95_e2e_trial_mean_ms"]).dropna()
    if len(width):
        out.append(f"The 95% interval over trials of p95 end-to-end spans {100 * width.median():.0f}% of the value "
                   f"in the median cell with at least 2 trials ({100 * width.min():.0f}% to {100 * width.max():.0f}%).")
    rej, fail = int(s["n_rejected"].sum()), int(s["n_failed"].sum())
    out.append(f"{rej} requests were rejected and {fail} failed; they are counted in the tables and left out of the "
               "latency statistics." if rej or fail else
               f"All {int(s['n'].sum())} requests completed: none was rejected or failed.")
    gated = s[s["gate_mean_checks"].notna()]
    if len(gated):
        out.append(f"The gate deferred {span(100 * gated['gate_deferred_frac'], '%', 0)} of requests per cell (mean "
                   f"checks {span(gated['gate_mean_checks'], '')}); {int(gated['gate_timeouts'].sum())} were admitted "
                   f"after the last check and {int(gated['n_rejected'].sum())} rejected.")
    share = s.loc[s["limited"], "throttled_share"].dropna()
    if s["limited"].any():
        out.append(f"Limited cells were throttled in {span(100 * share, '%', 0)} of CPU periods." if len(share) else
                   "The limited cells recorded no CPU periods: they ran without a CPU quota (cpu.max), so their "
                   "numbers do not test the paper's limits.")
    return out


def file_median(files: pd.DataFrame, config: str, c: int) -> float:
    v = files.loc[(files["config"] == config) & (files["concurrency"] == c), "median_s"]
    return float(v.iloc[0]) if len(v) else np.nan


def raw_file_findings(an) -> list[str]:
    """What the paper's raw files show (an.artifact_files: one row per file) and the collapse bench's outcome;
    an explanation that the files do not force is marked as a guess."""
    f = an.artifact_files
    out = [f"The paper's raw files (reference/artifact_results/: {int(f['n'].sum())} requests in {len(f)} files) give "
           f"the published Table I as numpy's default (linear) p95 of latency_ms in {int(f['matches'].sum())} of "
           f"{len(f)} cells. Each latency_ms is the server's own generate() time for one request: a service time."]
    idle = "; ".join(f"{k} {span(g, ' s')}" for k, g in f.groupby("config", sort=False)["idle_s"])
    overlapping = int((f["min_idle_s"] < 0).sum())
    out.append(f"Median idle time of the server between consecutive requests, per file (time between rows minus the "
               f"later row's latency): {idle}. " +
               (f"{overlapping} files have rows closer together than their latency: requests overlapped there."
                if overlapping else
                f"No row came sooner after the previous one than its own latency (smallest margin "
                f"{1000 * f['min_idle_s'].min():.2f} ms): requests never overlapped, so the artifact served them one "
                "at a time at every concurrency level."))
    alone, quota = file_median(f, "baseline", 1), file_median(f, "cgroups", 1)
    ours = [np.median(v) if len(v) else np.nan for v in (an.service_s("baseline", 1), an.service_s("cgroups", 1))]
    published = span([an.paper("cgroups", c) / an.paper("baseline", c) for c in an.concurrencies], digits=0)
    bound = PAPER_METHOD["cpu_count"] / PAPER_METHOD["quota_cores"]
    if np.isfinite(quota / alone):
        out.append(f"A request alone (c=1) took a median {alone:.2f} s unconstrained and {quota:.1f} s under the quota "
                   f"in the paper's files: {quota / alone:.1f}× slower. Ours: {ours[0]:.2f} s and {ours[1]:.2f} s, "
                   f"{ours[1] / ours[0]:.2f}×. As its requests ran one at a time, the published cgroups-only / "
                   f"baseline ratio ({published}) is a ratio of single-request service times.")
    if quota / alone > bound:
        out.append(f"Guess (not forced by the data): if a request needed the same CPU time under the quota, "
                   f"{PAPER_METHOD['quota_cores']} of a core on the paper's {PAPER_METHOD['cpu_count']}-core host "
                   f"would slow it at most {bound:.0f}× (all cores busy before); a larger factor points to extra CPU "
                   "work or waiting under throttling, such as threads spinning while the cgroup is throttled.")
    out.append("Recording order (hours after the first row): " + ", ".join(
        f"{r.config} c={r.concurrency} {r.start_h:.1f} h (median {r.median_s:.1f} s)"
        for r in f.sort_values("start_h").itertuples()) + ".")
    psi, cg = f[f["config"] == "psi"].sort_values("start_h"), f[f["config"] == "cgroups"]
    if len(psi) and len(cg) and psi["start_h"].min() > cg["end_h"].max():
        falling = "fall" if (np.diff(psi["median_s"]) < 0).all() else "do not fall"
        out.append(f"Every psi file was recorded after every cgroups file "
                   f"({psi['start_h'].min() - cg['end_h'].max():.1f} h later), and the psi medians {falling} from "
                   "each file to the next in recording order. The server did the same at every level (one request at "
                   "a time), so the psi files differ from each other in when they were recorded, not in what the "
                   "server did; nothing in the files separates an effect of the gate from a change of the host over "
                   "those hours.")
    out.append(collapse_finding(an.collapse, quota / alone))
    return out


def collapse_finding(bench: pd.DataFrame | None, artifact_factor: float) -> str:
    if bench is None:
        return ("The single-request collapse bench (python -m bench.collapse, collapse.csv) has not been run on "
                "these results.")
    if bench["slowdown"].isna().all():
        return "The collapse bench has no setting measured both unconstrained and under the quota."
    top = bench.loc[bench["slowdown"].idxmax()]
    return (f"Collapse bench here: the largest single-request slowdown under the quota is {top['slowdown']:.1f}× "
            f"({top['engine']}, OMP_WAIT_POLICY {top['omp_wait_policy']}, {top['torch_threads']} threads) over "
            f"{int(bench['slowdown'].notna().sum())} settings, against {artifact_factor:.1f}× in the paper's files.")


def drift_findings(an) -> list[str]:
    tested = {k: d for k, d in an.drift.items() if "p" in d}
    if not tested:
        return ["No cell records its trials' run order: drift over the sweep is not measured."]
    flagged = [f"{an.label(k)} c={c}" for (k, c), d in sorted(tested.items()) if d["status"] == "drift"]
    lo = min(d["slope_ci_lo_pct"] for d in tested.values())
    hi = max(d["slope_ci_hi_pct"] for d in tested.values())
    out = [f"Drift over the run order (per-trial median service time, Spearman p < 0.05): {len(flagged)} of "
           f"{len(tested)} cells" + (f" ({', '.join(flagged)})." if flagged else ".") +
           f" The least-squares slopes per trial position run from {min(d['slope_pct'] for d in tested.values()):+.1f}"
           f"% to {max(d['slope_pct'] for d in tested.values()):+.1f}% of the cell's mean; their 95% intervals span "
           f"{lo:+.1f}% to {hi:+.1f}% per trial, so with this many trials a trend of that size is not excluded."]
    if an.interleave:
        out.append(f"{an.interleave[0]} of {an.interleave[1]} consecutive trials switch configuration "
                   f"({100 * an.interleave[0] / an.interleave[1]:.0f}%).")
    return out
def differences(an) -> list[str]:
    """How the run differs from the paper's stated method, with the likely effect."""
    metas = [cell.meta for cell in an.cells.values()]
    run = lambda key: sorted({m.get("config", {}).get(key) for m in metas} - {None})
    cpus = sorted({m.get("environment", {}).get("cpu_count") for m in metas} - {None})
    model = [m.get("environment", {}).get("model", {}) for m in metas]
    host = an.p95("baseline", 1, "service") / an.paper("baseline", 1)
    out = []
    if set(cpus) - {PAPER_METHOD["cpu_count"]}:
        out.append(f"Host: {', '.join(map(str, cpus))} CPUs here, a 4-core VM in the paper: contention at c ≥ 2 and "
                   "the speed of a core differ" + (f" (our baseline c=1 p95 service time is {host:.3g}× the paper's)."
                                                    if np.isfinite(host) else "."))
    if any(m.get("pretrained") is False for m in model):
        out.append(f"Model: {distinct(m.get('source') for m in model)} with random weights; the paper used pretrained "
                   "GPT-2 124M. Each request generates exactly the configured number of tokens, so the cost depends on "
                   "the architecture, not on the text.")
    quotas = sorted({quota(c) for c in an.cells.values() if c.limited})
    if set(quotas) - {f"{PAPER_METHOD['quota_cores']} cores"}:
        out.append(f"CPU quota of the limited cells: {', '.join(quotas)} here, {PAPER_METHOD['quota_cores']} cores in "
                   "the paper" + (": a cell without a quota does not test the limits." if "none" in quotas else "."))
    for key, what in (("max_new_tokens", "new tokens per request"), ("num_requests", "requests per cell and trial"),
                      ("trials", "trials per cell"), ("spacing_ms", "ms between submissions"),
                      ("temperature", "temperature"), ("psi_threshold", "PSI threshold (%)"),
                      ("psi_interval_ms", "ms between gate checks"), ("psi_max_checks", "gate checks at most")):
        if set(run(key)) - {PAPER_METHOD[key]}:
            out.append(f"{what.capitalize()}: {', '.join(map(str, run(key)))} here, {PAPER_METHOD[key]} in the paper.")
    if "system" in run("psi_source"):
        out.append("The gate reads system-wide PSI, as the paper's did: every process on the host moves it, not only "
                   "the service.")
    out.append("The paper labels its latency end-to-end; its raw files hold each request's generate() time (service "
               "time) with requests served one at a time. Both of our metrics are reported, each beside the "
               "published values.")
    return out


def at_a_glance(an, controllers=None) -> list[str]:
    """The first page's findings: each ratio with its 95% interval over trials, beside the published value."""
    cs = an.concurrencies
    published = lambda a, b, c: an.paper(a, c) / an.paper(b, c)
    per_c = lambda a, b, metric="e2e": "; ".join(
        f"c={c}: {interval(*an.ratio(a, b, c, metric))}× (paper {published(a, b, c):.1f}×)" for c in cs
        if np.isfinite(an.ratio(a, b, c, metric)[0]))
    trials = sorted({int(r["n_trials"]) for r in an.used_summary().to_dict("records")})
    out = [f"Every cell ran {distinct(run.meta.get('config', {}).get('num_requests') for run in an.cells.values())} "
           f"requests per trial and {'/'.join(map(str, trials))} trials, interleaved; intervals are 95% t-intervals "
           "over trials. The paper's values are one trial each."]
    if per_c("cgroups", "baseline"):
        out.append("Static limits, p95 end-to-end, cgroups-only / baseline: " + per_c("cgroups", "baseline") + ". On "
                   "service time (what the paper's raw files hold): " + per_c("cgroups", "baseline", "service") + ".")
    if per_c("cgroups", "psi"):
        out.append("The PSI gate, p95 end-to-end, cgroups-only / cgroups+PSI (above 1: the gate helps): "
                   + per_c("cgroups", "psi") + ".")
    if controllers is not None and not controllers.speedups.empty:
        e2e = controllers.speedups[(controllers.speedups["metric"] == "e2e")
                                   & (controllers.speedups["reference_config"] == "cgroups")]
        for c, g in e2e.groupby("concurrency"):
            best = g.loc[g["ratio"].idxmin()]
            out.append(f"Controllers at c={c} (one interleaved sweep, {controllers.results_dir}): the lowest p95 "
                       f"end-to-end is {an.label(best['config'])}'s, {interval(best['ratio'], best['ci_lo'], best['ci_hi'])}"
                       "× cgroups-only's." + _confound(controllers, best["config"], c))
    return out


def _confound(controllers, config: str, c) -> str:
    """A note where a configuration's engine precision differs from cgroups-only's at level c: the ratio then
    measures the controller and the precision together."""
    prec = lambda k: next(((cell.meta.get("config", {}).get("dtype"), cell.meta.get("config", {}).get("quantize"))
                           for key, cell in controllers.cells.items() if key == (k, c)), None)  # noqa: E731
    mine, ref = prec(config), prec("cgroups")
    if mine is None or ref is None or mine == ref:
        return ""
    return (f" It ran {'/'.join(map(str, mine))} against cgroups-only's {'/'.join(map(str, ref))}: this ratio "
            "does not separate the controller from the precision.")


def glance_table(an) -> list[str]:
    """Table 1: p95 end-to-end (s) of the paper's three configurations and the gate's speedup, ours with
    intervals beside the published values."""
    s = lambda v: f"{v / 1000:.2f}" if np.isfinite(v) else "—"
    rows = []
    for c in an.concurrencies:
        row = [str(c)]
        for k in ("baseline", "cgroups", "psi"):
            r = an.pooled(k, c)
            row += ["—" if r is None else interval(*(r[f"p95_e2e_trial_{x}_ms"] for x in ("mean", "ci_low", "ci_high")),
                                                   show=s), s(an.paper(k, c))]
        row += [interval(*an.ratio("cgroups", "psi", c)), f"{an.paper('cgroups', c) / an.paper('psi', c):.2f}"]
        rows.append(row)
    return md_table(["c", "baseline", "paper", "cgroups-only", "paper", "cgroups+PSI", "paper", "speedup", "paper"], rows)


CAPTIONS = {"p95_vs_concurrency": "p95 latency against concurrency: ours (the mean of per-trial p95s; bars: 95% "
                                  "t-intervals over trials) and the published Table I (dashed).",
            "latency_cdf": "Latency distributions at the highest concurrency, all trials pooled; the dotted line "
                           "marks p95.",
            "timeline": "CPU pressure (system and cgroup), requests in flight and throttled periods over the first "
                        "trial at the highest concurrency.",
            "latency_breakdown": "Where the end-to-end time goes: the mean queue, defer, scheduling and service "
                                 "time of ok requests, per configuration and concurrency.",
            "artifact_timeline": "The paper's raw files: each request's service time against the time it was "
                                 "recorded."}


def figure_lines(figures: dict) -> list[str]:
    out = []
    for path in figures:
        name = path.rsplit("/", 1)[-1].removesuffix(".png")
        caption = next((text for key, text in CAPTIONS.items() if name.startswith(key)), name)
        out += [f"Figure caption: {caption}", f"Figure: {path}"]
    return out


def demote(lines: list[str]) -> list[str]:
    """Section headings one level down (## → ###), for tables.md sections set inside a paper section."""
    return ["#" + line if line.startswith("## ") else line for line in lines]


def write_paper(an, figures: dict, path: str, controllers=None) -> None:
    """The report: the findings at a glance (page 1), environment, method, tables, findings, the paper's raw
    files, differences, figures, then the per-cell tables in an appendix. controllers: the Analysis of a
    controller sweep (analyze(..., controllers=True)), or None."""
    more = [] if controllers is None else [
        "### Controllers against cgroups-only, in one interleaved sweep",
        f"From {controllers.results_dir}: every further configuration and cgroups-only at the same levels, "
        "interleaved trial by trial; the ratios are within one run of the host.",
        "Table: p95 (s) of every configuration of the controller sweep, and its ratio to cgroups-only at the same "
        "concurrency (below 1: faster), with 95% intervals over trials.", *controller_table(controllers)]
    text = "\n".join([
        "# GPT-2 inference latency under cgroup limits and a PSI admission gate: a reproduction",
        "A reproduction of Table I of 'Pressure-Aware Resource Management for Resident LLM Services in Operating "
        f"Systems', generated by analyze_results.py from {len(an.cells)} cells in {an.results_dir}. Every number "
        "below is computed from the measured per-request timestamps.",
        "## Findings at a glance", *("• " + f for f in at_a_glance(an, controllers)),
        "Table: p95 end-to-end latency (s) beside the published Table I; speedup = cgroups-only / cgroups+PSI. "
        "Ours: mean of per-trial p95 [95% interval over trials].", *glance_table(an),
        "\f", "## 1 Environment", *environment(an), "## 2 Method as run",
        "A thread pool of c workers receives the prompts at fixed spacing; each request is timed from submission "
        "through admission and generation to its last token (metrics.py defines every span).",
        "Table: The method as run, per configuration (from the cells' JSON).", *method(an),
        "## 3 Results", "### p95 end-to-end latency (ms): submission to last token, what the paper says it reports",
        *table_one(an, "e2e"),
        "### p95 service time (ms): generation start to last token, what the paper's raw files hold",
        *table_one(an, "service"), *demote(ratio_lines(an)), *more,
        "## 4 Findings", *("• " + f for f in findings(an) + drift_findings(an)),
        "## 5 What the paper's raw files show", *("• " + f for f in raw_file_findings(an)),
        *demote(artifact.section(an.artifact, an.artifact_files, an.service_s, an.collapse,
                                 os.path.join(an.results_dir, "collapse.csv"))),
        "## 6 Differences from the paper's stated method", *("• " + d for d in differences(an)),
        "\f", "## 7 Figures", *figure_lines(figures),
        "\f", "# Appendix A: every cell", *demote(cell_sections(an)),
        *([] if controllers is None else ["\f", "# Appendix B: every cell of the controller sweep",
                                          *demote(cell_sections(controllers))])])
    metadata = {"CreationDate": None, "Title": "Table I, reproduced"}  # no date: rebuilding gives the same file
    with matplotlib.rc_context(RC), PdfPages(path, metadata=metadata) as pdf:
        for page in Layout(figures).add(text).finish():
            pdf.savefig(page)
