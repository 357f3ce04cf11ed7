"""The paper's load: a closed-loop thread pool of C workers sending N prompts, one CSV row per request.

    python request_generator.py --config baseline --concurrency 8 --num-requests 20   # -> runs/baseline_c8.csv

The run records raw timestamps only (seconds since the trial began, monotonic clock); the derived columns
come from ``metrics.derive``. Rows are appended and flushed as requests finish, so an interrupted run keeps
every finished row. A metadata JSON with the same stem holds the frozen run config, the environment, the
cgroup limits and counters, one record per trial, and ``complete``: false until the last planned trial's
last row is written and flushed, so a killed run never looks complete.

New cells go to runs/ (git-ignored) by default. An existing cell is never overwritten silently: ``--force``
replaces it, ``--resume`` keeps its finished trials and runs the missing ones (a sweep uses ``--trial K
--resume`` to add trial K to a cell, so that trials of different cells can interleave).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import metrics
from cgroup_lib import finite_number

HERE = os.path.dirname(os.path.abspath(__file__))

# Varied prompts of 27-41 characters, as in the paper.
PROMPTS = [
    "Explain the theory of relativity.",
    "Write a short poem about the sea.",
    "What causes the seasons on Earth?",
    "Describe a busy market at dawn.",
    "Summarize the history of Rome.",
    "How do vaccines train the immune system?",
    "Give three tips for learning to cook.",
    "Why is the sky blue during the day?",
    "Tell a story about a lost robot.",
    "What is the future of renewable energy?",
]

# Configuration labels and the settings each one presets. `limited` cells run inside the service cgroup.
CONFIGS = {
    "baseline": dict(limited=False),
    "cgroups": dict(limited=True),
    "psi": dict(limited=True, admission="gate"),
    "cgroups_threads": dict(limited=True, torch_threads="auto"),
    "psi_threads": dict(limited=True, admission="gate", torch_threads="auto"),
    "limit1": dict(limited=True, admission="limit", concurrency_limit=1, torch_threads="auto"),
    "adaptive": dict(limited=True, admission="adaptive", torch_threads="auto"),
    "batch": dict(limited=True, batching="dynamic", torch_threads="auto"),
    # The batch limit is the adaptive limit: a one-thread service at a 50% quota stalls ~50% of the time on
    # throttling alone, so "low" pressure sits above that floor; batching raises service time by design,
    # so the latency tolerance is wider than for one-at-a-time service.
    "batch_psi": dict(limited=True, batching="dynamic", admission="adaptive", torch_threads="auto",
                      adaptive_low_pct=60.0, adaptive_tolerance=2.0),
}

DEFAULT_OUTPUT = "runs/{config}_c{concurrency}.csv"  # git-ignored: committed results/ change only on purpose
ENGINES = ("loop", "generate")  # llm_server.make_engine kinds
# Settings of one invocation, not of the cell: they may differ between the runs that fill one cell.
PER_RUN_KEYS = ("trial", "run_index", "force", "resume", "quiet", "verbose", "output")

COLUMNS = ["trial", "request_id", "config", "concurrency", "prompt_id", "prompt_chars", "prompt_tokens",
           "output_tokens", "status", "error"] + metrics.TIME_COLUMNS + [
           "gate_decision", "gate_checks", "gate_pressure"] + [
           "queue_ms", "defer_ms", "sched_ms", "service_ms", "ttft_ms", "tpot_ms", "e2e_ms"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    config: str = "baseline"
    concurrency: int = 1
    num_requests: int = 20
    spacing_ms: float = 100.0
    max_new_tokens: int = 50
    temperature: float = 0.7
    seed: int = 0
    trials: int = 1
    output: str = "runs/baseline_c1.csv"
    prompts_file: str | None = None
    model: str | None = None
    tiny: bool = False
    torch_threads: str | None = None
    warmup: bool = True
    quiet: bool = False
    verbose: bool = False
    admission: str = "none"          # none | gate | limit | adaptive
    concurrency_limit: int = 1
    psi_threshold: float = 95.0
    psi_interval_ms: float = 500.0
    psi_max_checks: int = 10
    on_timeout: str = "admit"
    psi_source: str = "system"
    psi_signal: str = "avg10"
    psi_mode: str = "poll"
    adaptive_low_pct: float = 20.0   # adaptive limit: add one below this pressure (%)
    adaptive_high_pct: float = 90.0  # halve at or above this pressure (%)
    adaptive_tolerance: float = 1.5  # halve when median service exceeds the minimum by this factor
    timeline_interval_ms: float = 250.0
    batching: str = "off"
    max_batch: int = 8
    engine: str = "loop"             # loop (our decode loop) | generate (Hugging Face generate(), as the artifact)
    trial: int | None = None         # run only this trial of the cell (sweeps interleave cells trial by trial)
    run_index: int | None = None     # this run's position in its sweep, recorded with the trial
    force: bool = False
    resume: bool = False

    @property
    def stem(self) -> str:
        return os.path.splitext(self.output)[0]


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


COUNT = finite_number(int, ge=1)              # a positive integer
INDEX = finite_number(int, ge=0)
DURATION_MS = finite_number(float, gt=0)
PERCENT = finite_number(float, ge=0, le=100)


def _opt(group, *flags, help="", **kw):
    """An option whose default is None (= not given: the --config preset or the RunConfig default applies);
    its help shows the RunConfig default."""
    action = group.add_argument(*flags, default=None, help=help, **kw)
    default = getattr(RunConfig, action.dest, None)
    action.help = f"{help} (default: {default})".lstrip()
    return action


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=os.path.basename(sys.argv[0]) or "request_generator.py",
                description="Send concurrent prompts to the in-process GPT-2 engine; one CSV row per request. "
                            "Defaults are the paper's; a --config label presets the options it names "
                            "(--list-configs), and an explicit option wins over the preset.")
    g = p.add_argument_group("cell")
    g.add_argument("--config", default=RunConfig.config,
                   help=f"cell label: {', '.join(CONFIGS)} (default: %(default)s)")
    _opt(g, "--concurrency", type=COUNT, help="worker threads (closed loop)")
    _opt(g, "--num-requests", type=COUNT, help="requests per trial")
    _opt(g, "--spacing-ms", type=finite_number(float, ge=0), help="time between submissions")
    _opt(g, "--trials", type=COUNT, help="trials planned for the cell")
    g.add_argument("--trial", type=COUNT, default=None,
                   help="run only trial K of the cell (with --resume: add it to the cell's finished trials)")
    g.add_argument("--run-index", type=INDEX, default=None,
                   help="this run's position in its sweep, recorded with the trial")
    g.add_argument("--list-configs", action="store_true", help="print 'name limited|unlimited' and exit")
    g = p.add_argument_group("output (nothing is overwritten silently)")
    g.add_argument("--output", default=None,
                   help=f"CSV path; the metadata JSON and <stem>_timeline.csv go beside it (default: "
                        f"{DEFAULT_OUTPUT})")
    g.add_argument("--force", action="store_true", help="replace an existing cell")
    g.add_argument("--resume", action="store_true",
                   help="keep an existing cell's finished trials and run the missing ones (same settings only)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="log every admission decision")
    _opt(g, "--timeline-interval-ms", type=DURATION_MS, help="pressure/throttling timeline sample interval")
    g = p.add_argument_group("model and decoding")
    g.add_argument("--model", default=None, help="pretrained weights: local path or hub id (default: the GPT-2 "
                                                 "124M architecture with weights from --seed)")
    g.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    _opt(g, "--engine", choices=ENGINES,
         help="loop: our KV-cache decode loop; generate: Hugging Face generate(), as the artifact")
    _opt(g, "--max-new-tokens", type=COUNT, help="exact tokens per request")
    _opt(g, "--temperature", type=finite_number(float, gt=0))
    _opt(g, "--seed", type=INDEX, help="weight init and sampling seed")
    g.add_argument("--prompts", dest="prompts_file", default=None, help="file with one prompt per line "
                                                                        "(default: 10 built-in prompts)")
    g.add_argument("--torch-threads", default=None,
                   help="N, 'auto' (= the cgroup's CPU quota, at least 1) or 'default' (torch's own)")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up request")
    _opt(g, "--batching", choices=["off", "dynamic"],
         help="dynamic: continuous batching (batch_engine.py)")
    _opt(g, "--max-batch", type=COUNT)
    g = p.add_argument_group(
        "admission", "gate (the paper): before each request read the pressure; while it is over --psi-threshold "
        "sleep --psi-interval-ms and read again, at most --psi-max-checks reads, then --on-timeout. limit: a "
        "FIFO concurrency limit of --concurrency-limit. adaptive: AIMD on the limit (+1 below "
        "--adaptive-low-pct pressure, halve at --adaptive-high-pct or when median service exceeds the minimum "
        "by --adaptive-tolerance), floor 1.")
    _opt(g, "--admission", choices=["none", "gate", "limit", "adaptive"])
    g.add_argument("--psi-policy", choices=["gate", "adaptive"], default=None,
                   help="the pressure-driven admission (= --admission)")
    _opt(g, "--concurrency-limit", type=COUNT)
    _opt(g, "--psi-threshold", type=PERCENT, help="percent")
    _opt(g, "--psi-interval-ms", type=DURATION_MS)
    _opt(g, "--psi-max-checks", type=COUNT)
    _opt(g, "--on-timeout", choices=["admit", "reject"])
    _opt(g, "--psi-source", choices=["system", "cgroup"],
         help="/proc/pressure/cpu or the service cgroup's cpu.pressure")
    _opt(g, "--psi-signal", choices=["avg10", "total"],
         help="avg10, or the stall share over the last interval from total= deltas")
    _opt(g, "--psi-mode", choices=["poll", "trigger"])
    _opt(g, "--adaptive-low-pct", type=PERCENT)
    _opt(g, "--adaptive-high-pct", type=PERCENT)
    _opt(g, "--adaptive-tolerance", type=finite_number(float, gt=1))
    return p


def parse_config(argv, default_output=DEFAULT_OUTPUT) -> RunConfig:
    """argv -> validated, frozen RunConfig. Raises UsageError with a one-line message.
    Precedence: an explicit option, then the --config preset, then the RunConfig default."""
    a = vars(build_parser().parse_args(argv))
    a.pop("list_configs")
    policy = a.pop("psi_policy")
    if policy is not None and a["admission"] is None:
        a["admission"] = policy
    if a["config"] not in CONFIGS:
        raise UsageError(f"unknown config {a['config']!r} (choose from {', '.join(CONFIGS)})")
    for key, value in CONFIGS[a["config"]].items():
        if key != "limited" and a.get(key) is None:
            a[key] = value
    defaults = RunConfig()
    for key, value in a.items():  # not given and not preset: the RunConfig default
        if value is None and key not in ("output", "trial", "run_index"):
            a[key] = getattr(defaults, key)
    if not a["adaptive_low_pct"] < a["adaptive_high_pct"]:
        raise UsageError(f"need --adaptive-low-pct < --adaptive-high-pct, got "
                         f"{a['adaptive_low_pct']} and {a['adaptive_high_pct']}")
    if a["torch_threads"] not in (None, "auto", "default"):
        if not str(a["torch_threads"]).isdigit() or int(a["torch_threads"]) < 1:
            raise UsageError(f"--torch-threads must be a positive integer, 'auto' or 'default', "
                             f"got {a['torch_threads']!r}")
    if a["trial"] is not None and a["trial"] > a["trials"]:
        raise UsageError(f"--trial {a['trial']} is beyond --trials {a['trials']}")
    if a["engine"] == "generate" and a["batching"] != "off":
        raise UsageError("--engine generate cannot batch: the batching engine runs its own decode loop")
    if a["force"] and a["resume"]:
        raise UsageError("--force and --resume exclude each other")
    if a["output"] is None:
        a["output"] = default_output.format(config=a["config"], concurrency=a["concurrency"])
    if not a["output"].endswith(".csv") or a["output"].endswith("_timeline.csv"):
        raise UsageError(f"--output must name a .csv file not ending in _timeline.csv (its .json and "
                         f"_timeline.csv go beside it), got {a['output']!r}")
    return RunConfig(**a)


def load_prompts(cfg: RunConfig) -> list[str]:
    if cfg.prompts_file is None:
        return list(PROMPTS)
    try:
        with open(cfg.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {cfg.prompts_file}: {getattr(e, 'strerror', None) or e}")
    if not prompts:
        raise UsageError(f"prompts file {cfg.prompts_file} has no prompts")
    return prompts


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


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def environment(engine) -> dict:
    """Facts about the host and software that a reader needs to interpret the numbers."""
    import numpy
    import torch
    import transformers
    cpu_model = next((line.split(":", 1)[1].strip() for line in (_read("/proc/cpuinfo") or "").splitlines()
                      if line.startswith("model name")), platform.processor() or None)
    mem = next((int(line.split()[1]) * 1024 for line in (_read("/proc/meminfo") or "").splitlines()
                if line.startswith("MemTotal:")), None)
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        # the code, not the data: a sweep into results/ changes tracked cells while it runs
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                               ":(exclude)results", ":(exclude)paper.pdf")),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__},
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem,
        "kernel": platform.release(),
        "proc_self_cgroup": (_read("/proc/self/cgroup") or "").splitlines(),
        "model": engine.identity(),
    }


class CgroupProbe:
    """Limits and counters of the cgroup this process runs in. Counters are recorded only when that cgroup was
    made for this run (cgroup_lib.py run marks it): elsewhere they would count other processes too."""

    def __init__(self):
        self._lib = self.info = self.limits = self.error = self.note = None
        try:
            import cgroup_lib
            self.info = cgroup_lib.own_cgroup()
            self.limits = cgroup_lib.read_limits(self.info)
            own = cgroup_lib.own_cell_cgroup(self.info)
        except Exception as e:  # recorded, never fatal
            self.error = f"{type(e).__name__}: {e}"
            return
        if own:
            self._lib = cgroup_lib
        else:
            self.note = (f"no counters: this process does not run in a cgroup made for it by cgroup_lib.py run, so "
                         f"the counters of {self.info.get('cpu')} would include other processes")

    def counters(self) -> dict | None:
        if self._lib is None:
            return None
        try:
            return self._lib.read_counters(self.info)
        except Exception:
            return None

    def describe(self) -> dict:
        return {"info": self.info, "limits": self.limits, "own": self._lib is not None, "note": self.note,
                "error": self.error}


def check_limits(cfg: RunConfig) -> None:
    """A limited configuration must run under a CPU quota; otherwise its cells would be mislabelled."""
    if not CONFIGS[cfg.config]["limited"]:
        return
    try:
        import cgroup_lib
        cores = cgroup_lib.cpu_quota_cores()
    except Exception:
        cores = None
    if cores is None:
        raise UsageError(f"config {cfg.config!r} is limited, but no CPU quota is in force for this process; run it "
                         f"in a sweep (sudo bash run_experiments.sh --configs {cfg.config}) or as: sudo python "
                         f"cgroup_lib.py run --name llm_service -- python request_generator.py --config "
                         f"{cfg.config} ...")


def delta(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    out = {}
    for k, v in after.items():
        b = before.get(k)
        # peaks and high-water marks are levels, not counters
        out[k] = v if ("peak" in k or b is None or v is None) else v - b
    return out


class CsvSink:
    """Appends one row per finished request and flushes, so an interrupted run keeps every finished row.
    The header is written only to a new (or empty) file."""

    def __init__(self, path: str):
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self._f = open(path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        if new:
            self._w.writeheader()
        self._f.flush()
        self._lock = threading.Lock()

    def write(self, row: dict) -> None:
        import pandas as pd
        derived = metrics.derive(pd.DataFrame([row]).reindex(columns=COLUMNS)).iloc[0].to_dict()
        clean = {k: ("" if derived.get(k) is None or (isinstance(derived.get(k), float)
                                                     and math.isnan(derived[k])) else derived[k])
                 for k in COLUMNS}
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

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.csv, self.json, self.timeline = cfg.output, cfg.stem + ".json", cfg.stem + "_timeline.csv"
        self.meta = None      # the existing cell's metadata, when resuming
        self.done = set()     # its finished trials

    def existing(self) -> list[str]:
        return [p for p in (self.csv, self.json, self.timeline) if os.path.exists(p)]

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
            for path in (self.csv, self.timeline):  # drop the rows of unfinished trials
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


def make_admission(cfg: RunConfig):
    if cfg.admission == "none":
        return None
    import psi_admission
    try:
        return psi_admission.build_admission(cfg)
    except psi_admission.PsiUnavailable as e:
        raise UsageError(str(e)) from None


def make_timeline(cfg: RunConfig, trial: int, t0: float, state_fn):
    try:
        import psi_admission
    except ImportError:
        return None
    return psi_admission.TimelineSampler(cfg.stem + "_timeline.csv", cfg.timeline_interval_ms, trial,
                                         state_fn, t0)


class Trial:
    """One trial of a cell: submissions spaced in time, a pool of workers, rows written as they finish."""

    def __init__(self, cfg, engine, prompts, sink, admission, trial, stop, progress):
        self.cfg, self.engine, self.prompts, self.sink = cfg, engine, prompts, sink
        self.admission, self.trial, self.stop, self.progress = admission, trial, stop, progress
        self.lock = threading.Lock()
        self.in_flight = self.waiting = self.peak_in_flight = 0
        self.counts = {s: 0 for s in metrics.STATUSES}
        self.t0 = 0.0  # set by the caller just before run(): the trial's clock origin

    def state(self) -> dict:
        st = {"in_flight": self.in_flight, "waiting": self.waiting}
        if self.admission is not None:
            st.update(self.admission.state())
        if hasattr(self.engine, "state"):
            st.update(self.engine.state())
        return st

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _one(self, rid: int, t_submit: float) -> None:
        cfg = self.cfg
        pid = rid % len(self.prompts)
        prompt = self.prompts[pid]
        row = dict(trial=self.trial, request_id=rid, config=cfg.config, concurrency=cfg.concurrency,
                   prompt_id=pid, prompt_chars=len(prompt), t_submit_s=t_submit, status="ok", error="",
                   gate_decision="none", gate_checks=0, gate_pressure=None)
        row["t_dequeue_s"] = self._now()
        if self.stop.is_set():
            return
        if self.admission is not None:
            with self.lock:
                self.waiting += 1
            try:
                dec = self.admission.admit()
            finally:
                with self.lock:
                    self.waiting -= 1
            row.update(gate_decision=dec.decision, gate_checks=dec.checks, gate_pressure=dec.pressure)
        row["t_admit_s"] = self._now()
        if row["gate_decision"] == "rejected":
            row.update(status="rejected", prompt_tokens=int(self.engine.encode(prompt).shape[1]), output_tokens=0)
            self._finish(row)
            return
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        service_s = None
        try:
            seed = cfg.seed * 1_000_003 + self.trial * 10_007 + rid
            g = self.engine.generate(prompt, cfg.max_new_tokens, seed=seed, stop=self.stop)
            service_s = g.t_end - g.t_start
            row.update(prompt_tokens=g.prompt_tokens, output_tokens=g.output_tokens,
                       t_start_s=g.t_start - self.t0, t_first_token_s=g.t_first_token - self.t0,
                       t_end_s=g.t_end - self.t0)
            if g.output_tokens != cfg.max_new_tokens:
                row.update(status="failed", error=f"generated {g.output_tokens} of {cfg.max_new_tokens} tokens")
        except Exception as e:
            from llm_server import Interrupted
            if isinstance(e, Interrupted):
                return  # an unfinished request of an interrupted run is not a result
            row.update(status="failed", error=f"{type(e).__name__}: {e}"[:300], output_tokens=0)
        finally:
            with self.lock:
                self.in_flight -= 1
            if self.admission is not None:
                self.admission.release(service_s)
        self._finish(row)

    def _finish(self, row: dict) -> None:
        self.sink.write(row)
        with self.lock:
            self.counts[row["status"]] += 1
        self.progress.update(1)

    def run(self) -> None:
        cfg = self.cfg
        pool = cf.ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="worker")
        futures = []
        try:
            for rid in range(cfg.num_requests):
                delay = self.t0 + rid * cfg.spacing_ms / 1000.0 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(self._one, rid, self._now()))
            for fut in cf.as_completed(futures):
                fut.result()
        except BaseException:
            self.stop.set()  # workers abandon their generation at the next token
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


def _summary_line(cfg: RunConfig, trial: int, rows_path: str, wall_s: float, peak: int) -> str:
    import pandas as pd
    df = pd.read_csv(rows_path)
    s = metrics.summarize(df[df["trial"] == trial])
    return (f"[{cfg.config} c={cfg.concurrency} trial {trial}/{cfg.trials}] ok {s['n_ok']} rejected "
            f"{s['n_rejected']} failed {s['n_failed']} | p95 e2e {s['p95_e2e_ms'] / 1000:.2f} s | "
            f"p95 service {s['p95_service_ms'] / 1000:.2f} s | peak in-flight {peak} | {wall_s:.1f} s wall")


class _Terminate(BaseException):
    """SIGTERM, handled like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminate()


def run(cfg: RunConfig) -> int:
    """Run the planned trials of one cell; return the exit status (130 if interrupted)."""
    from llm_server import make_engine
    from tqdm import tqdm
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    prompts = load_prompts(cfg)
    check_output(cfg.output)
    check_limits(cfg)
    cell = CellFiles(cfg)
    todo = cell.plan()
    if not todo:
        print(f"{cfg.output}: trial(s) {cfg.trial or 'all'} already finished; skipped (--resume)", file=sys.stderr)
        return 0
    if not cfg.quiet:  # the JSON beside the CSV always holds it
        print(f"run config: {json.dumps(dataclasses.asdict(cfg))}", file=sys.stderr)
    engine = make_engine(cfg.engine, model=cfg.model, tiny=cfg.tiny, seed=cfg.seed,
                         torch_threads=cfg.torch_threads, temperature=cfg.temperature)
    if cfg.batching != "off":
        import batch_engine
        engine = batch_engine.wrap(engine, cfg)
    admission = make_admission(cfg)  # before any file is written: no PSI here fails cleanly
    probe = CgroupProbe()
    meta = cell.open({"config": dataclasses.asdict(cfg), "argv": sys.argv, "limited": CONFIGS[cfg.config]["limited"],
                      "start_wall": datetime.now(timezone.utc).isoformat(), "environment": environment(engine),
                      "cgroup": probe.describe(), "trials": []})
    sink = CsvSink(cfg.output)
    write_json(cell.json, meta)
    stop = threading.Event()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    status = 0
    try:
        if cfg.warmup:  # excluded from the results: first-call allocations and lazy initialisation
            w0 = time.monotonic()
            engine.generate(prompts[0], cfg.max_new_tokens, seed=cfg.seed)
            meta["warmup_s"] = time.monotonic() - w0
        for n, trial in enumerate(todo):
            if n > 0 and admission is not None:  # trials are independent repeats: a fresh controller
                admission.close()
                admission = make_admission(cfg)
            with tqdm(total=cfg.num_requests, disable=cfg.quiet, file=sys.stderr, unit="req",
                      desc=f"{cfg.config} c={cfg.concurrency} trial {trial}") as bar:
                t = Trial(cfg, engine, prompts, sink, admission, trial, stop, bar)
                before = probe.counters()
                record = {"trial": trial, "started_at": datetime.now(timezone.utc).isoformat(),
                          "run_index": cfg.run_index, "complete": False}
                t.t0 = wall0 = time.monotonic()  # one clock origin for the rows and the timeline
                sampler = make_timeline(cfg, trial, t.t0, t.state)
                if sampler is not None:
                    sampler.start()
                try:
                    t.run()
                    record["complete"] = True
                finally:
                    if sampler is not None:
                        sampler.stop()
                    wall = time.monotonic() - wall0
                    record.update(wall_s=wall, peak_in_flight=t.peak_in_flight, counts=dict(t.counts),
                                  cgroup_delta=delta(before, probe.counters()))
                    meta["trials"] = sorted(meta["trials"] + [record], key=lambda r: r["trial"])
                    write_json(cell.json, meta)
            print(_summary_line(cfg, trial, cfg.output, wall, t.peak_in_flight), file=sys.stderr)
    except (KeyboardInterrupt, _Terminate):
        stop.set()
        meta["interrupted"] = True
        status = 130
        print(f"interrupted: finished rows kept in {cfg.output}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if admission is not None:
            admission.close()
        sink.close()  # flushed to the disk before the cell can be marked complete
        if cfg.batching != "off":
            engine.close()
        meta["end_wall"] = datetime.now(timezone.utc).isoformat()
        meta["counts"] = {s: sum(t["counts"][s] for t in meta["trials"]) for s in metrics.STATUSES}
        meta["peak_in_flight"] = max((t["peak_in_flight"] for t in meta["trials"]), default=0)
        meta["complete"] = cell.is_complete(meta)
        write_json(cell.json, meta)
    return status


def main(argv=None, default_output=DEFAULT_OUTPUT) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) or "request_generator.py"
    try:
        if "--list-configs" in argv:
            for name, preset in CONFIGS.items():
                print(name, "limited" if preset["limited"] else "unlimited")
            return 0
        return run(parse_config(argv, default_output))  # refuses bad input before the model loads
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
