"""cgroup detection, creation, limits, counters and teardown for the service cgroup.

Supports pure cgroup v2, hybrid (v1 cpu + memory, v2 at <root>/unified) and pure v1.
The cgroupfs root is /sys/fs/cgroup, or $CGROUP_ROOT (tests use a fake tree).

CLI (used by sweep_lib.sh):
  cgroup_lib.py detect
  cgroup_lib.py run --name llm_service --cpu-quota 50 --cpu-period-us 100000 --memory-max 4G
                    [--meta CELL.json] -- CMD...
  cgroup_lib.py cleanup --name llm_service
"""
import argparse
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

UNLIMITED_BYTES = 1 << 62        # v1 reports "no limit" as ~2^63 rounded to a page
STOP_GRACE_S = 5.0               # after a forwarded signal, before the cgroup is killed
LOCK_DIR = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class CgroupError(Exception):
    """A cgroup cannot be detected, created, used or removed."""


def _root(root=None):
    return root or os.environ.get("CGROUP_ROOT") or "/sys/fs/cgroup"


def _read(path):
    """File content stripped, or None if it does not exist."""
    try:
        with open(path) as f:
            return f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write(path, value):
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror or e}") from e


def _keyed(path):
    """A 'key value' file (cpu.stat, memory.events, memory.oom_control) as a dict of ints."""
    text = _read(path)
    if text is None:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _int_or_none(text):
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def detect_mode(root=None):
    """'v2' | 'hybrid' | 'v1' for the cgroupfs at root; raises CgroupError if none is usable."""
    root = _root(root)
    v2 = _read(os.path.join(root, "cgroup.controllers"))
    if v2 is not None:
        missing = {"cpu", "memory"} - set(v2.split())
        if missing:
            raise CgroupError(f"cgroup v2 at {root} lacks the controllers {' '.join(sorted(missing))}")
        return "v2"
    v1 = (os.path.exists(os.path.join(root, "cpu", "cpu.cfs_quota_us"))
          and os.path.exists(os.path.join(root, "memory", "memory.limit_in_bytes")))
    if not v1:
        raise CgroupError(f"no usable cgroup cpu+memory controllers under {root}")
    if os.path.exists(os.path.join(root, "unified", "cgroup.controllers")):
        return "hybrid"
    return "v1"


def _join(*parts):
    return os.path.normpath(os.path.join(*parts))


def _info(mode, root, cpu, memory, unified):
    """Directories of a cgroup given its path in the cpu, memory and unified hierarchies."""
    if mode == "v2":
        d = _join(root, unified)
        return {"mode": mode, "cpu": d, "memory": d, "unified": d,
                "pressure": _join(d, "cpu.pressure")}
    uni = _join(root, "unified", unified) if mode == "hybrid" else None
    return {"mode": mode, "cpu": _join(root, "cpu", cpu), "memory": _join(root, "memory", memory),
            "unified": uni, "pressure": _join(uni, "cpu.pressure") if uni else None}


def _dirs(info):
    """The distinct cgroup directories of info, in placement order."""
    out = []
    for key in ("cpu", "memory", "unified"):
        if info.get(key) and info[key] not in out:
            out.append(info[key])
    return out


def own_cgroup(root=None, proc_file="/proc/self/cgroup"):
    """Where this process runs: mode and the cpu, memory, unified dirs and cpu.pressure path."""
    root = _root(root)
    mode = detect_mode(root)
    paths = {}
    with open(proc_file) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths.setdefault(c, path.strip("/"))
    info = _info(mode, root, paths.get("cpu", ""), paths.get("memory", ""), paths.get("", ""))
    if info["pressure"] and not os.path.exists(info["pressure"]):
        info["pressure"] = None
    return info


def read_limits(info):
    """cpu_quota_us, cpu_period_us, memory_max_bytes as read from the files (None = unlimited)."""
    if info["mode"] == "v2":
        cpu_max = (_read(os.path.join(info["cpu"], "cpu.max")) or "max -").split()
        quota, period = _int_or_none(cpu_max[0]), _int_or_none(cpu_max[-1])
        memory = _int_or_none(_read(os.path.join(info["memory"], "memory.max")))
    else:
        quota = _int_or_none(_read(os.path.join(info["cpu"], "cpu.cfs_quota_us")))
        period = _int_or_none(_read(os.path.join(info["cpu"], "cpu.cfs_period_us")))
        memory = _int_or_none(_read(os.path.join(info["memory"], "memory.limit_in_bytes")))
    return {"cpu_quota_us": quota if quota is not None and quota > 0 else None,
            "cpu_period_us": period,
            "memory_max_bytes": memory if memory is not None and memory < UNLIMITED_BYTES else None}


def read_counters(info):
    """nr_periods, nr_throttled, throttled_usec, usage_usec, memory_peak_bytes, oom_kill (None = n/a)."""
    cpu = _keyed(os.path.join(info["cpu"], "cpu.stat"))
    if info["mode"] == "v2":
        throttled = cpu.get("throttled_usec")
        usage = cpu.get("usage_usec")
        peak = _int_or_none(_read(os.path.join(info["memory"], "memory.peak")))
        oom = _keyed(os.path.join(info["memory"], "memory.events")).get("oom_kill")
    else:
        ns = cpu.get("throttled_time")
        throttled = ns // 1000 if ns is not None else None
        if info.get("unified"):
            usage = _keyed(os.path.join(info["unified"], "cpu.stat")).get("usage_usec")
        else:
            usage_ns = _int_or_none(_read(os.path.join(info["cpu"], "cpuacct.usage")))
            usage = usage_ns // 1000 if usage_ns is not None else None
        peak = _int_or_none(_read(os.path.join(info["memory"], "memory.max_usage_in_bytes")))
        oom = _keyed(os.path.join(info["memory"], "memory.oom_control")).get("oom_kill")
    return {"nr_periods": cpu.get("nr_periods"), "nr_throttled": cpu.get("nr_throttled"),
            "throttled_usec": throttled, "usage_usec": usage,
            "memory_peak_bytes": peak, "oom_kill": oom}


def counter_delta(before, after):
    """Change of each counter between two read_counters(); memory_peak_bytes is the later peak."""
    out = {}
    for key, value in after.items():
        if key == "memory_peak_bytes" or value is None or before.get(key) is None:
            out[key] = value
        else:
            out[key] = value - before[key]
    return out


def cpu_quota_cores(info=None):
    """CPU quota / period of the cgroup we are in (or info), None if unlimited."""
    limits = read_limits(info or own_cgroup())
    if limits["cpu_quota_us"] is None or not limits["cpu_period_us"]:
        return None
    return limits["cpu_quota_us"] / limits["cpu_period_us"]


def parse_bytes(text):
    """'4G' -> 4294967296 (K/M/G/T are powers of 1024); 'max' -> None."""
    if text.lower() == "max":
        return None
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad memory size {text!r} (expected e.g. 4G, 512M, 1073741824 or max)")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def _check_name(name):
    if not NAME_RE.match(name):
        raise CgroupError(f"bad cgroup name {name!r} (letters, digits, _ . - only)")


def _procs(directory):
    """PIDs in a cgroup directory (empty if it has no cgroup.procs)."""
    text = _read(os.path.join(directory, "cgroup.procs"))
    return [int(p) for p in text.split()] if text else []


def _lock(name):
    """Hold an exclusive lock for cgroup `name`; raises CgroupError if a live run holds it."""
    path = os.path.join(LOCK_DIR, f"cgroup_lib.{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CgroupError(f"cgroup {name} is in use by a running experiment (pid {owner}); "
                          f"not touching it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _remove(directories, log):
    """Stop every process in the directories (SIGTERM, then SIGKILL), then rmdir them."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        pids = sorted({p for d in directories for p in _procs(d)})
        if not pids:
            break
        log(f"cgroup: sending {sig.name} to {len(pids)} process(es) left in the cgroup: {pids}")
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_procs(d) for d in directories):
            time.sleep(0.05)
    failed = []
    for d in reversed(directories):
        for attempt in range(40):            # v1 rmdir can race the exit of the last task
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if attempt == 39:
                    failed.append(f"{d} ({e.strerror})")
                time.sleep(0.05)
    if failed:
        raise CgroupError(f"could not remove cgroup(s): {', '.join(failed)}")


def create(name, cpu_quota_pct=50.0, cpu_period_us=100000, memory_max_bytes=4 << 30,
           root=None, log=print):
    """Create cgroup `name` with the limits; returns (info, created_dirs).

    A leftover of the same name without processes is removed (and reported); with processes
    it is refused. On failure everything created here is removed again. run() calls it while
    holding the name's lock, so a live run's cgroup is never taken for a leftover.
    """
    _check_name(name)
    root = _root(root)
    mode = detect_mode(root)
    info = _info(mode, root, name, name, name)
    for d in _dirs(info):
        if os.path.isdir(d):
            pids = _procs(d)
            if pids:
                raise CgroupError(f"leftover cgroup {d} still has processes {pids}; stop them or run: "
                                  f"sudo python cgroup_lib.py cleanup --name {name}")
            log(f"cgroup: removing empty leftover cgroup {d} from an earlier run")
            _remove([d], log)
    if mode == "v2":
        control = os.path.join(root, "cgroup.subtree_control")
        enabled = set((_read(control) or "").split())
        if not {"cpu", "memory"} <= enabled:
            _write(control, "+cpu +memory")
    created = []
    try:
        for d in _dirs(info):
            try:
                os.mkdir(d)
            except OSError as e:
                raise CgroupError(f"cannot create cgroup {d}: {e.strerror}") from e
            created.append(d)
        quota = round(cpu_period_us * cpu_quota_pct / 100)
        if mode == "v2":
            _write(os.path.join(info["cpu"], "cpu.max"), f"{quota} {cpu_period_us}")
            _write(os.path.join(info["memory"], "memory.max"),
                   "max" if memory_max_bytes is None else memory_max_bytes)
        else:
            _write(os.path.join(info["cpu"], "cpu.cfs_period_us"), cpu_period_us)
            _write(os.path.join(info["cpu"], "cpu.cfs_quota_us"), quota)
            _write(os.path.join(info["memory"], "memory.limit_in_bytes"),
                   -1 if memory_max_bytes is None else memory_max_bytes)
        got = read_limits(info)
        page = os.sysconf("SC_PAGE_SIZE")
        want_mem = None if memory_max_bytes is None else memory_max_bytes // page * page
        if (got["cpu_quota_us"], got["cpu_period_us"], got["memory_max_bytes"]) != (
                quota, cpu_period_us, want_mem):
            raise CgroupError(f"limits read back from {info['cpu']} differ from those written: {got}")
    except BaseException:
        _remove(created, log)
        raise
    return info, created


def _place(directories):
    """preexec_fn: the child writes its own PID to each cgroup.procs before exec."""
    def place():
        for d in directories:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    return place


def _merge_meta(path, record, log):
    """Add record under 'cgroup_cell' to the JSON at path, keeping its other keys."""
    if not path or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        log(f"cgroup: not recording the cell counters into {path}: {e}")
        return
    meta["cgroup_cell"] = record
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, path)


def run(name, cpu_quota_pct, cpu_period_us, memory_max_bytes, cmd, meta=None, log=print):
    """Run cmd inside a fresh cgroup `name`; tear down on every exit path. Returns exit status.

    SIGINT/SIGTERM/SIGHUP are forwarded to cmd (started in its own process group); after
    STOP_GRACE_S whatever is left in the cgroup is killed, the cgroup removed, and this
    process dies of the same signal.
    """
    lock = _lock(name)
    received = []
    child = None

    def forward(signum, _frame):
        received.append((signum, time.monotonic()))
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    rc = None
    try:
        info, created = create(name, cpu_quota_pct, cpu_period_us, memory_max_bytes, log=log)
        try:
            limits = read_limits(info)
            log(f"cgroup: {info['mode']} {name}: cpu {limits['cpu_quota_us']}/"
                f"{limits['cpu_period_us']} us, memory {limits['memory_max_bytes']} bytes")
            before, t0 = read_counters(info), time.monotonic()
            if not received:
                try:
                    child = subprocess.Popen(cmd, preexec_fn=_place(created), process_group=0)
                except (OSError, subprocess.SubprocessError) as e:
                    raise CgroupError(f"cannot start {cmd[0]} in the cgroup: {e}") from e
                if received:  # a signal that came while Popen ran found no child to forward to
                    child.send_signal(received[0][0])
            while child is not None and not received:
                try:
                    rc = child.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
            while child is not None and child.poll() is None:
                if time.monotonic() - received[0][1] > STOP_GRACE_S:
                    break                   # the teardown below stops it
                time.sleep(0.1)
            if child is not None and child.poll() is not None:
                record = {"mode": info["mode"], "name": name, "dirs": created, "limits": limits,
                          "counters": counter_delta(before, read_counters(info)),
                          "wall_s": round(time.monotonic() - t0, 3), "exit_status": child.returncode,
                          "stopped_by": signal.Signals(received[0][0]).name if received else None}
                _merge_meta(meta, record, log)
        finally:
            _remove(created, log)
            if child is not None:
                child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(lock)
    if received:
        signum = received[0][0]
        log(f"cgroup: stopped by {signal.Signals(signum).name}; cgroup {name} removed")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)      # die of the same signal, as the caller expects
        return 128 + signum
    return 128 - rc if rc < 0 else rc


def cleanup(name, root=None, log=print):
    """Stop the processes in and remove cgroup `name` in every hierarchy, unless a live run holds it."""
    _check_name(name)
    lock = _lock(name)
    try:
        root = _root(root)
        info = _info(detect_mode(root), root, name, name, name)
        present = [d for d in _dirs(info) if os.path.isdir(d)]
        if present:
            log(f"cgroup: cleaning up {', '.join(present)}")
            _remove(present, log)
    finally:
        os.close(lock)


def describe_mode(root=None):
    """One line naming the host's cgroup mode and where the hierarchies are."""
    root = _root(root)
    return {"v2": f"v2 (cpu and memory at {root})",
            "hybrid": f"hybrid (v1 cpu and memory under {root}, v2 at {root}/unified for cpu.pressure)",
            "v1": f"v1 (cpu and memory under {root}; no per-cgroup cpu.pressure)"}[detect_mode(root)]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Service cgroup helper (v2, hybrid, v1).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("detect", help="print the host's cgroup mode")
    p_run = sub.add_parser("run", help="run CMD inside a fresh limited cgroup")
    p_clean = sub.add_parser("cleanup", help="stop and remove a leftover cgroup")
    for p in (p_run, p_clean):
        p.add_argument("--name", default="llm_service")
    p_run.add_argument("--cpu-quota", type=float, default=50.0, help="percent of one CPU")
    p_run.add_argument("--cpu-period-us", type=int, default=100000)
    p_run.add_argument("--memory-max", default="4G", help="bytes, K/M/G/T suffix, or max")
    p_run.add_argument("--meta", help="cell JSON to add the whole-cell counters to")
    p_run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
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
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise CgroupError("run: no command given after --")
        if args.cpu_quota <= 0 or not 1000 <= args.cpu_period_us <= 1000000:
            raise CgroupError("--cpu-quota must be > 0 and --cpu-period-us within 1000..1000000")
        try:
            memory = parse_bytes(args.memory_max)
        except ValueError as e:
            raise CgroupError(str(e)) from None
        return run(args.name, args.cpu_quota, args.cpu_period_us, memory, cmd, args.meta, log)
    except CgroupError as e:
        print(f"cgroup_lib: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
