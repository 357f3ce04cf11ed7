"""The analysis as the tables, figures and paper read it: one ``Analysis``, built in analyze.analyze."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from llm_psi.analysis.cells import LABELS, PAPER_COLUMNS, PAPER_CONCURRENCY, label, order
from llm_psi.analysis.stats import drift, interleaving, trial_ratio


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # a frozen dataclass's derived attributes, set once in __post_init__


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Everything the tables, figures and paper read, fixed once built (analyze.analyze); the derived
    attributes (configs, palette, concurrencies, used, drift, interleave) follow from the fields."""
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
        _set(self, "configs", order({k[0] for k in self.cells}))
        _set(self, "palette", order(set(LABELS) | set(self.configs)))  # colour i: the i-th of these
        _set(self, "paper_columns", PAPER_COLUMNS)
        _set(self, "concurrencies", sorted({k[1] for k in self.cells} | set(PAPER_CONCURRENCY)))
        _set(self, "used", {k for k, cell in self.cells.items() if cell.complete or self.include_incomplete})
        _set(self, "drift", {k: drift(cell.runs, cell.rows) for k, cell in self.cells.items()})
        _set(self, "interleave", interleaving((cell.config, cell.runs) for _, cell in sorted(self.cells.items())))
        _set(self, "_rows", {(r["config"], r["concurrency"], r["trial"]): r for r in self.summary.to_dict("records")
                         if (r["config"], r["concurrency"]) in self.used})

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
