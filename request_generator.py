"""The paper's load: a closed-loop thread pool of C workers sending N prompts, one CSV row per request.

    python request_generator.py --config baseline --concurrency 8 --num-requests 20 --output results/baseline_c8.csv

The run records raw timestamps only (seconds since the trial began, monotonic clock); the derived columns
come from ``metrics.derive``. Rows are appended and flushed as requests finish, so an interrupted run keeps
every finished row. A metadata JSON with the same stem holds the frozen run config, the environment, the
cgroup limits and counters, and the counts.
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
    output: str = "results/baseline_c1.csv"
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

    @property
    def stem(self) -> str:
        return os.path.splitext(self.output)[0]


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=os.path.basename(sys.argv[0]) or "request_generator.py",
                description="Send concurrent prompts to the in-process GPT-2 engine; one CSV row per request.")
    d = RunConfig()
    p.add_argument("--config", default=d.config, help="cell label: " + ", ".join(CONFIGS))
    p.add_argument("--concurrency", type=int, default=None, help="worker threads (closed loop)")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--spacing-ms", type=float, default=None, help="time between submissions")
    p.add_argument("--max-new-tokens", type=int, default=None, help="exact tokens per request")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="weight init and sampling seed")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--output", default=None, help="CSV path (metadata JSON beside it)")
    p.add_argument("--prompts", dest="prompts_file", default=None, help="file with one prompt per line")
    p.add_argument("--model", default=None, help="pretrained weights: local path or hub id")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    p.add_argument("--torch-threads", default=None, help="N, 'auto' (= the cgroup's CPU quota) or default")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log every admission decision")
    p.add_argument("--admission", choices=["none", "gate", "limit", "adaptive"], default=None)
    p.add_argument("--concurrency-limit", type=int, default=None)
    p.add_argument("--psi-threshold", type=float, default=None, help="percent")
    p.add_argument("--psi-interval-ms", type=float, default=None)
    p.add_argument("--psi-max-checks", type=int, default=None)
    p.add_argument("--on-timeout", choices=["admit", "reject"], default=None)
    p.add_argument("--psi-source", choices=["system", "cgroup"], default=None)
    p.add_argument("--psi-signal", choices=["avg10", "total"], default=None)
    p.add_argument("--psi-mode", choices=["poll", "trigger"], default=None)
    p.add_argument("--psi-policy", choices=["gate", "adaptive"], default=None,
                   help="the pressure-driven admission: the paper's gate or the adaptive limit (= --admission)")
    p.add_argument("--adaptive-low-pct", type=float, default=None)
    p.add_argument("--adaptive-high-pct", type=float, default=None)
    p.add_argument("--adaptive-tolerance", type=float, default=None)
    p.add_argument("--timeline-interval-ms", type=float, default=None)
    p.add_argument("--batching", choices=["off", "dynamic"], default=None)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--list-configs", action="store_true", help="print 'name limited|unlimited' and exit")
    return p


def parse_config(argv, default_output="results/{config}_c{concurrency}.csv") -> RunConfig:
    """argv -> validated, frozen RunConfig. Raises UsageError with a one-line message."""
    a = vars(build_parser().parse_args(argv))
    a.pop("list_configs")
    policy = a.pop("psi_policy")
    if policy is not None and a["admission"] is None:
        a["admission"] = policy
    if a["config"] not in CONFIGS:
        raise UsageError(f"unknown config {a['config']!r} (choose from {', '.join(CONFIGS)})")
    preset = {k: v for k, v in CONFIGS[a["config"]].items() if k != "limited"}
    for key, value in preset.items():
        if a.get(key) is None:
            a[key] = value
    defaults = RunConfig()
    for key, value in a.items():  # not given and not preset: the RunConfig default
        if value is None and key != "output":
            a[key] = getattr(defaults, key)
    for key in ("concurrency", "num_requests", "max_new_tokens", "trials", "psi_max_checks",
                "concurrency_limit", "max_batch"):
        if a[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {a[key]}")
    for key in ("spacing_ms", "psi_interval_ms"):
        if not (a[key] >= 0 and math.isfinite(a[key])):
            raise UsageError(f"--{key.replace('_', '-')} must be a finite number >= 0, got {a[key]}")
    if not 0 <= a["adaptive_low_pct"] < a["adaptive_high_pct"] <= 100:
        raise UsageError(f"need 0 <= --adaptive-low-pct < --adaptive-high-pct <= 100, got "
                         f"{a['adaptive_low_pct']} and {a['adaptive_high_pct']}")
    if not a["adaptive_tolerance"] > 1:
        raise UsageError(f"--adaptive-tolerance must be > 1, got {a['adaptive_tolerance']}")
    if not a["temperature"] > 0:
        raise UsageError(f"--temperature must be > 0, got {a['temperature']}")
    if not a["timeline_interval_ms"] > 0:
        raise UsageError(f"--timeline-interval-ms must be > 0, got {a['timeline_interval_ms']}")
    if a["torch_threads"] not in (None, "auto", "default"):
        if not str(a["torch_threads"]).isdigit() or int(a["torch_threads"]) < 1:
            raise UsageError(f"--torch-threads must be a positive integer, 'auto' or 'default', "
                             f"got {a['torch_threads']!r}")
    if a["output"] is None:
        a["output"] = default_output.format(config=a["config"], concurrency=a["concurrency"])
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
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__},
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem,
        "kernel": platform.release(),
        "proc_self_cgroup": (_read("/proc/self/cgroup") or "").splitlines(),
        "model": engine.identity(),
    }


class CgroupProbe:
    """Limits and counters of the cgroup this process runs in (nothing when cgroup_lib can't tell)."""

    def __init__(self):
        try:
            import cgroup_lib
            self._lib = cgroup_lib
            self.info = cgroup_lib.own_cgroup()
            self.limits = cgroup_lib.read_limits(self.info)
        except Exception as e:  # recorded, never fatal: the baseline runs without a cgroup of its own
            self._lib, self.info, self.limits, self.error = None, None, None, f"{type(e).__name__}: {e}"
        else:
            self.error = None

    def counters(self) -> dict | None:
        if self._lib is None:
            return None
        try:
            return self._lib.read_counters(self.info)
        except Exception:
            return None

    def describe(self) -> dict:
        return {"info": self.info, "limits": self.limits, "error": self.error}


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
    """Appends one row per finished request and flushes, so an interrupted run keeps every finished row."""

    def __init__(self, path: str):
        self._f = open(path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
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
        self._f.close()


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
    """Run every trial of one cell; return the exit status (130 if interrupted)."""
    from llm_server import Engine
    from tqdm import tqdm
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    prompts = load_prompts(cfg)
    check_output(cfg.output)
    meta_path = cfg.stem + ".json"
    if not cfg.quiet:  # the JSON beside the CSV always holds it
        print(f"run config: {json.dumps(dataclasses.asdict(cfg))}", file=sys.stderr)
    engine = Engine(model=cfg.model, tiny=cfg.tiny, seed=cfg.seed, torch_threads=cfg.torch_threads,
                    temperature=cfg.temperature)
    if cfg.batching != "off":
        import batch_engine
        engine = batch_engine.wrap(engine, cfg)
    admission = make_admission(cfg)  # before any file is written: no PSI here fails cleanly
    probe = CgroupProbe()
    meta = {"config": dataclasses.asdict(cfg), "argv": sys.argv, "limited": CONFIGS[cfg.config]["limited"],
            "start_wall": datetime.now(timezone.utc).isoformat(), "environment": environment(engine),
            "cgroup": probe.describe(), "trials": [], "interrupted": False}
    timeline = cfg.stem + "_timeline.csv"
    if os.path.exists(timeline):
        os.remove(timeline)
    sink = CsvSink(cfg.output)
    write_json(meta_path, meta)
    stop = threading.Event()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    status = 0
    try:
        if cfg.warmup:  # excluded from the results: first-call allocations and lazy initialisation
            w0 = time.monotonic()
            engine.generate(prompts[0], cfg.max_new_tokens, seed=cfg.seed)
            meta["warmup_s"] = time.monotonic() - w0
        for trial in range(1, cfg.trials + 1):
            if trial > 1 and admission is not None:  # trials are independent repeats: a fresh controller
                admission.close()
                admission = make_admission(cfg)
            with tqdm(total=cfg.num_requests, disable=cfg.quiet, file=sys.stderr, unit="req",
                      desc=f"{cfg.config} c={cfg.concurrency} trial {trial}") as bar:
                t = Trial(cfg, engine, prompts, sink, admission, trial, stop, bar)
                before = probe.counters()
                t.t0 = wall0 = time.monotonic()  # one clock origin for the rows and the timeline
                sampler = make_timeline(cfg, trial, t.t0, t.state)
                if sampler is not None:
                    sampler.start()
                try:
                    t.run()
                finally:
                    if sampler is not None:
                        sampler.stop()
                    wall = time.monotonic() - wall0
                    meta["trials"].append({"trial": trial, "wall_s": wall, "peak_in_flight": t.peak_in_flight,
                                           "counts": dict(t.counts), "cgroup_delta": delta(before, probe.counters())})
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
        sink.close()
        if cfg.batching != "off":
            engine.close()
        meta["end_wall"] = datetime.now(timezone.utc).isoformat()
        meta["counts"] = {s: sum(t["counts"][s] for t in meta["trials"]) for s in metrics.STATUSES}
        meta["peak_in_flight"] = max((t["peak_in_flight"] for t in meta["trials"]), default=0)
        write_json(meta_path, meta)
    return status


def main(argv=None, default_output="results/{config}_c{concurrency}.csv") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) or "request_generator.py"
    try:
        if "--list-configs" in argv:
            for name, preset in CONFIGS.items():
                print(name, "limited" if preset["limited"] else "unlimited")
            return 0
        cfg = parse_config(argv, default_output)
        load_prompts(cfg)
        check_output(cfg.output)
        return run(cfg)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
