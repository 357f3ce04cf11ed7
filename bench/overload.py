"""Overload by queueing delay: a step of open-loop load past capacity, with no shedding, --max-waiting and
--max-queue-delay-ms.

    sudo .venv/bin/python -m bench.overload                 # under the quota: results/overload/
    .venv/bin/python -m bench.overload --tiny --no-quota --capacity-s 5 --phases 0.7:5,1.5:5,0.7:5 --out /tmp/o

The service (``llm_server.py serve``, a FIFO limit of one request at a time, as the ``limit1`` config) runs in
a cell under ``cgroup_lib.py run --cpu-quota`` (root; ``--no-quota``: without a cell, labelled ``baseline``).
First its capacity is measured: ``--capacity-clients`` closed-loop clients for ``--capacity-s`` seconds, capacity
= requests done per second, S = the mean service time the server reports. Then, for each setting, a fresh
service takes the same Poisson schedule: ``--phases`` of (multiple of the capacity, seconds), by default 0.7x
for 60 s, 1.5x for 60 s and 0.7x for 60 s, sent open loop (each request at its intended time, whatever the
answers). Settings: ``none`` (no shedding), ``max-waiting`` (``--max-waiting N``, by default round(T / S), at
least 1) and ``queue-delay`` (``--max-queue-delay-ms T``, by default 2 S).

Per setting and phase: the offered rate, requests sent, done (ok), refused (503) and failed, the throughput
(ok completions in the phase per second), the goodput (those whose TTFT met the SLO, by default T + S) and
both against the capacity, and the p50/p99 TTFT of the admitted requests, timed from their intended send.
Writes ``summary.csv``, ``requests.csv`` (every request), ``summary.md``, ``overload.png`` and the servers' logs;
refuses to overwrite them without ``--force``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import os
import signal
import subprocess
import sys
import threading
import time

from llm_psi import REPO
from llm_psi.analysis import metrics
from llm_psi.cli import OneLineParser, finite_number
from llm_psi.load import arrivals, runner

SETTINGS = ("none", "max-waiting", "queue-delay")
PROMPT = "Explain the theory of relativity."
SUMMARY = ["setting", "phase", "multiple", "duration_s", "offered_rps", "sent", "ok", "refused", "failed",
           "throughput_rps", "goodput_rps", "throughput_ratio", "goodput_ratio", "p50_ttft_s", "p99_ttft_s",
           "slo_ttft_s", "capacity_rps", "service_s", "max_waiting", "max_queue_delay_ms"]
REQUESTS = ["setting", "phase", "t_send_s", "status", "decision", "ttft_s", "e2e_s", "t_end_s", "error"]
OUTPUTS = ("summary.csv", "requests.csv", "summary.md", "overload.png")


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


def measure_capacity(svc: Service, a) -> tuple[float, float]:
    """(requests per second, mean service time s) from closed-loop clients over ``a.capacity_s``."""
    svc.send(a.max_new_tokens, 0)  # warm-up, not counted
    done, service = [], []
    t0 = time.monotonic()
    lock = threading.Lock()

    def client(k):
        i = 0
        while time.monotonic() - t0 < a.capacity_s:
            out, srv = svc.send(a.max_new_tokens, 1000 * k + i)
            i += 1
            with lock:
                if out.status == "ok":
                    done.append(out.t_end)
                    service.append(srv["end"] - srv["start"])
    threads = [threading.Thread(target=client, args=(k,)) for k in range(a.capacity_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(done) < 2:
        raise RuntimeError(f"capacity: only {len(done)} requests finished in {a.capacity_s} s; raise --capacity-s")
    return len(done) / (max(done) - t0), sum(service) / len(service)


def build_schedule(phases, capacity: float, seed: int) -> list[tuple[float, int]]:
    """[(intended send time s from the start, phase index)], Poisson within each phase."""
    out, start = [], 0.0
    for k, (m, d) in enumerate(phases):
        out += [(start + float(t), k) for t in arrivals.schedule("poisson", m * capacity, duration=d, seed=seed + k)]
        start += d
    return out


def run_step(svc: Service, a, schedule, total_s: float) -> list[dict]:
    """Send every request at its intended time (open loop); one row per request, times from the start."""
    rows, lock = [], threading.Lock()
    pool = cf.ThreadPoolExecutor(max_workers=a.max_in_flight, thread_name_prefix="send")
    t0 = time.monotonic()

    def one(i, t_send, phase):
        out, _ = svc.send(a.max_new_tokens, 10_000 + i)
        row = {"setting": svc.setting, "phase": phase, "t_send_s": t_send, "status": out.status,
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
    _progress(svc.setting, total_s, total_s, len(schedule), rows, lock)
    return sorted(rows, key=lambda r: r["t_send_s"])


def _progress(setting, t, total, sent, rows, lock) -> None:
    with lock:
        ok = sum(r["status"] == "ok" for r in rows)
        refused = sum(r["status"] == "rejected" for r in rows)
    print(f"  {setting}: {t:5.0f}/{total:.0f} s, sent {sent}, ok {ok}, refused {refused}", file=sys.stderr,
          flush=True)


def summarize(rows, phases, capacity, service_s, slo_s, knobs) -> list[dict]:
    """One row per phase: throughput and goodput by completion time within the phase, TTFT by send time."""
    out, start = [], 0.0
    for k, (m, d) in enumerate(phases):
        sent = [r for r in rows if r["phase"] == k]
        ok_sent = [r for r in sent if r["status"] == "ok"]
        done = [r for r in rows if r["status"] == "ok" and start <= r["t_end_s"] < start + d]
        good = [r for r in done if r["ttft_s"] <= slo_s]
        ttft = [r["ttft_s"] for r in ok_sent]
        out.append({"setting": rows[0]["setting"] if rows else "", "phase": k, "multiple": m, "duration_s": d,
                    "offered_rps": round(len(sent) / d, 4), "sent": len(sent), "ok": len(ok_sent),
                    "refused": sum(r["status"] == "rejected" for r in sent),
                    "failed": sum(r["status"] == "failed" for r in sent),
                    "throughput_rps": round(len(done) / d, 4), "goodput_rps": round(len(good) / d, 4),
                    "throughput_ratio": round(len(done) / d / capacity, 3),
                    "goodput_ratio": round(len(good) / d / capacity, 3),
                    "p50_ttft_s": round(metrics.percentile(ttft, 50), 3),
                    "p99_ttft_s": round(metrics.percentile(ttft, 99), 3), "slo_ttft_s": round(slo_s, 3),
                    "capacity_rps": round(capacity, 4), "service_s": round(service_s, 4), **knobs})
        start += d
    return out


def write_outputs(out_dir, summary, requests, phases) -> None:
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, SUMMARY)
        w.writeheader()
        w.writerows(summary)
    with open(os.path.join(out_dir, "requests.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, REQUESTS)
        w.writeheader()
        w.writerows(requests)
    first = summary[0]
    lines = [f"Capacity {first['capacity_rps']} req/s (mean service {first['service_s']} s); T = "
             f"{first['max_queue_delay_ms']} ms, max waiting {first['max_waiting']}; SLO TTFT <= "
             f"{first['slo_ttft_s']} s (T + S). Ratios are to the capacity; TTFT of the admitted requests.", "",
             "| setting | phase | load | sent | refused | throughput | goodput | p50 TTFT s | p99 TTFT s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['setting']} | {r['phase']} | {r['multiple']}x | {r['sent']} | {r['refused']} | "
                     f"{r['throughput_ratio']:.2f} | {r['goodput_ratio']:.2f} | {r['p50_ttft_s']:.2f} | "
                     f"{r['p99_ttft_s']:.2f} |")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    figure(os.path.join(out_dir, "overload.png"), summary, requests, phases)


def figure(path, summary, requests, phases) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in summary)]
    for s in settings:
        ok = [r for r in requests if r["setting"] == s and r["status"] == "ok"]
        ax.scatter([r["t_send_s"] for r in ok], [r["ttft_s"] for r in ok], s=6, label=s)
    edge = 0.0
    for m, d in phases:
        ax.axvspan(edge, edge + d, alpha=0.08 if m <= 1 else 0.2, color="grey")
        ax.text(edge + d / 2, 1.0, f"{m}x", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        edge += d
    ax.axhline(summary[0]["slo_ttft_s"], ls="--", color="k", lw=0.8, label="SLO: T + S")
    ax.set(xlabel="intended send time (s)", ylabel="TTFT of admitted requests (s)", yscale="log")
    ax.legend(fontsize=8)
    worst = max(range(len(phases)), key=lambda k: phases[k][0])
    rows = [next(r for r in summary if r["setting"] == s and r["phase"] == worst) for s in settings]
    x = range(len(settings))
    bx.bar([i - 0.2 for i in x], [r["goodput_ratio"] for r in rows], 0.4, label="goodput / capacity")
    bx.bar([i + 0.2 for i in x], [r["throughput_ratio"] for r in rows], 0.4, label="throughput / capacity")
    bx.axhline(0.9, ls="--", color="k", lw=0.8)
    top = max([1.2] + [1.15 * r[k] for r in rows for k in ("goodput_ratio", "throughput_ratio")])
    bx.set(xticks=list(x), xticklabels=settings, ylim=(0, top * 1.1),
           title=f"phase {worst} ({phases[worst][0]}x capacity)")
    for i, r in enumerate(rows):
        bx.text(i, top, f"p99 TTFT {r['p99_ttft_s']:.2f} s, {r['refused']} refused", ha="center", fontsize=8)
    bx.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(a) -> int:
    """Capacity, then the step for every setting on a fresh service; the outputs once all are done."""
    log = lambda name: os.path.join(a.out, f"server_{name}.log")  # noqa: E731
    svc = Service(a, "capacity", [], log("capacity"))
    try:
        capacity, service_s = measure_capacity(svc, a)
    finally:
        svc.stop()
    delay_ms = a.max_queue_delay_ms or round(2000 * service_s)
    knobs = {"max_waiting": a.max_waiting or max(1, round(delay_ms / 1000 / service_s)),
             "max_queue_delay_ms": delay_ms}
    slo_s = a.slo_ms / 1000 if a.slo_ms else delay_ms / 1000 + service_s
    print(f"capacity {capacity:.3f} req/s, mean service {service_s:.3f} s; T {delay_ms} ms, max waiting "
          f"{knobs['max_waiting']}, SLO TTFT {slo_s:.3f} s", file=sys.stderr, flush=True)
    schedule = build_schedule(a.phases, capacity, a.seed)
    total_s = sum(d for _, d in a.phases)
    extra = {"none": [], "max-waiting": ["--max-waiting", str(knobs["max_waiting"])],
             "queue-delay": ["--max-queue-delay-ms", str(delay_ms)]}
    summary, requests = [], []
    for setting in a.settings:
        print(f"{setting}: {len(schedule)} requests over {total_s:.0f} s", file=sys.stderr, flush=True)
        svc = Service(a, setting, extra[setting], log(setting))
        try:
            svc.send(a.max_new_tokens, 0)  # warm-up, not counted
            rows = run_step(svc, a, schedule, total_s)
        finally:
            svc.stop()
        requests += rows
        summary += summarize(rows, a.phases, capacity, service_s, slo_s, knobs)
    write_outputs(a.out, summary, requests, a.phases)
    print(open(os.path.join(a.out, "summary.md")).read(), end="")
    return 0


def build_parser():
    p = OneLineParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    count = finite_number(int, ge=1)
    p.add_argument("--out", default=os.path.join("results", "overload"), help="output folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
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
    if not a.no_quota and os.geteuid() != 0:
        p.error("the quota cell needs root (sudo .venv/bin/python -m bench.overload), or pass --no-quota")
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(a.out, f))]
    if existing and not a.force:
        p.error(f"{a.out} already holds {', '.join(existing)}; pass --force to replace them")
    os.makedirs(a.out, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(a)
    except KeyboardInterrupt:
        print("python -m bench.overload: interrupted; nothing written", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, ValueError) as e:
        print(f"python -m bench.overload: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
