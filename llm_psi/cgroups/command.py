"""The cgroup CLI that the sweeps call (root door: cgroup_lib.py).

  cgroup_lib.py detect
  cgroup_lib.py run --name llm_service --cpu-quota 50 --cpu-period-us 100000 --memory-max 4G
                    [--cpu-weight N | --cpu-idle] [--cpu-burst-us N] [--cpus LIST] [--meta CELL.json] -- CMD...
  cgroup_lib.py run --name llm_service --unlimited [--cpu-weight N | --cpu-idle] [--cpus LIST] [--meta CELL.json]
                    -- CMD...
  cgroup_lib.py cleanup --name llm_service

Bad numbers or arguments: one line `cgroup_lib.py ...: error: ...` on stderr, exit status 2.
"""
import argparse
import os
import sys

from llm_psi.cgroups.cell import cleanup, run
from llm_psi.cgroups.cpuset import parse_cpus
from llm_psi.cgroups.fs import MAX_WEIGHT, CgroupError, check_sharing, describe_mode, parse_bytes
from llm_psi.cli import OneLineParser, finite_number

def _memory_size(text):
    try:
        size = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size == 0:
        raise argparse.ArgumentTypeError("must be > 0 bytes or max, got '0'")
    return size



def _cpu_list(text):
    """A CPU list ('1', '0-2,5') of CPUs this process may use, as given; one line otherwise."""
    try:
        want = parse_cpus(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    missing = sorted(set(want) - os.sched_getaffinity(0))
    if missing:
        raise argparse.ArgumentTypeError(f"CPU {missing[0]} is not among this process's CPUs "
                                         f"({','.join(map(str, sorted(os.sched_getaffinity(0))))})")
    return text.strip()


def main(argv=None):
    parser = OneLineParser(prog="cgroup_lib.py", description="Service cgroup helper (v2, hybrid, v1).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("detect", help="print the host's cgroup mode")
    p_run = sub.add_parser("run", help="run CMD inside a fresh cgroup (limited, or --unlimited)")
    p_clean = sub.add_parser("cleanup", help="stop and remove a leftover cgroup (e.g. of a killed run)")
    for p in (p_run, p_clean):
        p.add_argument("--name", default="llm_service")
    p_run.add_argument("--cpu-quota", type=finite_number(gt=0), default=argparse.SUPPRESS,
                       help="percent of one CPU, > 0 (default 50)")
    p_run.add_argument("--cpu-period-us", type=finite_number(int, ge=1000, le=1000000), default=100000,
                       help="CFS period in microseconds, 1000..1000000 (default 100000)")
    p_run.add_argument("--memory-max", type=_memory_size, default=argparse.SUPPRESS,
                       help="bytes, K/M/G/T suffix, or max (default 4G)")
    p_run.add_argument("--unlimited", action="store_true",
                       help="no CPU quota and no memory limit: a baseline cell with counters of its own "
                            "(conflicts with --cpu-quota and --memory-max)")
    p_run.add_argument("--cpu-weight", type=finite_number(int, ge=1, le=MAX_WEIGHT), default=None,
                       help=f"the cgroup's CPU weight beside its siblings (default 100), 1..{MAX_WEIGHT}: v2 "
                            "cpu.weight; v1 cpu.shares = N * 1024 / 100 (systemd's mapping), clamped to 2..262144 "
                            "(default: the kernel's, untouched)")
    p_run.add_argument("--cpu-idle", action="store_true",
                       help="cpu.idle = 1: SCHED_IDLE for the whole cgroup, it runs only when its siblings leave "
                            "CPU time unused (Linux >= 5.15; conflicts with --cpu-weight; default off)")
    p_run.add_argument("--cpu-burst-us", type=finite_number(int, ge=0), default=None,
                       help="unused quota the cgroup may carry over into a later period, in microseconds, at most "
                            "the quota: v2 cpu.max.burst, v1 cpu.cfs_burst_us (Linux >= 5.14; needs a quota, so "
                            "not with --unlimited; default: none)")
    p_run.add_argument("--cpus", type=_cpu_list, default=None, metavar="LIST",
                       help="pin the cgroup to these CPUs (cpuset; e.g. 1 or 0-2,5): v2 cpuset.cpus of the cgroup, "
                            "v1 and hybrid a cpuset cgroup of the same name (default: every CPU, untouched)")
    p_run.add_argument("--meta", help="cell JSON that the command writes: append the cell's counters to its list "
                       "'cgroup_runs' when the command ends (a missing file is reported, not made)")
    p_run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.unlimited and {"cpu_quota", "memory_max"} & set(vars(args)):
            p_run.error("--unlimited conflicts with --cpu-quota and --memory-max")
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            p_run.error("no command given after --")
        quota_pct = None if args.unlimited else getattr(args, "cpu_quota", 50.0)
        try:
            check_sharing(args.cpu_weight, args.cpu_idle, args.cpu_burst_us,
                          None if quota_pct is None else round(args.cpu_period_us * quota_pct / 100))
        except ValueError as e:
            p_run.error(str(e))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.command == "detect":
            print(describe_mode())
            return 0
        if os.geteuid() != 0:
            raise CgroupError("must run as root to create and remove cgroups (use sudo)")
        if args.command == "cleanup":
            cleanup(args.name, log=log)
            return 0
        quota, memory = (None, None) if args.unlimited else (
            getattr(args, "cpu_quota", 50.0), getattr(args, "memory_max", 4 << 30))
        return run(args.name, quota, args.cpu_period_us, memory, cmd, args.meta, log, cpu_weight=args.cpu_weight,
                   cpu_idle=args.cpu_idle, cpu_burst_us=args.cpu_burst_us, cpus=args.cpus)
    except CgroupError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
