"""The paper's Table I from the cell files, with intervals over trials, beside the published values and the
paper's own raw files.

    python analyze_results.py [--results-dir results] [--paper PDF] [--no-figures] [--include-incomplete]

Reads every ``{config}_c{N}.csv`` (with its ``.json`` and ``_timeline.csv``) in the results directory and
writes there summary.csv, latency_distributions.csv, speedups.csv, table.md and the figures; the report goes
beside them (``<results-dir>/paper.pdf``; for this repository's own results/ the root paper.pdf), or to --paper.
Where ``<results-dir>/controllers`` holds cells (one interleaved sweep of the further configurations beside
cgroups-only), it writes the same CSVs there and the controller table as its table.md.
Every metric comes from metrics.py. Only ok requests enter latency statistics; the others are counted.
A cell is complete when its JSON says so and it holds every planned request; an incomplete cell is warned
about and left out of every table and figure but summary.csv, unless --include-incomplete.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import pandas as pd

from llm_psi.analysis import artifact
from llm_psi.analysis import metrics
from llm_psi.analysis.figures import focus, write_figures
from llm_psi.analysis.paper import write_paper
from llm_psi.analysis.controllers import render_controllers
from llm_psi.analysis.cells import AnalysisError, CELL_RE, HERE, LABELS, PAPER_COLUMNS, load_cells, load_published, order, warn
from llm_psi.analysis.summary import IDEAL_REFERENCE, ideal_reference, summarize_cells
from llm_psi.analysis.tables import mode_table, render, speedup_table
from llm_psi.analysis.view import Analysis


def has_cells(directory: str) -> bool:
    return os.path.isdir(directory) and any(CELL_RE.match(n) for n in os.listdir(directory))


def analyze(results_dir: str, include_incomplete: bool = False, service_dir: str | None = None,
            controllers: bool = False) -> Analysis:
    """Read the cells and the paper's files, warn about missing cells, and build the Analysis with its tables
    (the one place it is built). controllers: the folder is a controller sweep (table.md is the controller
    table; no missing-cell warnings against the paper's grid, no service-mode table)."""
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
    missing = [f"{k}_c{c}" for c in an.concurrencies for k in order(LABELS) if (k, c) not in cells]
    if controllers:
        an = dataclasses.replace(an, speedups=speedup_table(an))
        return dataclasses.replace(an, table_md=render_controllers(an))
    if missing:
        warn(f"missing cells, shown as —: {', '.join(missing)}")
    if any(c.limited for c in used.values()) and reference is None:
        warn("no reference cell for the ideal (" + ", ".join(f"{c}_c1" for c in IDEAL_REFERENCE) + "): shown as —")
    an = dataclasses.replace(an, speedups=speedup_table(an))  # render reads the speedups
    table_md, modes = render(an), None
    service_dir = service_dir or os.path.join(results_dir, "service")
    if has_cells(service_dir):
        modes, lines = mode_table(an, service_dir)
        table_md += "\n" + "\n".join(lines) + "\n"
    return dataclasses.replace(an, table_md=table_md, modes=modes)


def write_outputs(an: Analysis) -> None:
    d = an.results_dir
    if an.modes is not None:
        an.modes.to_csv(os.path.join(d, "modes.csv"), index=False)
    an.summary.to_csv(os.path.join(d, "summary.csv"), index=False)
    # 12 significant digits: the last bits of a Welch interval differ between CPUs (vector widths)
    an.speedups.to_csv(os.path.join(d, "speedups.csv"), index=False, float_format="%.12g")
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
    p.add_argument("--controllers-dir", default=None,
                   help="a controller sweep to tabulate on its own, against its cgroups-only cells (default: "
                        "<results-dir>/controllers, where it exists)")
    a = p.parse_args(argv)
    try:
        an = analyze(a.results_dir, a.include_incomplete, a.service_dir)
        write_outputs(an)
        print(an.table_md, end="")
        controllers_dir, controllers = a.controllers_dir or os.path.join(a.results_dir, "controllers"), None
        if has_cells(controllers_dir):
            controllers = analyze(controllers_dir, a.include_incomplete, controllers=True)
            write_outputs(controllers)
            print(f"wrote the controller table: {os.path.join(controllers_dir, 'table.md')}", file=sys.stderr)
        elif a.controllers_dir:
            raise AnalysisError(f"{a.controllers_dir}: no cell files")
        if not a.no_figures:
            paper = a.paper or default_paper(a.results_dir)
            figures = write_figures(an)
            write_paper(an, figures, paper, controllers)
            if not any(name.startswith("timeline_c") for name in map(os.path.basename, figures)):
                warn(f"no timeline files at concurrency {focus(an)}: no timeline figure")
            print(f"wrote {', '.join(map(os.path.basename, figures))} in {a.results_dir}; {paper}", file=sys.stderr)
    except (AnalysisError, artifact.ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0
