"""Reading and checking the cell files: ``{config}_c{N}.csv`` with its ``.json`` and ``_timeline.csv``.

A cell is complete when its JSON says so and it holds every planned request (the analysis warns about an
incomplete one). Also the published Table I (reference/paper_table1.csv) and the configs' labels and order.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import numpy as np
import pandas as pd

from llm_psi import REPO
from llm_psi.analysis import metrics
from llm_psi.config import CONFIGS


HERE = REPO  # the repository root: the root scripts, reference/, results/
PUBLISHED = os.path.join(HERE, "reference", "paper_table1.csv")
LABELS = {"baseline": "baseline", "cgroups": "cgroups-only", "psi": "cgroups+PSI"}
PAPER_COLUMNS = {"baseline": "baseline_p95_ms", "cgroups": "cgroups_only_p95_ms", "psi": "cgroups_psi_p95_ms"}
PAPER_CONCURRENCY = (1, 2, 4, 8)
NEEDED = ["trial", "request_id", "status", "output_tokens", *metrics.TIME_COLUMNS, "gate_decision", "gate_checks"]
CELL_RE = re.compile(r"^(?P<config>.+)_c(?P<concurrency>\d+)\.csv$")


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


def load_published(path: str = PUBLISHED) -> pd.DataFrame:
    try:
        pub = pd.read_csv(path)
        return pub.set_index(pub["concurrency"].astype(int))[list(PAPER_COLUMNS.values())].astype(float)
    except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise AnalysisError(f"{path}: cannot read the published table ({e})")
