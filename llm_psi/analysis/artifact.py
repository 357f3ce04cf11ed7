"""The paper's own per-request files (reference/artifact_results/) beside our measurements.

load() reads the twelve files; files() gives one row per file (Table I recomputed, recording times, the
server's idle time between requests); section() writes the table.md part that puts their single-request
service times beside ours and, when a results directory holds collapse.csv (python -m bench.collapse), the
single-request slowdown measured here per engine, wait policy and threads.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd

from llm_psi.analysis.markdown import md_table
from llm_psi import REPO

ARTIFACT_DIR = os.path.join(REPO, "reference", "artifact_results")
FILE_RE = re.compile(r"^(?P<config>[a-z_]+)_c(?P<concurrency>\d+)\.csv$")
COLUMNS = ["timestamp", "latency_ms", "prompt_length"]
COLLAPSE_COLUMNS = ["engine", "omp_wait_policy", "torch_threads", "condition", "reps", "median_service_s", "min_s",
                    "max_s"]
COLLAPSE_KEYS = ["engine", "omp_wait_policy", "torch_threads"]
# (what is compared, [(source, config, concurrency or None for every level)]): single-request service times.
COMPARISONS = [
    ("(a) one request alone, unconstrained", [("artifact", "baseline", None), ("artifact", "baseline", 1),
                                               ("ours", "baseline", 1)]),
    ("(b) one request alone, under the quota", [("artifact", "cgroups", None), ("artifact", "cgroups", 1),
                                                 ("ours", "cgroups", 1)]),
    ("(c) one at a time under the quota", [("artifact", "cgroups", None), ("ours", "limit1", None)]),
]
# slowdown = median under the quota / median unconstrained: (source, quota rows, unconstrained rows)
SLOWDOWNS = [("artifact", ("cgroups", 1), ("baseline", 1)), ("artifact", ("cgroups", None), ("baseline", None)),
             ("ours", ("cgroups", 1), ("baseline", 1)), ("ours", ("limit1", None), ("baseline", 1))]


class ArtifactError(Exception):
    """A reference or collapse file that cannot be read: reported as 'error: <file>: <problem>', exit 2."""


def load(directory: str = ARTIFACT_DIR) -> pd.DataFrame:
    """Every ``{config}_c{N}.csv`` of the artifact as one frame: config, concurrency, row (its place in the
    file), timestamp (Unix s), latency_ms, prompt_length; sorted by config, concurrency, row."""
    names = sorted(n for n in os.listdir(directory) if FILE_RE.match(n)) if os.path.isdir(directory) else []
    if not names:
        raise ArtifactError(f"{directory}: no artifact files ({{config}}_c{{N}}.csv)")
    frames = []
    for name in names:
        path, m = os.path.join(directory, name), FILE_RE.match(name)
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: cannot parse CSV ({str(e).strip().splitlines()[0]})")
        if list(df.columns) != COLUMNS or df.empty:
            raise ArtifactError(f"{path}: expected the columns {','.join(COLUMNS)} and at least one row")
        if not all(pd.api.types.is_numeric_dtype(df[c]) for c in COLUMNS) or df.isna().any(axis=None):
            raise ArtifactError(f"{path}: non-numeric or empty values")
        frames.append(df.assign(config=m["config"], concurrency=int(m["concurrency"]), row=range(len(df))))
    return pd.concat(frames, ignore_index=True)[["config", "concurrency", "row", *COLUMNS]]


def files(art: pd.DataFrame, published: dict) -> pd.DataFrame:
    """One row per file, in recording order: config, concurrency, n, start_utc, start_h and end_h (hours since
    the artifact's first row), median_s, p95_ms (numpy's default linear p95 of latency_ms), published_ms
    (``published``: {(config, concurrency): ms}), matches (to the table's 0.1 ms), and idle_s and min_idle_s:
    the median and the smallest (gap between consecutive rows - the later row's latency), the server's idle
    time between requests (negative: two requests overlapped)."""
    t0, out = art["timestamp"].min(), []
    for (k, c), g in art.groupby(["config", "concurrency"]):
        lat = g["latency_ms"].to_numpy(float)
        idle = np.diff(g["timestamp"]) - lat[1:] / 1000
        p95, pub = float(np.percentile(lat, 95)), published.get((k, c), np.nan)
        out.append({"config": k, "concurrency": c, "n": len(g),
                    "start_utc": pd.to_datetime(g["timestamp"].min(), unit="s", utc=True),
                    "start_h": (g["timestamp"].min() - t0) / 3600, "end_h": (g["timestamp"].max() - t0) / 3600,
                    "median_s": float(np.median(lat)) / 1000, "p95_ms": p95, "published_ms": pub,
                    "matches": bool(abs(p95 - pub) <= 0.05),
                    "idle_s": float(np.median(idle)) if idle.size else np.nan,
                    "min_idle_s": float(idle.min()) if idle.size else np.nan})
    return pd.DataFrame(out).sort_values("start_h", kind="stable").reset_index(drop=True)


def rows_of(art: pd.DataFrame, config: str, concurrency: int | None) -> np.ndarray:
    """Latencies (s) of one file, or of every file of a config when concurrency is None."""
    sel = (art["config"] == config) & ((art["concurrency"] == concurrency) if concurrency else True)
    return art.loc[sel, "latency_ms"].to_numpy(float) / 1000


def distribution(values_s) -> dict:
    v = np.asarray(values_s, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0, "min": np.nan, "median": np.nan, "p95": np.nan, "max": np.nan}
    return {"n": int(v.size), "min": v.min(), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
            "max": v.max()}


def load_collapse(path: str) -> pd.DataFrame | None:
    """collapse.csv as written by python -m bench.collapse, or None when the file is not there."""
    if not os.path.exists(path):
        return None
    try:
        df = pd.read_csv(path, dtype={k: str for k in COLLAPSE_KEYS}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: cannot parse CSV ({str(e).strip().splitlines()[0]})")
    missing = [c for c in COLLAPSE_COLUMNS if c not in df.columns]
    if missing:
        raise ArtifactError(f"{path}: missing columns {', '.join(missing)}")
    if not set(df["condition"]) <= {"unconstrained", "quota"}:
        raise ArtifactError(f"{path}: condition must be unconstrained or quota")
    if df.duplicated(COLLAPSE_KEYS + ["condition"]).any():
        raise ArtifactError(f"{path}: two rows for one engine, wait policy, threads and condition")
    median = pd.to_numeric(df["median_service_s"], errors="coerce")
    if median.isna().any() or (median <= 0).any():
        raise ArtifactError(f"{path}: median_service_s must be a positive number in every row")
    return df.assign(median_service_s=median)


def collapse_slowdowns(df: pd.DataFrame) -> pd.DataFrame:
    """Per engine x wait policy x threads: the two medians (s) and slowdown = quota / unconstrained."""
    wide = df.pivot(index=COLLAPSE_KEYS, columns="condition", values="median_service_s")
    wide = wide.reindex(columns=["unconstrained", "quota"]).sort_index()
    return wide.assign(slowdown=wide["quota"] / wide["unconstrained"]).reset_index()


def _s(v: float) -> str:
    return f"{v:.2f}" if np.isfinite(v) else "—"


def _factor(v: float) -> str:
    return f"{v:.1f}×" if np.isfinite(v) else "—"


def section(art: pd.DataFrame, table: pd.DataFrame, ours, bench: pd.DataFrame | None,
            collapse_path: str) -> list[str]:
    """The table.md lines: the files (``table`` from files()), their single-request service times beside ours
    with the slowdown factors, and the collapse bench (``bench`` from collapse_slowdowns(), None when
    collapse_path is absent). ``ours(config, concurrency or None)``: our ok service times (s) of that cell, or
    of every level of the config."""
    def values(source, config, c):
        return rows_of(art, config, c) if source == "artifact" else np.asarray(ours(config, c), dtype=float)

    def median(source, config, c):
        v = values(source, config, c)
        return float(np.median(v)) if v.size else np.nan

    def name(config, c):
        return f"{config} " + (f"c={c}" if c else "all levels")

    lines = ["## The paper's raw files: Table I recomputed, in recording order", "",
             "reference/artifact_results/: one row per request, latency_ms = the server's generate() time. p95: "
             "numpy's default (linear) method; idle: median, min idle: smallest, over consecutive rows of (time "
             "between them - the later row's latency), the time the server spent between requests (negative: "
             "two requests overlapped). Hours since the first row "
             f"({table['start_utc'].min():%Y-%m-%d %H:%M} UTC).", ""]
    lines += md_table(["file", "n", "from h", "to h", "median s", "idle s", "min idle s", "p95 ms", "published",
                       "equal"],
                      [[name(r.config, r.concurrency), str(r.n), f"{r.start_h:.2f}", f"{r.end_h:.2f}", _s(r.median_s),
                        _s(r.idle_s), f"{r.min_idle_s:.3f}", f"{r.p95_ms:.1f}", f"{r.published_ms:.1f}",
                        "yes" if r.matches else "NO"]
                       for r in table.itertuples()])
    rows = []
    for what, members in COMPARISONS:
        for i, (source, config, c) in enumerate(members):
            d = distribution(values(source, config, c))
            rows.append([what if i == 0 else "", f"{source}: {name(config, c)}", str(d["n"])]
                        + [_s(d[k]) for k in ("min", "median", "p95", "max")])
    lines += ["", "## One request's service time: the paper's raw files beside ours (s)", "",
              "Where min idle ≥ 0 above, the artifact's server finished each request before it started the next, so "
              "those files time requests served alone. Ours: service_ms of ok requests, all trials.", ""]
    lines += md_table(["comparison", "rows", "n", "min", "median", "p95", "max"], rows)
    slow = [[source, name(*quota), name(*free), _s(median(source, *quota)), _s(median(source, *free)),
             _factor(median(source, *quota) / median(source, *free))] for source, quota, free in SLOWDOWNS]
    lines += ["", "Slowdown = median under the quota / median unconstrained:", ""]
    lines += md_table(["source", "under the quota", "unconstrained", "median s", "median s", "slowdown"], slow)
    lines += ["", "## Single-request collapse bench (collapse.csv)", ""]
    if bench is None:
        return lines + [f"{collapse_path} is not there: python -m bench.collapse has not been run for these results."]
    lines += md_table(COLLAPSE_KEYS + ["unconstrained median s", "quota median s", "slowdown"],
                      [[*map(str, r[:3]), _s(r[3]), _s(r[4]), _factor(r[5])] for r in bench.itertuples(index=False)])
    if bench["slowdown"].isna().all():
        return lines + ["", "Largest slowdown: — (no group has both conditions)."]
    top = bench.loc[bench["slowdown"].idxmax()]
    where = ", ".join(str(top[k]) for k in COLLAPSE_KEYS)
    return lines + ["", f"Largest slowdown: {_factor(top['slowdown'])} ({where})."]
