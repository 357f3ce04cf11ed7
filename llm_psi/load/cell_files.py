"""The files of one cell: <stem>.csv (one row per request), <stem>.json (metadata) and <stem>_timeline.csv.

Nothing is lost or overwritten silently: rows are appended and flushed as requests finish; an existing cell
is refused unless --force (replace) or --resume (keep its finished trials, run the missing ones, same
settings only); the JSON says ``complete: false`` until the last planned trial's rows are on the disk.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import threading

from llm_psi.analysis import metrics
from llm_psi.cli import UsageError

DEFAULT_OUTPUT = "runs/{config}_c{concurrency}.csv"  # git-ignored: committed results/ change only on purpose
# Settings of one invocation, not of the cell: they may differ between the runs that fill one cell.
PER_RUN_KEYS = ("trial", "run_index", "force", "resume", "quiet", "verbose", "output", "wait_ready_s")

COLUMNS = ["trial", "request_id", "config", "concurrency", "prompt_id", "prompt_chars", "prompt_tokens",
           "output_tokens", "status", "error", "t_intended_s"] + metrics.TIME_COLUMNS + [
           "srv_admit_s", "srv_start_s", "srv_first_token_s", "srv_end_s",
           "gate_decision", "gate_checks", "gate_pressure"] + [
           "queue_ms", "defer_ms", "sched_ms", "service_ms", "ttft_ms", "tpot_ms", "e2e_ms", "lateness_ms",
           "instance"]  # the instance that served it, behind a balancer (x-llm-psi-instance; empty otherwise)


def probe_path(stem: str) -> str:
    """The cell's probe samples (trial, t_s, wake_ms, delay_ms per period), written where a probe ran."""
    return stem + "_probe.csv"


def check_output(path: str) -> None:
    """Fail early, before loading the model, if the output cannot be written; leaves nothing behind."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"output {path} is a directory")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {parent}: {e.strerror}")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"output {path} is not writable")



def _field(v):
    """One CSV field: empty for a missing value (None, NaN), else the value (floats as Python writes them)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


class CsvSink:
    """Appends one row per finished request and flushes, so an interrupted run keeps every finished row.
    The header is written only to a new (or empty) file; rows appended to an older file keep its columns."""

    def __init__(self, path: str):
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        fields = COLUMNS
        if not new:
            with open(path, newline="") as f:
                fields = next(csv.reader(f), None) or COLUMNS
        self._f = open(path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=fields, extrasaction="ignore")
        if new:
            self._w.writeheader()
        self._f.flush()
        self._lock = threading.Lock()

    def write(self, row: dict) -> None:
        full = {**row, **metrics.derive_row(row)}
        clean = {k: _field(full.get(k)) for k in self._w.fieldnames}
        with self._lock:
            self._w.writerow(clean)
            self._f.flush()

    def close(self) -> None:
        """Flush to the disk: a cell is marked complete only after this."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class CellFiles:
    """The three files of one cell (<stem>.csv, .json, _timeline.csv) and what this run may do with them:
    create them, replace them (--force), or keep their finished trials and add the missing ones (--resume)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.csv, self.json, self.timeline = cfg.output, cfg.stem + ".json", cfg.stem + "_timeline.csv"
        self.probe = probe_path(cfg.stem)
        self.meta = None      # the existing cell's metadata, when resuming
        self.done = set()     # its finished trials

    def existing(self) -> list[str]:
        return [p for p in (self.csv, self.json, self.timeline, self.probe) if os.path.exists(p)]

    def plan(self) -> list[int]:
        """The trials this run will run; raises UsageError where the cell exists and may not be touched."""
        cfg = self.cfg
        wanted = [cfg.trial] if cfg.trial else list(range(1, cfg.trials + 1))
        found = self.existing()
        if not found or cfg.force:
            return wanted
        if not cfg.resume:
            raise UsageError(f"{found[0]} exists; --force replaces the cell, --resume completes it "
                             f"(new runs go to {os.path.dirname(DEFAULT_OUTPUT)}/ by default)")
        try:
            with open(self.json) as f:
                self.meta = json.load(f)
            stored = self.meta["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"cannot resume {self.csv}: its metadata {self.json} is missing or unreadable "
                             f"({type(e).__name__}); --force replaces the cell") from None
        mine = dataclasses.asdict(cfg)
        differ = [k for k in mine if k not in PER_RUN_KEYS and stored.get(k, mine[k]) != mine[k]]
        if differ:
            k = differ[0]
            raise UsageError(f"cannot resume {self.csv}: it was run with {k}={stored[k]!r}, this run has "
                             f"{mine[k]!r}; --force replaces the cell")
        self.done = {t["trial"] for t in self.meta.get("trials", []) if t.get("complete")}
        return [k for k in wanted if k not in self.done]

    def open(self, base_meta: dict) -> dict:
        """Make the files ready to take this run's trials; returns the metadata to extend."""
        if self.meta is None:
            for path in self.existing():  # --force, or a fresh cell
                os.remove(path)
            meta = base_meta
        else:
            meta = self.meta
            meta["trials"] = [t for t in meta.get("trials", []) if t.get("trial") in self.done]
            meta.setdefault("resumed", []).append({"at": base_meta["start_wall"], "argv": base_meta["argv"]})
            for path in (self.csv, self.timeline, self.probe):  # drop the rows of unfinished trials
                self._keep_trials(path)
        meta.update(complete=False, interrupted=False, trials_planned=self.cfg.trials)
        return meta

    def _keep_trials(self, path: str) -> None:
        if not os.path.exists(path):
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        col = rows[0].index("trial")
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if r and int(r[col]) in self.done])
        os.replace(tmp, path)

    def is_complete(self, meta: dict) -> bool:
        finished = {t["trial"] for t in meta["trials"] if t.get("complete")}
        return not meta["interrupted"] and finished >= set(range(1, self.cfg.trials + 1))


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
