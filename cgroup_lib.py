"""cgroup detection, creation, limits, counters and teardown for the service cgroup.

Supports pure cgroup v2, hybrid (v1 cpu + memory, v2 at <root>/unified) and pure v1.
The cgroupfs root is /sys/fs/cgroup, or $CGROUP_ROOT (tests use a fake tree). This module is the one place
that locates cgroup files, pressure files included: under $CGROUP_ROOT the system-wide pressure is the fake
root cgroup's <res>.pressure (on a real v2 host, Linux >= 5.2, the root cgroup's file shows the system-wide
figures), so a whole run, PSI included, can point at a fake tree; without it, /proc/pressure/<res>.

CLI (used by sweep_lib.sh):
  cgroup_lib.py detect
  cgroup_lib.py run --name llm_service --cpu-quota 50 --cpu-period-us 100000 --memory-max 4G
                    [--meta CELL.json] -- CMD...
  cgroup_lib.py run --name llm_service --unlimited [--meta CELL.json] -- CMD...
  cgroup_lib.py cleanup --name llm_service

SIGKILL-safe: the child of `run` gets PR_SET_PDEATHSIG(SIGKILL), so it dies with a SIGKILLed `run`; its
own children and the cgroup are left, and the next `run` or `cleanup` of the name (holding the name's
lock, so no live run owns it) stops those processes (cgroup.kill where the kernel has it) and removes it.
The child's environment has CGROUP_LIB_CELL=<name>; own_cell_cgroup() tells a program it runs in it.
Bad numbers or arguments: one line `cgroup_lib.py ...: error: ...` on stderr, exit status 2.
"""
import argparse
import ctypes
import fcntl
import json
import math
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
CELL_ENV = "CGROUP_LIB_CELL"     # set for the child of `run`: the name of the cell cgroup made for it
PROC_CGROUP = "/proc/self/cgroup"
PR_SET_PDEATHSIG = 1


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


def own_paths(proc_file=PROC_CGROUP):
    """{controller: this process's cgroup path relative to its hierarchy}; the key "" is the v2 (0::) one."""
    paths = {}
    with open(proc_file) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths.setdefault(c, path.strip("/"))
    return paths


def _pressure_file(root, rel, resource):
    """<resource>.pressure of v2 cgroup `rel` (in <root>/unified on hybrid hosts), None if there is none."""
    for base in (os.path.join(root, "unified"), root):
        path = _join(base, rel, f"{resource}.pressure")
        if os.path.exists(path):
            return path
    return None


def pressure_path(resource="cpu", root=None, proc_file=PROC_CGROUP):
    """<resource>.pressure of this process's v2 cgroup, or None where it has none (v1, no cgroup2 mounted)."""
    try:
        rel = own_paths(proc_file).get("")
    except (OSError, ValueError):
        return None
    return None if rel is None else _pressure_file(_root(root), rel, resource)


def system_pressure_path(resource="cpu", root=None):
    """The system-wide <resource> pressure: /proc/pressure/<resource>, or, under an injected root (root or
    $CGROUP_ROOT), that tree's root cgroup <resource>.pressure (the same figures on a real v2 host)."""
    root = root or os.environ.get("CGROUP_ROOT")
    if not root:
        return f"/proc/pressure/{resource}"
    return _pressure_file(root, "", resource) or os.path.join(root, f"{resource}.pressure")


def own_cgroup(root=None, proc_file=PROC_CGROUP):
    """Where this process runs: mode and the cpu, memory, unified dirs and cpu.pressure path (None: none)."""
    root = _root(root)
    mode = detect_mode(root)
    paths = own_paths(proc_file)
    info = _info(mode, root, paths.get("cpu", ""), paths.get("memory", ""), paths.get("", ""))
    info["pressure"] = _pressure_file(root, paths.get("", ""), "cpu") if info["unified"] else None
    return info


def own_cell_cgroup(info=None):
    """The name of the cell cgroup `run` made for this process: $CGROUP_LIB_CELL when the process's own
    cgroup (info, default own_cgroup()) is that one (cpu dir basename); None otherwise, or if unknown."""
    name = os.environ.get(CELL_ENV)
    if not name:
        return None
    try:
        info = info or own_cgroup()
    except (CgroupError, OSError):
        return None
    return name if os.path.basename(info["cpu"]) == name else None


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
    """Change from one read_counters() to a later one: counters subtracted, levels (keys naming a peak, e.g.
    memory_peak_bytes) kept as the later value, as is a key that is None or missing on either side. None if
    either reading is missing (None or empty)."""
    if not before or not after:
        return None
    return {k: v if "peak" in k or v is None or before.get(k) is None else v - before[k] for k, v in after.items()}


class CgroupProbe:
    """Limits and counters of the cgroup this process runs in (own_cgroup). Counters only where that cgroup
    was made for this run (own_cell_cgroup): elsewhere they would count other processes too. Never raises:
    why there are none is in `error` or `note`."""

    def __init__(self, root=None):
        self.info = self.limits = self.error = self.note = None
        self.own = False
        try:
            self.info = own_cgroup(root)
            self.limits = read_limits(self.info)
            self.own = bool(own_cell_cgroup(self.info))
        except Exception as e:  # recorded, never fatal
            self.error = f"{type(e).__name__}: {e}"
            return
        if not self.own:
            self.note = (f"no counters: this process does not run in a cgroup made for it by cgroup_lib.py run, so "
                         f"the counters of {self.info.get('cpu')} would include other processes")

    def counters(self):
        """read_counters() of the cell cgroup; None where it is not the cell's own or cannot be read."""
        if not self.own:
            return None
        try:
            return read_counters(self.info)
        except Exception:
            return None

    def describe(self):
        return {"info": self.info, "limits": self.limits, "own": self.own, "note": self.note, "error": self.error}


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


def _all_procs(directories):
    return sorted({p for d in directories for p in _procs(d)})


def _wait_empty(directories, wait_s):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _all_procs(directories):
        time.sleep(0.05)


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
    """Stop every process in the directories, then rmdir them: "1" to cgroup.kill where it exists
    (v2, and the unified cgroup on hybrid hosts), then SIGTERM and SIGKILL to whatever is left
    (v1 has no cgroup.kill)."""
    kill = [d for d in directories if os.path.exists(os.path.join(d, "cgroup.kill"))]
    if kill and _all_procs(directories):
        log(f"cgroup: killing the processes left in {', '.join(kill)} via cgroup.kill")
        for d in kill:
            _write(os.path.join(d, "cgroup.kill"), 1)
        _wait_empty(directories, 5.0)
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        pids = _all_procs(directories)
        if not pids:
            break
        log(f"cgroup: sending {sig.name} to {len(pids)} process(es) left in the cgroup: {pids}")
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        _wait_empty(directories, wait_s)
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
           root=None, log=print, stop_orphans=False):
    """Create cgroup `name` with the limits (None: no CPU quota / no memory limit); returns
    (info, created_dirs).

    A leftover of the same name (an earlier run that did not clean up, e.g. killed) is removed, and
    reported. With processes in it, it is refused, unless stop_orphans: run() passes it because it
    holds the name's lock, which proves no live run owns the leftover, so its processes are a killed
    run's orphans and are stopped. On failure everything created here is removed again.
    """
    _check_name(name)
    root = _root(root)
    mode = detect_mode(root)
    info = _info(mode, root, name, name, name)
    leftover = [d for d in _dirs(info) if os.path.isdir(d)]
    pids = _all_procs(leftover)
    if pids and not stop_orphans:
        raise CgroupError(f"leftover cgroup {', '.join(leftover)} still has processes {pids}; stop "
                          f"them or run: sudo python cgroup_lib.py cleanup --name {name}")
    if leftover:
        orphans = f"; no live run holds {name}: stopping its processes {pids}" if pids else ""
        log(f"cgroup: removing leftover cgroup {', '.join(leftover)} of an earlier run that did not "
            f"clean up (e.g. killed){orphans}")
        _remove(leftover, log)
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
        quota = None if cpu_quota_pct is None else round(cpu_period_us * cpu_quota_pct / 100)
        if mode == "v2":
            _write(os.path.join(info["cpu"], "cpu.max"),
                   f"{'max' if quota is None else quota} {cpu_period_us}")
            _write(os.path.join(info["memory"], "memory.max"),
                   "max" if memory_max_bytes is None else memory_max_bytes)
        else:
            _write(os.path.join(info["cpu"], "cpu.cfs_period_us"), cpu_period_us)
            _write(os.path.join(info["cpu"], "cpu.cfs_quota_us"), -1 if quota is None else quota)
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
    """preexec_fn: the child asks for SIGKILL when its parent (thread) dies, exits at once if the parent
    is already gone, and writes its own PID to each cgroup.procs before exec."""
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def place():
        if prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL)) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(1)
        for d in directories:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    return place


def _merge_meta(path, record, log):
    """Append record to the list under 'cgroup_runs' (one per run of the cell) in the JSON at path,
    keeping its other keys."""
    if not path or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not isinstance(meta.setdefault("cgroup_runs", []), list):
            raise ValueError("not a JSON object with a list under 'cgroup_runs'")
    except (OSError, ValueError) as e:
        log(f"cgroup: not recording the cell counters into {path}: {e}")
        return
    meta["cgroup_runs"].append(record)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, path)


def run(name, cpu_quota_pct, cpu_period_us, memory_max_bytes, cmd, meta=None, log=print):
    """Run cmd inside a fresh cgroup `name` (None limits: unlimited); tear down on every exit path.
    Returns exit status.

    SIGINT/SIGTERM/SIGHUP are forwarded to cmd (started in its own process group, with
    $CGROUP_LIB_CELL=name); after STOP_GRACE_S whatever is left in the cgroup is killed, the cgroup
    removed, and this process dies of the same signal. On SIGKILL cmd dies too (PR_SET_PDEATHSIG);
    a leftover cgroup with processes is a killed run's orphan (we hold the lock): it is stopped and
    removed. Call it from the main thread: the death signal follows the thread that starts cmd.
    """
    _check_name(name)
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
        info, created = create(name, cpu_quota_pct, cpu_period_us, memory_max_bytes, log=log,
                               stop_orphans=True)
        try:
            limits = read_limits(info)
            log(f"cgroup: {info['mode']} {name}: cpu {limits['cpu_quota_us'] or 'max'}/"
                f"{limits['cpu_period_us']} us, memory {limits['memory_max_bytes'] or 'max'} bytes")
            before, t0 = read_counters(info), time.monotonic()
            if not received:
                try:
                    child = subprocess.Popen(cmd, preexec_fn=_place(created), process_group=0,
                                             env={**os.environ, CELL_ENV: name})
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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_number(kind=float, gt=None, ge=None, le=None):
    """argparse type: a finite `kind` (float or int), > gt, >= ge, <= le where given; no nan, inf."""
    bounds = " and ".join(f"{op} {v}" for op, v in ((">", gt), (">=", ge), ("<=", le)) if v is not None)

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (gt is None or x > gt) and (ge is None or x >= ge)
                and (le is None or x <= le)):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} {bounds}, got {text!r}")
        return x
    return parse


def checked_by(check):
    """argparse type: the stripped text, once ``check(text)`` accepted it (its ValueError is the error)."""
    def parse(text):
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text.strip()
    return parse


def _memory_size(text):
    try:
        size = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size == 0:
        raise argparse.ArgumentTypeError("must be > 0 bytes or max, got '0'")
    return size


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
    p_run.add_argument("--meta", help="cell JSON: append the cell's counters to its list 'cgroup_runs'")
    p_run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.unlimited and {"cpu_quota", "memory_max"} & set(vars(args)):
            p_run.error("--unlimited conflicts with --cpu-quota and --memory-max")
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            p_run.error("no command given after --")
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
        return run(args.name, quota, args.cpu_period_us, memory, cmd, args.meta, log)
    except CgroupError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
