"""The co-tenant (antagonist): a load that shares the host with the LLM service, in a cgroup of its own.

A spec is "cpu:N" (N built-in burner processes; each does fixed units of pure-Python work, ~1 ms each, and
counts them in shared memory, so the co-tenant's throughput is measurable) or any other non-empty string, a
shell command (e.g. "stress-ng --cpu 2"; its throughput is unknown: units() is None).

The co-tenant runs in a sibling cgroup `name` that cgroups.create makes next to the service's, under the
hierarchy root: one cgroup on v2; on hybrid hosts the v1 cpu and memory cgroups plus a unified (v2) one, so that
it has its own cpu.pressure; v1 cpu and memory on v1. It is unlimited unless quota_pct (percent of one CPU).
Every child joins it before it runs and gets PR_SET_PDEATHSIG(SIGKILL) (cgroups.place). Where no cgroup can
be made (not root, no cgroupfs, the name held by a live co-tenant) it runs without one: one warning line, and
describe() says why. With $CGROUP_ROOT (the tests' fake tree) the cgroup is made there.

stop() runs on every exit path: called, as a context manager, or at exit (atexit; also after a
KeyboardInterrupt); a SIGKILLed parent takes its burners with it (the death signal; burners also end when they
see their parent gone). What a SIGKILLed parent leaves (an empty cgroup; a command's grandchildren) is stopped
and removed by the next start of the same name. Start it from the main thread (or one that lives as long as
the co-tenant): the death signal follows the thread that started the children.

CLI: python cotenant.py --antagonist cpu:2 --seconds 10 [--antagonist-quota PCT] [--json PATH] runs the
co-tenant alone and prints one JSON line, its reference throughput (mean units/s, the per-second series, CPU s).
"""
import atexit
import csv
import json
import math
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from llm_psi import cgroups
from llm_psi import cli
from llm_psi.cgroups import CgroupError, cpuset
from llm_psi.cli import OneLineParser, finite_number
from llm_psi import REPO
from llm_psi.load import probe

UNIT_ITERS = 16000        # one unit of burner work: ~1 ms of pure-Python integer arithmetic
MAX_BURNERS = 1024
STOP_GRACE_S = 3.0        # a command's process group: SIGTERM, then SIGKILL after this
SHELL_CHARS = set("|&;<>()$`\\\"'*?[]{}#~=%!\n")   # a command with none of these runs without a shell


def parse_spec(text):
    """'cpu:N' -> ('cpu', N), N >= 1 built-in burners; burners and/or a probe joined by '+' (cpu:2+probe:100:10,
    probe:100:10) -> ('mix', {'cpu': N (0: none), 'probe': (period_ms, work_ms)}); any other non-empty string ->
    ('command', text)."""
    text = (text or "").strip()
    if not text:
        raise ValueError("empty co-tenant spec (expected cpu:N, probe:PERIOD_MS:WORK_MS, both joined by +, or a "
                         "shell command)")
    parts = [p.strip() for p in text.split("+")]
    if not all(p.lower().startswith(("cpu:", "probe:")) for p in parts):
        return "command", text
    mix = {"cpu": 0, "probe": None}
    for part in parts:
        kind = part.split(":")[0].lower()
        if (kind == "cpu" and mix["cpu"]) or (kind == "probe" and mix["probe"]):
            raise ValueError(f"bad co-tenant spec {text!r}: at most one cpu:N and one probe")
        if kind == "probe":
            mix["probe"] = probe.parse(part.lower())
            continue
        n = part[4:].strip()
        if not (n.isascii() and n.isdigit() and 1 <= int(n) <= MAX_BURNERS):
            raise ValueError(f"bad co-tenant spec {text!r}: cpu:N needs a whole number N from 1 to {MAX_BURNERS}")
        mix["cpu"] = int(n)
    return ("cpu", mix["cpu"]) if mix["probe"] is None else ("mix", mix)


def _burner(fd, slot):
    """A burner process: fixed units of CPU work, counted in slot `slot` of the shared counters at fd, until
    its parent is gone."""
    counts, parent, x = memoryview(mmap.mmap(fd, 0)).cast("Q"), os.getppid(), 1
    while os.getppid() == parent:
        for i in range(UNIT_ITERS):
            x = (x * 1103515245 + i) & 0xFFFFFFFF
        counts[slot] += 1


def _on_cgroupfs(path):
    """True if path lies on a mounted cgroup filesystem; False for a fake tree of plain directories."""
    path, best = os.path.realpath(path), ("", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt, fstype = line.split()[1:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                best = (mnt, fstype)
    return best[1] in ("cgroup", "cgroup2")


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_stopped(pids, timeout_s=1.0):
    """Wait (at most timeout_s) until every pid is stopped (state T), gone, or a zombie."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in "TtZX":
                break
            time.sleep(0.002)


class Cotenant:
    """A co-tenant in a sibling cgroup `name`: start(), units(), cpu_usage_s(), stop(), describe()."""

    def __init__(self, spec, name="llm_cotenant", quota_pct=None, period_us=100000, log=print, cpus=None):
        self.kind, arg = parse_spec(spec)
        self.spec, self.log = spec.strip(), log
        self.workers, self.command = (arg, None) if self.kind == "cpu" else (None, arg)
        self.probe_spec = self.ring = None
        if self.kind == "mix":
            self.workers, self.probe_spec, self.command = arg["cpu"], arg["probe"], None
        self.paused = False
        if not cgroups.NAME_RE.match(name):
            raise ValueError(f"bad cgroup name {name!r} (letters, digits, _ . - only)")
        if quota_pct is not None and not (math.isfinite(quota_pct) and quota_pct > 0):
            raise ValueError(f"quota_pct must be a finite number > 0 or None, got {quota_pct!r}")
        if not (isinstance(period_us, int) and 1000 <= period_us <= 1000000):
            raise ValueError(f"period_us must be an integer from 1000 to 1000000, got {period_us!r}")
        self.name, self.quota_pct, self.period_us = name, quota_pct, period_us
        self.cpus = cpus                  # pinned to these CPUs (cgroups.cpuset), e.g. one fleet host's
        self.procs, self.errors, self.dirs = [], [], []
        self.info = self.limits = self.pressure = self.cgroup_error = None
        self.state, self._lock, self._counts = "new", None, None
        self._final_units, self._final_cpu_s = 0, None

    def start(self):
        if self.state != "new":
            raise RuntimeError("a Cotenant starts once")
        self.state = "running"
        atexit.register(self.stop)
        try:
            self._make_cgroup()
            if self.cpus and self.info:   # a host's owner off its host's CPUs would be no owner: fatal
                self.dirs += cpuset.pin(self.info, self.name, self.cpus)
            common = dict(process_group=0, stdin=subprocess.DEVNULL, stdout=2)  # spawn: death signal, joined

            if self.kind == "command":    # no shell where none is needed: the death signal reaches it
                argv = ["/bin/sh", "-c", self.command] if SHELL_CHARS & set(self.command) else self.command.split()
                self.procs.append(cgroups.spawn(self.dirs, argv, **common))
            else:
                if self.probe_spec:
                    self.ring = probe.ProbeRing()
                    self.procs.append(cgroups.spawn(
                        self.dirs, [sys.executable, "-m", "llm_psi.load.probe", str(self.ring.fd),
                                    *map(str, self.probe_spec)], pass_fds=(self.ring.fd,), cwd=REPO, **common))
                    self.ring.close_fd()
                fd = os.memfd_create("cotenant_units")
                try:
                    os.ftruncate(fd, 8 * max(1, self.workers))
                    self._counts = memoryview(mmap.mmap(fd, 8 * max(1, self.workers))).cast("Q")
                    for slot in range(self.workers):
                        self.procs.append(cgroups.spawn(
                            self.dirs, [sys.executable, "-m", "llm_psi.load.cotenant", "--burner", str(fd), str(slot)],
                            pass_fds=(fd,), cwd=REPO, **common))
                finally:
                    os.close(fd)
        except BaseException:
            self.stop()
            raise
        where = f"cgroup {', '.join(self.dirs)}" if self.dirs else "no cgroup"
        self.log(f"cotenant: {self.spec} started, pids {[p.pid for p in self.procs]}, {where}")
        return self

    def _make_cgroup(self):
        try:
            self._lock = cgroups.lock(self.name)        # held: a leftover of the name is a dead run's
            self.info, self.dirs = cgroups.create(self.name, self.quota_pct, self.period_us, None,
                                                     log=self.log, stop_orphans=True)
            self.limits = cgroups.read_limits(self.info)
            self.pressure = self.info["pressure"] if os.path.exists(self.info["pressure"] or "") else None
        except (CgroupError, OSError) as e:
            self._unlock()
            self.cgroup_error = str(e)
            self.log(f"cotenant: warning: {self.spec} runs without a cgroup of its own (no counters, no "
                     f"pressure{', no quota' if self.quota_pct else ''}): {e}")

    def _unlock(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def pause(self):
        """Stop every co-tenant process (SIGSTOP to its process group): the co-tenant leaves the host."""
        if self.state == "running" and not self.paused:
            for p in self.procs:
                _signal_group(p.pid, signal.SIGSTOP)
            _wait_stopped([p.pid for p in self.procs])   # SIGSTOP is asynchronous: off means off on return
            self.paused = True

    def resume(self):
        """Continue them (the probe starts a fresh schedule): the co-tenant comes back."""
        if self.state == "running" and self.paused:
            if self.ring is not None:
                self.ring.bump()
            for p in self.procs:
                _signal_group(p.pid, signal.SIGCONT)
            self.paused = False

    def probe_records(self, start=0):
        """(the probe's (wake_ms, done_ms) records from index start on, the next index); ([], 0) without one."""
        return self.ring.since(start) if self.ring is not None else ([], 0)

    def units(self):
        """Units the burners completed so far (None for a command co-tenant)."""
        if self.kind == "command":
            return None
        counts = self._counts
        return self._final_units if counts is None else sum(counts)

    def cpu_usage_s(self):
        """CPU seconds the co-tenant's cgroup used (cpu.stat / cpuacct), None where unknown."""
        if self.state == "stopped" or self.info is None:
            return self._final_cpu_s
        usage = cgroups.read_counters(self.info).get("usage_usec")
        return None if usage is None else usage / 1e6

    def stop(self):
        """Kill every co-tenant process, wait for them, remove the cgroup; idempotent."""
        if self.state != "running":
            return
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None   # a 2nd Ctrl-C: no half teardown
        try:
            self.state = "stopping"
            atexit.unregister(self.stop)
            for p in self.procs:                 # a paused co-tenant must run to die of SIGTERM
                _signal_group(p.pid, signal.SIGCONT)
            self._kill()
            self._final_units, self._counts = self.units(), None
            self._final_cpu_s = self.cpu_usage_s() if self.info else None
            self._remove_cgroup()
        finally:
            self._unlock()
            self.state = "stopped"
            if main and old is not None:       # None: a handler not set from Python; leave SIG_IGN
                signal.signal(signal.SIGINT, old)

    def _kill(self):
        first = signal.SIGTERM if self.kind == "command" else signal.SIGKILL   # burners and probe: at once
        for p in self.procs:                     # each child leads its own process group
            _signal_group(p.pid, first)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            _signal_group(p.pid, signal.SIGKILL)   # what is left of the group
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                self.errors.append(f"pid {p.pid} survived SIGKILL")

    def _remove_cgroup(self):
        for d in reversed(self.dirs):
            try:
                if _on_cgroupfs(d):
                    cgroups.remove([d], self.log)   # kills what escaped the group, then rmdir
                else:
                    shutil.rmtree(d)                  # $CGROUP_ROOT fake tree: plain directories
            except (CgroupError, OSError) as e:
                self.errors.append(str(e))
                self.log(f"cotenant: {e}")

    def describe(self):
        """What a run's JSON records of the co-tenant."""
        return {"spec": self.spec, "kind": self.kind, "workers": self.workers, "command": self.command,
                "unit_iters": UNIT_ITERS if self.kind != "command" else None, "state": self.state,
                "probe": None if not self.probe_spec else dict(zip(("period_ms", "work_ms"), self.probe_spec)),
                "pids": [p.pid for p in self.procs], "cgroup_name": self.name if self.dirs else None,
                "cgroup_mode": self.info["mode"] if self.info else None, "cgroup_dirs": list(self.dirs),
                "cpu_pressure": self.pressure, "quota_pct": self.quota_pct, "period_us": self.period_us,
                "limits": self.limits, "cgroup_error": self.cgroup_error, "errors": list(self.errors)}

    def __enter__(self):
        return self.start() if self.state == "new" else self

    def __exit__(self, *exc):
        self.stop()


def _rate(a, b, dt):
    return round((b - a) / dt, 3) if a is not None and b is not None and dt > 0 else None


class ThroughputSampler:
    """Daemon thread: every interval_s a row {t_s (since t0, a time.monotonic()), units, units_per_s, cpu_s,
    cpu_share (CPUs the co-tenant's cgroup used: CPU seconds per second)}; None where unknown."""

    def __init__(self, cotenant, t0=None, interval_s=1.0):
        self.cotenant, self.interval_s = cotenant, interval_s
        self.t0 = time.monotonic() if t0 is None else t0
        self._rows, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, name="cotenant-sampler", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.rows()

    def rows(self):
        return list(self._rows)

    def _sample(self):
        return time.monotonic(), self.cotenant.units(), self.cotenant.cpu_usage_s()

    def _run(self):
        prev = self._sample()
        deadline, stopped = prev[0], False
        while not stopped:
            deadline += self.interval_s
            stopped = self._stop.wait(max(0.0, deadline - time.monotonic()))
            now = self._sample()
            dt = now[0] - prev[0]
            if not stopped or dt >= 0.2 * self.interval_s:     # a last, partial interval if not tiny
                self._rows.append({"t_s": round(now[0] - self.t0, 3), "units": now[1],
                                   "units_per_s": _rate(prev[1], now[1], dt),
                                   "cpu_s": None if now[2] is None else round(now[2], 4),
                                   "cpu_share": _rate(prev[2], now[2], dt)})
            prev = now


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--burner"]:                  # a burner process started by Cotenant.start()
        _burner(int(argv[1]), int(argv[2]))
        return 0
    p = OneLineParser(prog="cotenant.py", description="Run the co-tenant alone for --seconds and print its "
                      "reference throughput as one JSON line.")
    p.add_argument("--antagonist", type=cli.checked_by(parse_spec), default="cpu:1",
                   help="cpu:N (N built-in burner processes), probe:PERIOD_MS:WORK_MS, both joined by +, or a "
                        "shell command (default %(default)s)")
    p.add_argument("--seconds", type=finite_number(gt=0), default=10.0, help="run time (default %(default)s)")
    p.add_argument("--antagonist-quota", type=finite_number(gt=0), metavar="PCT",
                   help="CPU quota in percent of one CPU (default: unlimited)")
    p.add_argument("--antagonist-period-us", type=finite_number(int, ge=1000, le=1000000), default=100000,
                   help="CFS period in microseconds, 1000..1000000 (default %(default)s)")
    p.add_argument("--name", default="llm_cotenant", help="the co-tenant's cgroup (default %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the result to PATH (default: stdout only)")
    args = p.parse_args(argv)
    if not cgroups.NAME_RE.match(args.name):
        p.error(f"--name: bad cgroup name {args.name!r} (letters, digits, _ . - only)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json: no directory for {args.json!r}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupt)
    co = Cotenant(args.antagonist, args.name, args.antagonist_quota, args.antagonist_period_us, log)
    interrupted, sampler = False, None
    try:
        with co:
            t0 = time.monotonic()
            sampler = ThroughputSampler(co, t0).start()
            try:
                time.sleep(args.seconds)
            except KeyboardInterrupt:
                interrupted = True
            elapsed, units, cpu_s = time.monotonic() - t0, co.units(), co.cpu_usage_s()
            records = co.probe_records()[0]
            delays = probe.summarize(records) if co.probe_spec else None
    except KeyboardInterrupt:
        log("cotenant: interrupted while starting or stopping; stopped")
        return 130
    except (OSError, subprocess.SubprocessError) as e:
        print(f"{p.prog}: error: cannot start {co.spec!r}: {e}", file=sys.stderr)
        return 2
    result = {"antagonist": co.spec, "seconds": args.seconds, "elapsed_s": round(elapsed, 3), "units": units,
              "units_per_s": _rate(0, units, elapsed), "cpu_s": None if cpu_s is None else round(cpu_s, 4),
              "cpu_share": _rate(0, cpu_s, elapsed), "probe": delays, "interrupted": interrupted,
              "series": sampler.stop(), "cotenant": co.describe()}
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
        write_samples(os.path.splitext(args.json)[0], result["series"], records if co.probe_spec else None, t0)
    return 130 if interrupted else 0


SERIES = ["t_s", "units", "units_per_s", "cpu_s", "cpu_share"]


def write_samples(stem: str, series, records, t0: float) -> None:
    """The raw samples behind the reference's summary, beside its JSON: <stem>_throughput.csv (per second: the
    cumulative units, from which the JSON's units_per_s = units / elapsed_s, and the rates) and, with a probe,
    <stem>_probe.csv (its per-period wake and completion delays, whose p50/p99 the JSON holds)."""
    with open(stem + "_throughput.csv", "w", newline="") as f:
        w = csv.DictWriter(f, SERIES, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: "" if r.get(k) is None else r[k] for k in SERIES} for r in series)
    if records is not None:
        path = stem + "_probe.csv"
        if os.path.exists(path):
            os.remove(path)
        probe.write_samples(path, records, t0)


if __name__ == "__main__":
    sys.exit(main())
