"""Cells: a cgroup made for one run, with its limits, the process placed in it, and teardown on every exit
path (run, cleanup).

SIGKILL-safe: the child of `run` gets PR_SET_PDEATHSIG(SIGKILL), so it dies with a SIGKILLed `run`; its
own children and the cgroup are left, and the next `run` or `cleanup` of the name (holding the name's
lock, so no live run owns it) stops those processes (cgroup.kill where the kernel has it) and removes it.
The child's environment has CGROUP_LIB_CELL=<name>; own_cell_cgroup() tells a program it runs in it.
It never touches cgroups it did not create.
"""
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from llm_psi.cgroups import cpuset
from llm_psi.cgroups.fs import (CELL_ENV, CgroupError, _read, _root, _write, cgroup_dirs, cgroup_info, check_sharing,
                                counter_delta, detect_mode, procs, read_counters, read_limits, read_sharing,
                                weight_to_shares)

STOP_GRACE_S = 5.0               # after a forwarded signal, before the cgroup is killed



LOCK_DIR = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()



NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")



ENTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enter.py")  # the exec wrapper of place()



def _check_name(name):
    if not NAME_RE.match(name):
        raise CgroupError(f"bad cgroup name {name!r} (letters, digits, _ . - only)")



def _all_procs(directories):
    return sorted({p for d in directories for p in procs(d)})



def _wait_empty(directories, wait_s):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _all_procs(directories):
        time.sleep(0.05)



def lock(name):
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



def remove(directories, log):
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
           root=None, log=print, stop_orphans=False, cpu_weight=None, cpu_idle=False, cpu_burst_us=None):
    """Create cgroup `name` with the limits (None: no CPU quota / no memory limit) and the kernel's sharing
    controls (cpu_weight 1..10000: v2 cpu.weight, v1 cpu.shares = weight * 1024 / 100 as systemd maps it;
    cpu_idle: cpu.idle = 1; cpu_burst_us: v2 cpu.max.burst, v1 cpu.cfs_burst_us, needs a quota; None/False:
    the kernel's defaults, untouched); returns (info, created_dirs). Bad sharing values: ValueError.

    A leftover of the same name (an earlier run that did not clean up, e.g. killed) is removed, and
    reported. With processes in it, it is refused, unless stop_orphans: run() passes it because it
    holds the name's lock, which proves no live run owns the leftover, so its processes are a killed
    run's orphans and are stopped. On failure everything created here is removed again.
    """
    _check_name(name)
    quota = None if cpu_quota_pct is None else round(cpu_period_us * cpu_quota_pct / 100)
    check_sharing(cpu_weight, cpu_idle, cpu_burst_us, quota)
    root = _root(root)
    mode = detect_mode(root)
    info = cgroup_info(mode, root, name, name, name)
    leftover = [d for d in cgroup_dirs(info) if os.path.isdir(d)]
    pids = _all_procs(leftover)
    if pids and not stop_orphans:
        raise CgroupError(f"leftover cgroup {', '.join(leftover)} still has processes {pids}; stop "
                          f"them or run: sudo python cgroup_lib.py cleanup --name {name}")
    if leftover:
        orphans = f"; no live run holds {name}: stopping its processes {pids}" if pids else ""
        log(f"cgroup: removing leftover cgroup {', '.join(leftover)} of an earlier run that did not "
            f"clean up (e.g. killed){orphans}")
        remove(leftover, log)
    if mode == "v2":
        control = os.path.join(root, "cgroup.subtree_control")
        enabled = set((_read(control) or "").split())
        if not {"cpu", "memory"} <= enabled:
            _write(control, "+cpu +memory")
    created = []
    try:
        for d in cgroup_dirs(info):
            try:
                os.mkdir(d)
            except OSError as e:
                raise CgroupError(f"cannot create cgroup {d}: {e.strerror}") from e
            created.append(d)
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
        _set_sharing(info, cpu_weight, cpu_idle, cpu_burst_us)
    except BaseException:
        remove(created, log)
        raise
    return info, created



def _set_sharing(info, weight, idle, burst_us):
    """Write the sharing controls that are set into the cpu cgroup and check them read back."""
    v2, d = info["mode"] == "v2", info["cpu"]
    want = {}
    if weight is not None:
        key, value = ("cpu_weight", weight) if v2 else ("cpu_shares", weight_to_shares(weight))
        _write(os.path.join(d, "cpu.weight" if v2 else "cpu.shares"), value)
        want[key] = value
    if idle:
        _write(os.path.join(d, "cpu.idle"), 1)
        want["cpu_idle"] = 1
    if burst_us is not None:
        _write(os.path.join(d, "cpu.max.burst" if v2 else "cpu.cfs_burst_us"), burst_us)
        want["cpu_burst_us"] = burst_us
    got = read_sharing(info)
    if any(got[k] != v for k, v in want.items()):
        raise CgroupError(f"sharing controls read back from {d} differ from those written: {got}, wanted {want}")


def describe_sharing(sharing):
    """', weight 10, idle, burst 20000 us' for the controls that differ from the kernel's defaults."""
    weighted = sharing.get("cpu_weight") not in (None, 100) and not sharing.get("cpu_idle")  # idle: the least weight
    parts = [f"weight {sharing['cpu_weight']}" if weighted else "",
             "idle" if sharing.get("cpu_idle") else "",
             f"burst {sharing['cpu_burst_us']} us" if sharing.get("cpu_burst_us") else ""]
    return "".join(f", {p}" for p in parts if p)


def place(directories, cmd, ready_fd=None):
    """The argv that runs cmd inside each of the cgroup directories (possibly none), safe from a threaded
    parent: the exec wrapper enter.py asks for SIGKILL when its parent (the thread that starts it) dies,
    exits at once if that parent is already gone, writes its own PID to each cgroup.procs and execs cmd
    (ready_fd: see enter.py; spawn() uses it)."""
    if not cmd:
        raise ValueError("place: empty command")
    ready = [] if ready_fd is None else ["--ready", str(ready_fd)]
    return [sys.executable, ENTER, "--parent", str(os.getpid()), *ready, *directories, "--", *cmd]


def spawn(directories, cmd, pass_fds=(), **popen):
    """Popen of cmd inside the cgroup directories (see place), returned once cmd runs there; raises OSError,
    as Popen does, if cmd cannot be started or a cgroup not joined (the wrapper is then reaped). An exception
    while it waits (a stop signal's) kills the process before it propagates."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(place(directories, cmd, w), pass_fds=(w, *pass_fds), **popen)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            failure = ready.read()
    except BaseException:                 # e.g. a stop signal raised meanwhile: no untracked process left
        proc.kill()
        proc.wait()
        raise
    if failure:
        proc.wait()
        err, _, msg = failure.decode(errors="replace").partition(" ")
        raise OSError(int(err) if err.isdigit() else 0, msg)
    return proc



def merge_meta(path, record, log):
    """Append record to the list under 'cgroup_runs' (one per run of the cell) in the JSON at path,
    keeping its other keys. A file that does not exist (the command did not write it) is reported, not made."""
    if not path:
        return
    if not os.path.exists(path):
        log(f"cgroup: not recording the cell counters: {path} does not exist (the command did not write it)")
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



def run(name, cpu_quota_pct, cpu_period_us, memory_max_bytes, cmd, meta=None, log=print, cpus=None, **sharing):
    """Run cmd inside a fresh cgroup `name` (None limits: unlimited; sharing: create()'s cpu_weight, cpu_idle,
    cpu_burst_us; cpus: a CPU list that the cgroup is pinned to, cpuset.pin); tear down on every exit path.
    Returns exit status.

    SIGINT/SIGTERM/SIGHUP are forwarded to cmd (started in its own process group, with
    $CGROUP_LIB_CELL=name); after STOP_GRACE_S whatever is left in the cgroup is killed, the cgroup
    removed, and this process dies of the same signal. On SIGKILL cmd dies too (PR_SET_PDEATHSIG);
    a leftover cgroup with processes is a killed run's orphan (we hold the lock): it is stopped and
    removed. Call it from the main thread: the death signal follows the thread that starts cmd.
    """
    _check_name(name)
    held = lock(name)
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
                               stop_orphans=True, **sharing)
        try:
            if cpus:
                created += cpuset.pin(info, name, cpus)
            limits, shares = read_limits(info), read_sharing(info)
            log(f"cgroup: {info['mode']} {name}: cpu {limits['cpu_quota_us'] or 'max'}/"
                f"{limits['cpu_period_us']} us, memory {limits['memory_max_bytes'] or 'max'} bytes"
                f"{describe_sharing(shares)}{f', cpus {cpus}' if cpus else ''}")
            before, t0 = read_counters(info), time.monotonic()
            if not received:
                try:
                    child = spawn(created, cmd, process_group=0, env={**os.environ, CELL_ENV: name})
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
                          "sharing": shares, "cpus": cpus, "counters": counter_delta(before, read_counters(info)),
                          "wall_s": round(time.monotonic() - t0, 3), "exit_status": child.returncode,
                          "stopped_by": signal.Signals(received[0][0]).name if received else None}
                merge_meta(meta, record, log)
        finally:
            remove(created, log)
            if child is not None:
                child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(held)
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
    held = lock(name)
    try:
        root = _root(root)
        mode = detect_mode(root)
        info = cgroup_info(mode, root, name, name, name)
        pinned = [] if mode == "v2" else [os.path.join(root, "cpuset", name)]   # run(cpus=...)'s v1 cpuset
        present = [d for d in cgroup_dirs(info) + pinned if os.path.isdir(d)]
        if present:
            log(f"cgroup: cleaning up {', '.join(present)}")
            remove(present, log)
    finally:
        os.close(held)

