"""Overload by queueing delay: a step of open-loop load past capacity, with no shedding, --max-waiting and
--max-queue-delay-ms, in interleaved trials.

    sudo .venv/bin/python -m bench.overload --force         # under the quota: results/overload/ (~40 min)
    .venv/bin/python -m bench.overload --quick --out /tmp/o # smoke test: tiny model, no quota, seconds
    .venv/bin/python -m bench.overload --report-only        # summary.csv/.md, trials.csv, figure from the files

The service (``llm_server.py serve``, a FIFO limit of one request at a time, as the ``limit1`` config) runs in
a cell under ``cgroup_lib.py run --cpu-quota`` (root; ``--no-quota``: without a cell, labelled ``baseline``).
First its capacity is measured: ``--capacity-clients`` closed-loop clients for ``--capacity-s`` seconds, capacity
= requests done per second, S = the mean service time the server reports; every request of it is written to
``capacity.csv``. Then ``--trials`` trials of every setting, interleaved (trial k of every setting, in a seeded
order, before trial k+1 of any), each on a fresh service with the same Poisson schedule: ``--phases`` of
(multiple of the capacity, seconds), by default 0.7x, 1.5x and 0.7x for 60 s each, sent open loop (each request
at its intended time, whatever the answers), then a drain (no arrivals) until every request has ended.
Settings: ``none`` (no shedding), ``max-waiting`` (``--max-waiting N``, by default round(T / S), at least 1) and
``queue-delay`` (``--max-queue-delay-ms T``, by default 2 S).

Each trial writes ``trials/<setting>_t<k>.csv`` (every request) and ``.json`` (its cell: commit and clean state,
host, counts, ``complete``); ``plan.json`` holds the plan and the run order. The report
(bench/overload_report.py) computes per trial and phase the throughput and goodput (completions ending in the
phase; goodput: TTFT within the SLO, by default T + S) against the capacity and the p50/p99 TTFT of the
admitted requests, timed from their intended send, and over trials their mean with a 95% interval. Refuses to
overwrite an earlier run without ``--force``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

from llm_psi import REPO
from llm_psi.cli import OneLineParser, finite_number
from llm_psi.load import arrivals, runner
from llm_psi.load.cell_files import write_json
from llm_psi.load.environment import environment

from bench import overload_report as report

SETTINGS = ("none", "max-waiting", "queue-delay")
PROMPT = "Explain the theory of relativity."
OUTPUTS = ("plan.json", "capacity.csv", "capacity.json", "trials") + report.OUTPUTS
LEGACY = ("requests.csv",)  # the one-trial run's file, removed by --force
QUICK = dict(tiny=True, no_quota=True, capacity_s=3.0, phases=[(0.7, 3.0), (1.5, 3.0), (0.7, 3.0)],
             max_new_tokens=4, progress_s=1.0)


def parse_phases(text: str) -> list[tuple[float, float]]:
    """'0.7:60,1.5:60' -> [(0.7, 60.0), (1.5, 60.0)]: (multiple of the capacity, seconds)."""
    out = []
    for part in text.split(","):
        try:
            m, d = (float(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"phase {part!r} is not MULTIPLE:SECONDS") from None
        if not (m > 0 and d > 0 and m < 1e6 and d < 1e6):
            raise ValueError(f"phase {part!r}: multiple and seconds must be > 0")
        out.append((m, d))
    return out


class Service:
    """One ``llm_server.py serve`` process (in a cell under the quota unless --no-quota) and its client."""

    def __init__(self, a, setting: str, extra: list[str], log_path: str):
        py = sys.executable
        label = "baseline" if a.no_quota else "limit1"
        cmd = [py, os.path.join(REPO, "llm_server.py"), "serve", "--port", str(a.port), "--config", label,
               "--admission", "limit", "--concurrency-limit", "1", "--torch-threads", "auto", *extra]
        if not a.no_quota:
            cmd = runner.wrap(cmd, True, quota=a.cpu_quota)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd + ["--tiny"] * a.tiny, stdout=self.log, stderr=subprocess.STDOUT)
        from llm_psi.load.http_client import Remote
        import httpx
        try:
            self.remote = Remote(f"http://127.0.0.1:{a.port}", wait_s=600)
        except BaseException:
            self.stop()
            raise
        # a client that never queues on its own side: every open-loop request gets its connection at once
        self.remote.http = httpx.Client(timeout=httpx.Timeout(None, connect=30.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.setting = setting

    def send(self, tokens: int, seed: int):
        """(Outcome, the server's offsets) of one streamed request."""
        return self.remote.send(PROMPT, tokens, seed)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains; cgroup_lib forwards it and removes the cell
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "remote"):
            self.remote.close()
        self.log.close()


def measure_capacity(svc: Service, a) -> list[dict]:
    """Every request of ``a.capacity_clients`` closed-loop clients over ``a.capacity_s`` (report.CAPACITY rows,
    times from the start): capacity and S are computed from them (report.capacity_of)."""
    svc.send(a.max_new_tokens, 0)  # warm-up, not counted
    rows = []
    t0 = time.monotonic()
    lock = threading.Lock()

    def client(k):
        i = 0
        while time.monotonic() - t0 < a.capacity_s:
            t_send = time.monotonic() - t0
            out, srv = svc.send(a.max_new_tokens, 1000 * k + i)
            ok = out.status == "ok"
            row = {"client": k, "index": i, "t_send_s": t_send, "t_end_s": out.t_end - t0 if ok else None,
                   "status": out.status, "service_s": srv["end"] - srv["start"] if ok else None}
            i += 1
            with lock:
                rows.append(row)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(a.capacity_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(rows, key=lambda r: (r["t_send_s"], r["client"]))


def build_schedule(phases, capacity: float, seed: int) -> list[tuple[float, int]]:
    """[(intended send time s from the start, phase index)], Poisson within each phase."""
    out, start = [], 0.0
    for k, (m, d) in enumerate(phases):
        out += [(start + float(t), k) for t in arrivals.schedule("poisson", m * capacity, duration=d, seed=seed + k)]
        start += d
    return out


def run_step(svc: Service, a, schedule, total_s: float, trial: int) -> list[dict]:
    """Send every request at its intended time (open loop), then wait for every answer (the drain); one row
    per request (report.REQUESTS), times from the start."""
    rows, lock = [], threading.Lock()
    pool = cf.ThreadPoolExecutor(max_workers=a.max_in_flight, thread_name_prefix="send")
    t0 = time.monotonic()

    def one(i, t_send, phase):
        out, _ = svc.send(a.max_new_tokens, 10_000 + i)
        row = {"setting": svc.setting, "trial": trial, "phase": phase, "t_send_s": t_send, "status": out.status,
               "decision": out.decision, "error": out.error[:120],
               "ttft_s": None if out.t_first_token is None else out.t_first_token - t0 - t_send,
               "e2e_s": None if out.t_end is None else out.t_end - t0 - t_send,
               "t_end_s": None if out.t_end is None else out.t_end - t0}
        with lock:
            rows.append(row)
    futures, next_report = [], 0.0
    for i, (t_send, phase) in enumerate(schedule):
        delay = t0 + t_send - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(one, i, t_send, phase))
        if t_send >= next_report:
            _progress(svc.setting, t_send, total_s, i + 1, rows, lock)
            next_report = t_send + a.progress_s
    pool.shutdown(wait=True)
    for f in futures:
        f.result()  # a bug in one() surfaces here
    _progress(svc.setting, time.monotonic() - t0, total_s, len(schedule), rows, lock)
    return sorted(rows, key=lambda r: r["t_send_s"])


def _progress(setting, t, total, sent, rows, lock) -> None:
    with lock:
        ok = sum(r["status"] == "ok" for r in rows)
        refused = sum(r["status"] == "rejected" for r in rows)
    print(f"  {setting}: {t:5.0f}/{total:.0f} s, sent {sent}, ok {ok}, refused {refused}", file=sys.stderr,
          flush=True)


def run_order(settings, trials: int, seed: int) -> list[tuple[str, int]]:
    """[(setting, trial)]: trial k of every setting, in an order seeded by (seed, k), before trial k+1."""
    out = []
    for k in range(1, trials + 1):
        names = list(settings)
        random.Random(f"{seed}:{k}").shuffle(names)
        out += [(s, k) for s in names]
    return out


def _cell(a, what: dict, started: float) -> dict:
    """A cell's metadata: what ran, the code's commit and clean state, the host, and when."""
    label = "baseline" if a.no_quota else "limit1"
    return {**what, "argv": sys.argv, "config": label, "cpu_quota_pct": None if a.no_quota else a.cpu_quota,
            "tiny": a.tiny, "max_new_tokens": a.max_new_tokens, "start_wall": started,
            "environment": environment({"served_by": "llm_server.py serve", "config": label, "tiny": a.tiny}),
            "complete": False}


def _counts(rows) -> dict:
    by = lambda st: sum(r["status"] == st for r in rows)  # noqa: E731
    return {"sent": len(rows), "ok": by("ok"), "rejected": by("rejected"), "failed": by("failed"),
            "answered": sum(r["status"] in ("ok", "rejected", "failed") for r in rows)}


def run(a) -> int:
    """Capacity, then every trial of every setting, interleaved, each on a fresh service; the report last."""
    log = lambda name: os.path.join(a.out, "trials", f"server_{name}.log")  # noqa: E731
    os.makedirs(os.path.join(a.out, "trials"), exist_ok=True)
    cell = _cell(a, {"run": "capacity", "clients": a.capacity_clients, "seconds": a.capacity_s}, time.time())
    write_json(os.path.join(a.out, "capacity.json"), cell)
    svc = Service(a, "capacity", [], log("capacity"))
    try:
        rows = measure_capacity(svc, a)
    finally:
        svc.stop()
    report.write_csv(os.path.join(a.out, "capacity.csv"), report.CAPACITY, rows)
    capacity, service_s = report.capacity_of(os.path.join(a.out, "capacity.csv"))
    write_json(os.path.join(a.out, "capacity.json"), {**cell, "counts": _counts(rows), "end_wall": time.time(),
                                                      "complete": True})
    delay_ms = a.max_queue_delay_ms or round(2000 * service_s)
    max_waiting = a.max_waiting or max(1, round(delay_ms / 1000 / service_s))
    slo_s = a.slo_ms / 1000 if a.slo_ms else delay_ms / 1000 + service_s
    order = run_order(a.settings, a.trials, a.seed)
    write_json(os.path.join(a.out, "plan.json"), {
        "phases": a.phases, "settings": a.settings, "trials": a.trials, "seed": a.seed, "order": order,
        "max_queue_delay_ms": delay_ms, "max_waiting": max_waiting, "slo_ttft_s": slo_s})
    print(f"capacity {capacity:.3f} req/s, mean service {service_s:.3f} s; T {delay_ms} ms, max waiting "
          f"{max_waiting}, SLO TTFT {slo_s:.3f} s", file=sys.stderr, flush=True)
    schedule = build_schedule(a.phases, capacity, a.seed)
    total_s = sum(d for _, d in a.phases)
    extra = {"none": [], "max-waiting": ["--max-waiting", str(max_waiting)],
             "queue-delay": ["--max-queue-delay-ms", str(delay_ms)]}
    for n, (setting, k) in enumerate(order, 1):
        print(f"[{n}/{len(order)}] {setting} trial {k}: {len(schedule)} requests over {total_s:.0f} s, then the "
              "drain", file=sys.stderr, flush=True)
        stem = os.path.join(a.out, "trials", f"{setting}_t{k}")
        cell = _cell(a, {"setting": setting, "trial": k, "run_index": n, "phases": a.phases}, time.time())
        write_json(stem + ".json", cell)
        svc = Service(a, setting, extra[setting], log(f"{setting}_t{k}"))
        try:
            svc.send(a.max_new_tokens, 0)  # warm-up, not counted
            rows = run_step(svc, a, schedule, total_s, k)
        finally:
            svc.stop()
        report.write_csv(stem + ".csv", report.REQUESTS, rows)
        counts = _counts(rows)
        write_json(stem + ".json", {**cell, "counts": counts, "end_wall": time.time(),
                                    "complete": counts["answered"] == len(schedule)})
    print(report.report(a.out), end="")
    return 0


def build_parser():
    p = OneLineParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    count = finite_number(int, ge=1)
    p.add_argument("--out", default=os.path.join("results", "overload"), help="output folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite summary.csv, summary.md, trials.csv and overload.png from the folder's files")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, no quota, 3 s capacity, phases 0.7:3,1.5:3,0.7:3, 4 tokens "
                        "(options given explicitly win)")
    p.add_argument("--trials", type=count, default=3, help="trials of every setting (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    p.add_argument("--no-quota", action="store_true", help="run the service without a cell (no root needed)")
    p.add_argument("--cpu-quota", type=finite_number(float, gt=0), default=50.0,
                   help="the cell's CPU quota, percent of one CPU (default: %(default)s)")
    p.add_argument("--phases", type=_phases, default=parse_phases("0.7:60,1.5:60,0.7:60"),
                   help="MULTIPLE:SECONDS,...: the offered load per phase, a multiple of the capacity "
                        "(default: 0.7:60,1.5:60,0.7:60)")
    p.add_argument("--settings", type=_settings, default=list(SETTINGS),
                   help=f"comma-separated subset of {','.join(SETTINGS)} (default: all)")
    p.add_argument("--capacity-s", type=finite_number(float, gt=0), default=60.0,
                   help="duration of the capacity measurement, s (default: %(default)s)")
    p.add_argument("--capacity-clients", type=count, default=4, help="closed-loop clients (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=count, default=50, help="tokens per request (default: %(default)s)")
    p.add_argument("--max-queue-delay-ms", type=finite_number(float, gt=0), default=None,
                   help="T of the queue-delay setting (default: 2 x the measured mean service time)")
    p.add_argument("--max-waiting", type=count, default=None,
                   help="N of the max-waiting setting (default: T / the mean service time, at least 1)")
    p.add_argument("--slo-ms", type=finite_number(float, gt=0), default=None,
                   help="TTFT that counts towards goodput (default: T + the mean service time)")
    p.add_argument("--seed", type=finite_number(int, ge=0), default=0, help="arrival seed (default: %(default)s)")
    p.add_argument("--port", type=finite_number(int, ge=1, le=65535), default=18021, help="(default: %(default)s)")
    p.add_argument("--max-in-flight", type=count, default=1024,
                   help="client threads; requests beyond wait client-side, timed from their intended send "
                        "(default: %(default)s)")
    p.add_argument("--progress-s", type=finite_number(float, gt=0), default=10.0,
                   help="progress line interval, s of the schedule (default: %(default)s)")
    return p


def _phases(text):
    try:
        return parse_phases(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _settings(text):
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SETTINGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown setting(s) {bad}; choose from {', '.join(SETTINGS)}")
    return names


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.report_only:
        try:
            print(report.report(a.out), end="")
        except (OSError, ValueError, KeyError) as e:
            print(f"python -m bench.overload: error: cannot report {a.out}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0
    if a.quick:  # the smoke test's values, where the options were left at their defaults
        for k, v in QUICK.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    if not a.no_quota and os.geteuid() != 0:
        p.error("the quota cell needs root (sudo .venv/bin/python -m bench.overload), or pass --no-quota")
    existing = [f for f in OUTPUTS + LEGACY if os.path.exists(os.path.join(a.out, f))]
    if existing and not a.force:
        p.error(f"{a.out} already holds {', '.join(existing)}; pass --force to replace them")
    for f in existing:
        path = os.path.join(a.out, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(a.out, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(a)
    except KeyboardInterrupt:
        print("python -m bench.overload: interrupted; the trials written so far are marked complete or not in "
              "their JSON", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, ValueError) as e:
        print(f"python -m bench.overload: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
