"""headroom: the LLM's CPU quota set from the owner's measured CPU use plus a headroom, in the style of Meta's
resctl-demo sideloader; cut hard when the owner stalls; the LLM at the lowest priority while the owner leaves room.

Control law, one step every --interval-ms (default 1 s):

    use     = the owner cgroup's CPU time over the last interval / the interval (CPUs)
    demand  = the largest use over the last --window intervals (default 5)
    stall   = the share of the last interval in which the owner cgroup's tasks waited for CPU (cpu.pressure some, %)
    stall >= --stall-pct (default 5):   quota = floor, held there --hold steps (default 5)   cut hard: the owner waits
    otherwise:                          target = clamp(cpus - demand - headroom, floor, cpus)
                                        quota  = target if target <= quota, else min(target, quota + ramp)
                                        (to 0.01 CPU: a smaller move is no change)
    idle    = cpus - demand - headroom > floor   (--idle auto: cpu.idle = 1 while the owner leaves room)

headroom is --headroom-pct of the host's CPUs (default 20, the sideloader's), floor --floor-pct of one CPU
(default 50: the paper's quota, which the LLM's users keep), ramp --ramp-pct of one CPU per step (default 50).
While the owner's demand leaves room above the floor, the LLM runs as SCHED_IDLE (cpu.idle), a cut included:
an owner task that wakes takes the CPU from it at once. When the owner's demand fills the host, the LLM runs
at the default weight, so that it keeps the floor's CPU (an idle cgroup beside a busy owner gets almost none).
--idle off keeps the weight.
It starts at the floor, idle (where the kernel has cpu.idle) until a reading of the owner's demand says
otherwise: an owner that arrives before the first reading finds the LLM at the lowest priority. An owner
cgroup that does not exist (yet) uses nothing and never stalls; one without
cpu.pressure (pure v1) is never seen to stall; a kernel without cpu.idle keeps the weight. The quota is the LLM
cgroup's cpu.max (v2) or cpu.cfs_quota_us (v1, hybrid); every change is one timestamped log line. It runs until
SIGTERM or Ctrl-C (or --seconds), and leaves the last quota in place.

    sudo python -m llm_psi.control.headroom --llm llm_service --owner llm_cotenant
"""
from __future__ import annotations

import collections
import math
import os
import signal
import sys
import time
from datetime import datetime, timezone

from llm_psi import cgroups, cli
from llm_psi.control.pressure import PressureFile, stall_share
from llm_psi.control.sharing import write_quota


def decide(quota, demand, stall, *, cpus, headroom, floor, stall_limit, ramp):
    """The next quota (CPUs) under the control law; unchanged while demand is unknown (None)."""
    if stall is not None and stall >= stall_limit:
        return floor
    if demand is None:
        return quota
    target = min(cpus, max(floor, cpus - demand - headroom))
    return target if target <= quota else min(target, quota + ramp)


def info_of(name, root=None):
    """The directories of cgroup `name` under the hierarchy root (v2, hybrid or v1; $CGROUP_ROOT a fake tree)."""
    root = root or os.environ.get("CGROUP_ROOT") or "/sys/fs/cgroup"
    return cgroups.cgroup_info(cgroups.detect_mode(root), root, name, name, name)


class OwnerReader:
    """The owner cgroup's (use in CPUs, stall %) over the interval since the last call; (None, None) on the first,
    (0.0, None) while the cgroup does not exist."""

    def __init__(self, info, clock=time.monotonic):
        self.info, self.clock, self.prev = info, clock, None

    def __call__(self):
        if not os.path.isdir(self.info["cpu"]):
            self.prev = None
            return 0.0, None
        t = self.clock()
        usage = cgroups.read_counters(self.info).get("usage_usec")
        psi = self.info.get("pressure")
        total = PressureFile(psi, self.clock).timed_total() if psi and os.path.exists(psi) else None
        now, prev = (t, usage, total), self.prev
        self.prev = now
        if prev is None or now[0] <= prev[0] or usage is None or prev[1] is None:
            return None, None
        use = (usage - prev[1]) / 1e6 / (now[0] - prev[0])
        stall = stall_share(prev[2], total) if total is not None and prev[2] is not None else None
        return use, stall


class Headroom:
    """The control law applied to the LLM cgroup `llm` (info) from the owner's reader; step() once per interval."""

    def __init__(self, llm, reader, *, cpus, headroom_pct=20.0, floor_pct=50.0, stall_pct=5.0, ramp_pct=50.0,
                 window=5, hold=5, idle=True, log=print, clock=time.monotonic):
        self.llm, self.reader, self.log, self.clock = llm, reader, log, clock
        self.cpus, self.headroom = float(cpus), cpus * headroom_pct / 100.0
        self.floor, self.ramp, self.stall_limit = floor_pct / 100.0, ramp_pct / 100.0, stall_pct
        self.period_us = cgroups.read_limits(llm)["cpu_period_us"] or 100000
        self.uses = collections.deque(maxlen=window)
        self.hold, self.held = hold, 0
        self.quota, self.changes = self.floor, 0
        self.idle_file = os.path.join(llm["cpu"], "cpu.idle")
        self.use_idle = idle and os.path.exists(self.idle_file)
        self.idle = self.use_idle                    # the owner unknown yet: the lowest priority
        write_quota(llm, self._us(self.quota), self.period_us)
        if self.use_idle:
            cgroups.fs._write(self.idle_file, 1)

    @staticmethod
    def _cents(cores):
        """A quota at the law's resolution, 0.01 CPU: a demand that moves by less changes nothing, logs nothing."""
        return round(cores, 2)

    def _us(self, cores):
        return max(1000, round(cores * self.period_us))

    def step(self):
        """Read the owner, decide, write and log the quota (and cpu.idle) if they change; returns the quota (CPUs)."""
        use, stall = self.reader()
        if use is not None:
            self.uses.append(use)
        demand = max(self.uses) if self.uses else None
        cut = stall is not None and stall >= self.stall_limit
        holding = not cut and self.held > 0
        if cut:
            self.held = self.hold
        elif holding:
            self.held -= 1
        new = self.floor if cut or holding else self._cents(decide(
            self.quota, demand, stall, cpus=self.cpus, headroom=self.headroom, floor=self.floor,
            stall_limit=self.stall_limit, ramp=self.ramp))
        idle = self.idle if demand is None else (   # the owner leaves room: a cut keeps the LLM idle
            self.use_idle and self.cpus - demand - self.headroom > self.floor)
        if self._us(new) != self._us(self.quota) or idle != self.idle:
            if idle and not self.idle:                 # lowest priority first, then more CPU
                cgroups.fs._write(self.idle_file, 1)
            write_quota(self.llm, self._us(new), self.period_us)
            if self.idle and not idle:
                cgroups.fs._write(self.idle_file, 0)
            why = "owner stalls: cut" if cut else "held after a cut" if holding else "from demand"
            self.log(f"{datetime.now(timezone.utc).isoformat(timespec='milliseconds')} headroom: quota "
                     f"{self.quota:.2f} -> {new:.2f} CPUs{', idle' if idle else ''} ({why}; owner use {_fmt(use)} "
                     f"CPUs, demand {_fmt(demand)}, stall {_fmt(stall, '%')})")
            self.quota, self.idle, self.changes = new, idle, self.changes + 1
        return self.quota


def _fmt(v, unit=""):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}{unit}"


def _stop(signum, _frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = cli.OneLineParser(prog="python -m llm_psi.control.headroom", description=__doc__.split("\n\n")[0],
                          epilog=__doc__[__doc__.index("Control law"):],
                          formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    num = cli.finite_number
    p.add_argument("--llm", default="llm_service", help="the LLM's cgroup, whose quota it sets (default %(default)s)")
    p.add_argument("--owner", default="llm_cotenant", help="the owner's cgroup, read (default %(default)s)")
    p.add_argument("--headroom-pct", type=num(ge=0, le=100), default=20.0, help="of the host's CPUs (default %(default)s)")
    p.add_argument("--floor-pct", type=num(gt=0), default=50.0, help="of one CPU (default %(default)s)")
    p.add_argument("--stall-pct", type=num(gt=0, le=100), default=5.0, help="cut at this owner stall (default %(default)s)")
    p.add_argument("--ramp-pct", type=num(gt=0), default=50.0, help="rise per step, of one CPU (default %(default)s)")
    p.add_argument("--window", type=num(int, ge=1), default=5, help="intervals of owner use kept (default %(default)s)")
    p.add_argument("--hold", type=num(int, ge=0), default=5, help="steps at the floor after a cut (default %(default)s)")
    p.add_argument("--idle", choices=["auto", "off"], default="auto",
                   help="auto: cpu.idle = 1 from the start and while the owner leaves room, where the kernel has it "
                        "(default %(default)s)")
    p.add_argument("--interval-ms", type=num(ge=50), default=1000.0, help="(default %(default)s)")
    p.add_argument("--cpus", type=num(gt=0), default=None, help="the host's CPUs (default: those this process may use)")
    p.add_argument("--seconds", type=num(gt=0), default=None, help="stop after this long (default: at SIGTERM)")
    a = p.parse_args(argv)
    for name in (a.llm, a.owner):
        if not cgroups.NAME_RE.match(name):
            p.error(f"bad cgroup name {name!r} (letters, digits, _ . - only)")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        llm, owner = info_of(a.llm), info_of(a.owner)
        if not os.path.isdir(llm["cpu"]):
            raise cgroups.CgroupError(f"no cgroup {llm['cpu']} (start the LLM in it first)")
        cpus = a.cpus or len(os.sched_getaffinity(0))
        ctl = Headroom(llm, OwnerReader(owner), cpus=cpus, headroom_pct=a.headroom_pct, floor_pct=a.floor_pct,
                       stall_pct=a.stall_pct, ramp_pct=a.ramp_pct, window=a.window, hold=a.hold,
                       idle=a.idle == "auto", log=log)
    except (cgroups.CgroupError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    log(f"headroom: {a.llm} from {a.owner}, {cpus:g} CPUs, headroom {ctl.headroom:.2f} CPUs, floor {ctl.floor:.2f}, "
        f"cut at owner stall >= {a.stall_pct:g}% (held {a.hold} steps), idle while the owner leaves room: "
        f"{'yes (idle from the start)' if ctl.use_idle else 'no'}")
    signal.signal(signal.SIGTERM, _stop)
    end = math.inf if a.seconds is None else time.monotonic() + a.seconds
    try:
        ctl.reader()
        while time.monotonic() < end:
            time.sleep(min(a.interval_ms / 1000.0, max(0.0, end - time.monotonic())))
            try:
                ctl.step()
            except (cgroups.CgroupError, OSError, ValueError) as e:   # the LLM's cgroup removed: nothing to control
                if not os.path.isdir(llm["cpu"]):
                    log(f"headroom: {llm['cpu']} is gone; stopping")
                    return 0
                log(f"headroom: step failed: {e}")
    except KeyboardInterrupt:
        pass
    log(f"headroom: stopped after {ctl.changes} change(s); quota left at {ctl.quota:.2f} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
