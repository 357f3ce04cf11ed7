"""The controller table: every further configuration against cgroups-only, all from one interleaved sweep
(results/controllers/), so that every ratio is a ratio within one run of the host.

    table.md there: this table, then the sections every table.md ends with (drift, per cell, per trial,
    the ideal server, the gate and throttling); speedups.csv: the ratios with their intervals.
"""
from __future__ import annotations

import numpy as np

from llm_psi.analysis.cells import label
from llm_psi.analysis.markdown import interval, md_table
from llm_psi.analysis.tables import RULE, cell_sections
from llm_psi.analysis.view import Analysis

REFERENCE = "cgroups"
NOTES = ["p95 (s): the mean over trials of each trial's p95, with its 95% t-interval over trials. ÷ cgroups-only: "
         "the geometric mean of the configuration's per-trial p95 over cgroups-only's at the same concurrency, "
         "with a Welch t-interval on the log scale (speedups.csv); below 1 is faster than cgroups-only. Every cell "
         "here comes from the same interleaved sweep.", RULE]


def seconds(v: float) -> str:
    return f"{v / 1000:.2f}" if np.isfinite(v) else "—"


def p95_text(an: Analysis, config: str, c: int, metric: str) -> str:
    r = an.pooled(config, c)
    return "—" if r is None else interval(*(r[f"p95_{metric}_trial_{k}_ms"] for k in ("mean", "ci_low", "ci_high")),
                                          show=seconds)


def controller_table(an: Analysis) -> list[str]:
    """One row per configuration and concurrency: trials, p95 end-to-end and service (s), each with its ratio
    to cgroups-only at that concurrency."""
    rows = []
    for config in an.configs:
        for c in sorted(k[1] for k in an.used if k[0] == config):
            r = an.pooled(config, c)
            row = [label(config), str(c), str(int(r["n_trials"]))]
            for metric in ("e2e", "service"):
                row.append(p95_text(an, config, c, metric))
                row.append("reference" if config == REFERENCE else interval(*an.ratio(config, REFERENCE, c, metric)))
            rows.append(row + [str(int(r["n_rejected"]))])
    return md_table(["config", "c", "trials", "p95 e2e s [95%]", "÷ cgroups-only [95%]", "p95 service s [95%]",
                     "÷ cgroups-only [95%]", "rejected"], rows)


def render_controllers(an: Analysis) -> str:
    lines = [f"# Controllers under the quota, against cgroups-only, in one sweep ({an.results_dir})", "", *NOTES, "",
             *controller_table(an), "", *cell_sections(an)]
    return "\n".join(lines) + "\n"
