"""The load: N prompts sent to the service, one CSV row per request.

    python request_generator.py --config baseline --concurrency 8 --num-requests 20   # -> runs/baseline_c8.csv
    python request_generator.py --target http://127.0.0.1:8000 --config cgroups ...  # a running llm_server.py serve
    python request_generator.py --arrival poisson --rate 0.2 --num-requests 20 ...   # open loop

Load shapes: the paper's closed loop (default): C workers, submissions --spacing-ms apart, a worker takes the
next request when it is free; or open loop (``--arrival constant|poisson|gamma``): a schedule of absolute send
times drawn up front from --seed (arrivals.py), each request sent at its time whatever is in flight
(``--max-concurrency`` caps it), its intended time recorded as t_intended_s.

Clients only submit and record: in-process, the rows come from ``service.Service.submit`` (the one request
lifecycle); with ``--target URL`` from the HTTP service of ``llm_server.py serve``, timed at the client
(t_submit, first streamed token, last token), with the server's admission and start offsets (srv_*_s, seconds
after the request reached the server) placed on the client's clock at the request's send time.

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

from llm_psi import config as configs
from llm_psi.load import cotenant
from llm_psi.analysis import metrics
from llm_psi.load.cell_files import COLUMNS, DEFAULT_OUTPUT, PER_RUN_KEYS, CellFiles, CsvSink, check_output, write_json  # noqa: F401
from llm_psi.cgroups import CgroupProbe, counter_delta
from llm_psi import cli
from llm_psi.cli import UsageError, finite_number, option
from llm_psi.config import ARRIVALS, CONFIGS, PROMPTS, RunConfig, ServiceConfig, service_config  # noqa: F401
from llm_psi.service.lifecycle import Service
from llm_psi.service import lifecycle as service
from llm_psi import REPO

HERE = REPO  # the repository root: the root scripts, reference/, results/




COUNT = finite_number(int, ge=1)              # a positive integer
INDEX = finite_number(int, ge=0)
DURATION_MS = finite_number(float, gt=0)


def _opt(group, *flags, **kw):
    return option(group, RunConfig, *flags, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = cli.OptionParser(prog=os.path.basename(sys.argv[0]) or "request_generator.py",
                description="Send concurrent prompts to the in-process GPT-2 engine; one CSV row per request. "
                            "Defaults are the paper's; a --config label presets the options it names "
                            "(--list-configs), and an explicit option wins over the preset.")
    g = p.add_argument_group("cell")
    cli.add_config_option(g)
    _opt(g, "--concurrency", type=COUNT, help="worker threads (closed loop); the cell's c")
    _opt(g, "--num-requests", type=COUNT, help="requests per trial")
    _opt(g, "--spacing-ms", type=finite_number(float, ge=0), help="closed loop: time between submissions")
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
    g = p.add_argument_group(
        "open loop", "--arrival constant|poisson|gamma sends request i at its intended time t_i, drawn up front "
        "from --seed: gaps 1/R (constant), exponential with mean 1/R (poisson), gamma with shape B and mean 1/R "
        "(gamma; B < 1 is burstier); the first at 0. Nothing waits for a free worker unless --max-concurrency.")
    _opt(g, "--arrival", choices=ARRIVALS, help="closed: the paper's closed loop")
    _opt(g, "--rate", type=finite_number(float, gt=0), help="R, requests per second (open loop)")
    _opt(g, "--burstiness", type=finite_number(float, gt=0), help="B, the gamma shape (1 = Poisson)")
    _opt(g, "--duration", type=finite_number(float, gt=0),
         help="seconds of arrivals instead of --num-requests (open loop)")
    _opt(g, "--max-concurrency", type=COUNT, help="cap on requests in flight (open loop; None: no cap)")
    _opt(g, "--slo", help="'ttft:MS,e2e:MS,...': goodput = ok requests per second meeting every bound")
    g = p.add_argument_group("service", "in-process (default) or a running `llm_server.py serve` at --target")
    g.add_argument("--target", default=None,
                   help="http://HOST:PORT of a running service; its --config must match this cell's label")
    _opt(g, "--wait-ready-s", type=finite_number(float, ge=0),
         help="with --target: wait up to this long for the service's /health to say ready")
    g = p.add_argument_group("co-tenant", "other work on the host, in a sibling cgroup of its own, started after "
                                          "the warm-up; its throughput is sampled every second")
    _opt(g, "--antagonist", help="cpu:N built-in CPU burner processes, or a command such as 'stress-ng --cpu 2'")
    _opt(g, "--antagonist-quota", type=finite_number(float, gt=0),
         help="its CPU quota, percent of one CPU (None: unlimited)")
    g = p.add_argument_group("requests")
    _opt(g, "--max-new-tokens", type=COUNT, help="exact tokens per request")
    g.add_argument("--prompts", dest="prompts_file", default=None, help="file with one prompt per line "
                                                                        "(default: 10 built-in prompts)")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up request")
    cli.add_service_options(p, RunConfig)
    return p


def parse_config(argv, default_output=DEFAULT_OUTPUT) -> RunConfig:
    """argv -> validated, frozen RunConfig. Raises UsageError with a one-line message.
    Precedence: an explicit option, then the --config preset, then the RunConfig default."""
    a = vars(build_parser().parse_args(argv))
    a.pop("list_configs")
    cli.resolve(a, RunConfig, keep_none=("output", "trial", "run_index", "adaptive_max"))
    if a["trial"] is not None and a["trial"] > a["trials"]:
        raise UsageError(f"--trial {a['trial']} is beyond --trials {a['trials']}")
    if a["force"] and a["resume"]:
        raise UsageError("--force and --resume exclude each other")
    if a["adaptive_max"] is None:
        a["adaptive_max"] = a["concurrency"]
    _check_load(a)
    if a["output"] is None:
        a["output"] = default_output.format(config=a["config"], concurrency=a["concurrency"])
    if not a["output"].endswith(".csv") or a["output"].endswith("_timeline.csv"):
        raise UsageError(f"--output must name a .csv file not ending in _timeline.csv (its .json and "
                         f"_timeline.csv go beside it), got {a['output']!r}")
    return RunConfig(**a)


def _check_load(a: dict) -> None:
    """Open-loop options only with an open-loop arrival, and what it needs; a well-formed --slo and --target."""
    from llm_psi.load import arrivals
    open_loop = a["arrival"] != "closed"
    if open_loop and a["rate"] is None:
        raise UsageError(f"--arrival {a['arrival']} needs --rate (requests per second)")
    for key in ("rate", "duration", "max_concurrency"):
        if not open_loop and a[key] is not None:
            raise UsageError(f"--{key.replace('_', '-')} applies to an open loop (--arrival constant|poisson|gamma)")
    if a["burstiness"] != 1.0 and a["arrival"] != "gamma":
        raise UsageError("--burstiness applies to --arrival gamma")
    for key, check in (("slo", arrivals.parse_slo), ("antagonist", cotenant.parse_spec)):
        if a[key] is not None:
            try:
                check(a[key])
            except ValueError as e:
                raise UsageError(f"--{key}: {e}") from None
    if a["antagonist"] is None and a["antagonist_quota"] is not None:
        raise UsageError("--antagonist-quota needs --antagonist")
    if a["target"] is not None:
        from urllib.parse import urlparse
        u = urlparse(a["target"])
        if u.scheme not in ("http", "https") or not u.netloc:
            raise UsageError(f"--target must be http://HOST:PORT, got {a['target']!r}")


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


def environment(identity: dict) -> dict:
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
        "model": identity,
    }


def make_timeline(cfg: RunConfig, trial: int, t0: float, state_fn):
    from llm_psi.service.telemetry import TimelineSampler
    return TimelineSampler(cfg.stem + "_timeline.csv", cfg.timeline_interval_ms, trial, state_fn, t0)


class InProcess:
    """The client of an in-process Service: its Outcome, on this process's clock."""

    def __init__(self, svc: Service):
        self.service = svc

    def send(self, prompt, max_tokens, seed, stop):
        return self.service.submit(prompt, max_tokens, seed=seed, stop=stop), None

    def state(self) -> dict:
        return self.service.state()


class Trial:
    """One trial of a cell: requests sent on the load's schedule (closed or open loop) to the client, rows
    written as they finish."""

    def __init__(self, cfg, client, prompts, sink, trial, stop, progress, times):
        self.cfg, self.client, self.prompts, self.sink = cfg, client, prompts, sink
        self.trial, self.stop, self.progress, self.times = trial, stop, progress, times
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = 0
        self.counts = {s: 0 for s in metrics.STATUSES}
        self.t0 = 0.0  # set by the caller just before run(): the trial's clock origin
        self.tenant = None  # the co-tenant, whose cumulative work goes into the timeline

    def state(self) -> dict:
        st = {"in_flight": self.in_flight, **(self.client.state() or {})}
        if self.tenant is not None:
            st.update(cotenant_units=self.tenant.units(), cotenant_cpu_s=self.tenant.cpu_usage_s())
        return st

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _one(self, rid: int, t_submit: float) -> None:
        cfg = self.cfg
        pid = rid % len(self.prompts)
        prompt = self.prompts[pid]
        row = dict(trial=self.trial, request_id=rid, config=cfg.config, concurrency=cfg.concurrency,
                   prompt_id=pid, prompt_chars=len(prompt), t_submit_s=t_submit, t_dequeue_s=self._now(),
                   t_intended_s=self.times[rid] if cfg.arrival != "closed" else None)
        if self.stop.is_set():
            return
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            seed = metrics.request_seed(cfg.seed, self.trial, rid)
            out, srv = self.client.send(prompt, cfg.max_new_tokens, seed, self.stop)
        except Exception as e:
            if isinstance(e, service.Interrupted) or self.stop.is_set():
                return  # an unfinished request of an interrupted run is not a result
            raise
        finally:
            with self.lock:
                self.in_flight -= 1
        rel = lambda t: None if t is None else t - self.t0  # noqa: E731
        row.update(status=out.status, error=out.error, prompt_tokens=out.prompt_tokens,
                   output_tokens=out.output_tokens, gate_decision=out.decision, gate_checks=out.checks,
                   gate_pressure=out.pressure, t_admit_s=rel(out.t_admit), t_start_s=rel(out.t_start),
                   t_first_token_s=rel(out.t_first_token), t_end_s=rel(out.t_end))
        if srv:
            row.update({f"srv_{k}_s": v for k, v in srv.items()})
        self.sink.write(row)
        with self.lock:
            self.counts[row["status"]] += 1
        self.progress.update(1)

    def run(self) -> None:
        """Send request i at t0 + times[i] into a pool: C workers (closed loop: a request waits for a free
        worker) or one per request up to --max-concurrency (open loop)."""
        cfg = self.cfg
        workers = cfg.concurrency if cfg.arrival == "closed" else (cfg.max_concurrency or len(self.times))
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="worker")
        futures = []
        try:
            for rid, t in enumerate(self.times):
                delay = self.t0 + t - time.monotonic()
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


def send_times(cfg: RunConfig, trial: int) -> list[float]:
    """Intended send times (s after the trial's start): the closed loop's spacing, or the open loop's
    schedule drawn from the seed and the trial (each trial its own draw, repeatable)."""
    if cfg.arrival == "closed":
        return [i * cfg.spacing_ms / 1000.0 for i in range(cfg.num_requests)]
    from llm_psi.load import arrivals
    n = None if cfg.duration is not None else cfg.num_requests
    return list(arrivals.schedule(cfg.arrival, cfg.rate, n=n, duration=cfg.duration, burstiness=cfg.burstiness,
                                  seed=metrics.schedule_seed(cfg.seed, trial)))


def _summary_line(cfg: RunConfig, trial: int, rows_path: str, wall_s: float, peak: int) -> str:
    import pandas as pd
    df = pd.read_csv(rows_path)
    s = metrics.summarize(df[df["trial"] == trial], slo=_slo(cfg))
    line = (f"[{cfg.config} c={cfg.concurrency} trial {trial}/{cfg.trials}] ok {s['n_ok']} rejected "
            f"{s['n_rejected']} failed {s['n_failed']} | p95 e2e {s['p95_e2e_ms'] / 1000:.2f} s | "
            f"p95 service {s['p95_service_ms'] / 1000:.2f} s | peak in-flight {peak} | {wall_s:.1f} s wall")
    if cfg.arrival != "closed":
        line += f" | p95 lateness {s.get('p95_lateness_ms', math.nan):.1f} ms"
    if cfg.slo:
        line += f" | goodput {s['goodput_rps']:.3f} req/s"
    return line


def _slo(cfg: RunConfig):
    if not cfg.slo:
        return None
    from llm_psi.load import arrivals
    return arrivals.parse_slo(cfg.slo)


class _Terminate(BaseException):
    """SIGTERM, handled like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminate()


def cotenant_summary(rows: list[dict]) -> dict:
    """The co-tenant's throughput during a trial: its per-second samples and their mean."""
    rates = [r["units_per_s"] for r in rows if r.get("units_per_s") is not None]
    shares = [r["cpu_share"] for r in rows if r.get("cpu_share") is not None]
    return {"mean_units_per_s": sum(rates) / len(rates) if rates else None,
            "mean_cpu_share": sum(shares) / len(shares) if shares else None, "per_second": rows}


def _open_service(cfg: RunConfig):
    """(client, engine identity, service description) for the cell: an in-process Service, or the remote one."""
    if cfg.target is not None:
        from llm_psi.load import http_client
        try:
            client = http_client.Remote(cfg.target, cfg.config, wait_s=cfg.wait_ready_s)
        except http_client.RemoteError as e:
            raise UsageError(str(e)) from None
        return client, client.info["service"]["model"], client
    try:
        svc = Service.start(service_config(cfg))
    except Exception as e:
        if isinstance(e, service.PsiUnavailable):
            raise UsageError(str(e)) from None
        raise
    return InProcess(svc), svc.engine.identity(), svc


def run(cfg: RunConfig) -> int:
    """Run the planned trials of one cell; return the exit status (130 if interrupted)."""
    from tqdm import tqdm
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    prompts = load_prompts(cfg)
    check_output(cfg.output)
    if cfg.target is None:
        service.check_limits(cfg.config)
    cell = CellFiles(cfg)
    todo = cell.plan()
    if not todo:
        print(f"{cfg.output}: trial(s) {cfg.trial or 'all'} already finished; skipped (--resume)", file=sys.stderr)
        return 0
    if not cfg.quiet:  # the JSON beside the CSV always holds it
        print(f"run config: {json.dumps(dataclasses.asdict(cfg))}", file=sys.stderr)
    client, identity, svc = _open_service(cfg)  # before any file is written: no PSI here fails cleanly
    probe = CgroupProbe() if cfg.target is None else client
    meta = cell.open({"config": dataclasses.asdict(cfg), "argv": sys.argv, "limited": configs.is_limited(cfg.config),
                      "mode": "in-process" if cfg.target is None else "service",
                      "start_wall": datetime.now(timezone.utc).isoformat(), "environment": environment(identity),
                      "cgroup": probe.describe(), "trials": []})
    if cfg.target is not None:
        meta["service"] = client.info
    sink = CsvSink(cfg.output)
    write_json(cell.json, meta)
    stop = threading.Event()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    status = 0
    tenant = None
    try:
        if cfg.warmup:  # excluded from the results: first-call allocations and lazy initialisation
            w0 = time.monotonic()
            client.send(prompts[0], cfg.max_new_tokens, cfg.seed, None)
            meta["warmup_s"] = time.monotonic() - w0
        if cfg.antagonist is not None:  # after the warm-up: the co-tenant shares the measured trials only
            tenant = cotenant.Cotenant(cfg.antagonist, quota_pct=cfg.antagonist_quota,
                                       log=lambda m: print(m, file=sys.stderr))
            tenant.start()
            meta["cotenant"] = tenant.describe()
            write_json(cell.json, meta)
        for n, trial in enumerate(todo):
            if n > 0 and cfg.target is None:  # trials are independent repeats: a fresh controller
                svc.renew_admission()
            times = send_times(cfg, trial)
            with tqdm(total=len(times), disable=cfg.quiet, file=sys.stderr, unit="req",
                      desc=f"{cfg.config} c={cfg.concurrency} trial {trial}") as bar:
                t = Trial(cfg, client, prompts, sink, trial, stop, bar, times)
                t.tenant = tenant
                before = probe.counters()
                record = {"trial": trial, "started_at": datetime.now(timezone.utc).isoformat(),
                          "run_index": cfg.run_index, "complete": False, "requests": len(times)}
                t.t0 = wall0 = time.monotonic()  # one clock origin for the rows and the timeline
                sampler = make_timeline(cfg, trial, t.t0, t.state)
                tenant_rate = cotenant.ThroughputSampler(tenant, t0=t.t0) if tenant is not None else None
                sampler.start()
                if tenant_rate is not None:
                    tenant_rate.start()
                try:
                    t.run()
                    record["complete"] = True
                finally:
                    sampler.stop()
                    wall = time.monotonic() - wall0
                    if tenant_rate is not None:
                        record["cotenant"] = cotenant_summary(tenant_rate.stop())
                    after = probe.counters()
                    record.update(wall_s=wall, peak_in_flight=t.peak_in_flight, counts=dict(t.counts),
                                  cgroup_delta=counter_delta(before, after))
                    if cfg.target is None:
                        record["service_counts"] = dict(svc.counts)
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
        if tenant is not None:
            tenant.stop()
        if cfg.target is None:
            svc.close()
        else:
            client.close()
        sink.close()  # flushed to the disk before the cell can be marked complete
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
