"""PSI benchmark: admit() overhead and how soon each pressure detector (poll-avg10, poll-total, kernel
trigger) sees a CPU step load started inside a temporary cgroup with a 50% one-CPU quota (root).

    sudo python -m bench.psi [--threshold PCT] [--seconds S] [-v]     # one JSON line
    sudo python -m bench.psi --output results/psi_bench/psi_bench.json  # also kept as a file, with its provenance

Bad input: one error line, exit status 2; PSI or cgroup errors: 1; Ctrl-C: 130. The load and the cgroup
are removed on every exit path: normal end, exception, Ctrl-C, SIGTERM or SIGHUP (both raise
KeyboardInterrupt while the bench runs)."""
from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import signal
import statistics
import sys
import time

from llm_psi import cgroups
from llm_psi import cli
from llm_psi.control.gate import Gate
from llm_psi.control.pressure import (TRIGGER_WINDOW_S, PressureFile, StallShare, TriggerMonitor, TriggerUnavailable,
                                      make_detector)
from llm_psi.control.psi import run_cli

log = logging.getLogger("psi_bench")

BURNER = ("import os, time\np, end = os.getppid(), time.monotonic() + {limit}\n"
          "while os.getppid() == p and time.monotonic() < end:\n    for _ in range(100000): pass\n")
DETECTORS = {"poll-avg10": ("avg10", "poll"), "poll-total": ("total", "poll"), "trigger": ("avg10", "trigger")}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _median_admit_us(detector, calls: int) -> float:
    gate, samples = Gate(detector, 0.5, 1), []
    try:
        for _ in range(calls):
            t = time.perf_counter_ns()
            gate.admit()
            samples.append(time.perf_counter_ns() - t)
    finally:
        gate.close()
    return round(statistics.median(samples) / 1000.0, 2)


def _burn(procs: list, dirs: list[str], burners: int, limit_s: float) -> None:
    """Start burners that join the cgroup dirs, each added to procs as soon as it exists."""
    for _ in range(burners):
        procs.append(cgroups.spawn(dirs, [sys.executable, "-c", BURNER.format(limit=limit_s)]))


def _stop(procs: list) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    procs.clear()


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def bench(threshold: float = 50.0, load_s: float = 40.0, burners: int = 3, calls: int = 2000) -> dict:
    """admit() overhead (system cpu, threshold 100: never defers), then how soon each detector, on the
    system and on the load's own cgroup, sees a step load of `burners` CPU burners in a temporary cgroup
    with a 50% one-CPU quota: poll-avg10 and poll-total (500 ms deltas), read every 100 ms during a first
    step; then the triggers during a second step in which nothing here reads the files (reads delay
    trigger events). Burners and cgroup are removed on every exit path (stop signals raise
    KeyboardInterrupt meanwhile, and are ignored during the teardown they ask for). Main thread only."""
    overhead = {det: _median_admit_us(make_detector("system", sig, mode, 100.0, 0.5), calls)
                for det, (sig, mode) in DETECTORS.items()}
    thresholds, name, trigger_s = sorted({float(threshold), 95.0}), f"psi_bench_{os.getpid()}", 10.0
    first, reasons, peak, procs, monitors = {}, {}, collections.defaultdict(float), [], {}
    old = {s: signal.signal(s, _interrupt) for s in STOP_SIGNALS}
    try:
        info, dirs = cgroups.create(name, 50.0, memory_max_bytes=None, log=log.info)
        files = {"system": PressureFile(cgroups.system_pressure_path("cpu")),
                 "cgroup": PressureFile(info["pressure"])}
        shares = {src: StallShare(pf.timed_total, 0.5) for src, pf in files.items()}
        baseline = {src: (pf.avg10(), round(shares[src](), 1)) for src, pf in files.items()}
        polls = [(s, t, d) for s in files for t in thresholds for d in ("poll-avg10", "poll-total")]
        t0 = time.monotonic()
        _burn(procs, dirs, burners, load_s + 20)
        while time.monotonic() - t0 < load_s and len(first) < len(polls):
            time.sleep(0.1)
            for src, pf in files.items():
                now, values = time.monotonic(), {"poll-avg10": pf.avg10(), "poll-total": shares[src]()}
                for det, v in values.items():
                    peak[src, det] = max(peak[src, det], v)
                    for thr in (t for t in thresholds if v > t):
                        first.setdefault((src, thr, det), round(now - t0, 2))
        seconds = time.monotonic() - t0
        _stop(procs)
        for src, thr in ((s, t) for s in files for t in thresholds):
            try:
                monitors[src, thr] = TriggerMonitor(files[src].path, thr, poll_s=0.05)
            except TriggerUnavailable as e:
                reasons[f"{src}/{thr:g}/trigger"] = str(e)
        time.sleep(2 * TRIGGER_WINDOW_S + 1)   # let the first step's stall leave the trigger windows
        t1 = time.monotonic()
        _burn(procs, dirs, burners, trigger_s + 20)
        while time.monotonic() - t1 < trigger_s and any(m.last_event is None or m.last_event < t1 for m in monitors.values()):
            time.sleep(0.05)
        for (src, thr), m in monitors.items():
            if m.last_event is not None and m.last_event >= t1:
                first[src, thr, "trigger"] = round(m.last_event - t1, 2)
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        try:
            _stop(procs)
            for m in monitors.values():
                m.close()
            cgroups.cleanup(name, log=log.info)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    for src, thr, det in ((s, t, d) for s in files for t in thresholds for d in DETECTORS):
        if (src, thr, det) not in first and f"{src}/{thr:g}/{det}" not in reasons:
            reasons[f"{src}/{thr:g}/{det}"] = (
                f"no event in {trigger_s:.0f} s of load" if det == "trigger" else
                f"not over {thr:g}% in {seconds:.0f} s of load (peak {det[5:]} {peak[src, det]:.1f}%)")
    return {"admit_overhead_us": overhead,
            "load": {"burners": burners, "cgroup": name, "cpu_quota_pct": 50, "poll_step_s": round(seconds, 1),
                     "trigger_step_s": trigger_s, "baseline_avg10_and_share": baseline,
                     "peak": {f"{s}/{d}": round(peak[s, d], 1) for s in files for d in ("poll-avg10", "poll-total")}},
            "reaction_s": {s: {f"{t:g}": {d: first.get((s, t, d)) for d in DETECTORS} for t in thresholds}
                           for s in files},
            "null_reasons": reasons,
            "method": "seconds from starting the burners until the detector first reports over the threshold; "
                      "polls read every 100 ms (poll-total: stall share over 500 ms); trigger "
                      "'some <threshold% of 2 s> 2000000' in a second step of the same load, no reads"}


def main(argv=None) -> int:
    p = cli.OneLineParser(prog="psi_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--threshold", type=cli.finite_number(gt=0, le=100), default=50.0,
                   help="percent in (0, 100], besides the paper's 95 (default 50)")
    p.add_argument("--seconds", type=cli.finite_number(gt=0, le=300), default=40.0,
                   help="longest step load, seconds in (0, 300] (default 40)")
    p.add_argument("--output", metavar="FILE", default=None,
                   help="also write the result to FILE as indented JSON, with the command, the code's commit and the "
                        "time (default: stdout only)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file (default: refuse)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every decision and trigger event")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if a.output and os.path.exists(a.output) and not a.force:
        p.error(f"{a.output} exists; --force replaces it")

    def action() -> dict:
        result = bench(a.threshold, a.seconds)
        if a.output:
            write_output(a.output, result, argv)
        return result
    return run_cli("psi_bench.py", a.verbose, action)


def write_output(path: str, result: dict, argv: list[str]) -> None:
    """The result with its provenance: the command line, the code's git state, when it finished (UTC)."""
    from llm_psi.load.environment import code_state
    record = {"command": " ".join(["python -m bench.psi", *argv]), **code_state(),
              "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **result}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
