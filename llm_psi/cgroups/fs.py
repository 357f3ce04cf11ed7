"""The cgroup filesystem layer: detect the host's mode (v2, hybrid, v1), locate cgroup and pressure files,
read limits and counters.

The cgroupfs root is /sys/fs/cgroup, or $CGROUP_ROOT (tests use a fake tree). This module is the one place
that locates cgroup files, pressure files included: under $CGROUP_ROOT the system-wide pressure is the fake
root cgroup's <res>.pressure (on a real v2 host, Linux >= 5.2, the root cgroup's file shows the system-wide
figures), so a whole run, PSI included, can point at a fake tree; without it, /proc/pressure/<res>.
"""
import os
import re

CELL_ENV = "CGROUP_LIB_CELL"     # set for the child of `run`: the name of the cell cgroup made for it

UNLIMITED_BYTES = 1 << 62        # v1 reports "no limit" as ~2^63 rounded to a page



PROC_CGROUP = "/proc/self/cgroup"



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



def cgroup_info(mode, root, cpu, memory, unified):
    """Directories of a cgroup given its path in the cpu, memory and unified hierarchies."""
    if mode == "v2":
        d = _join(root, unified)
        return {"mode": mode, "cpu": d, "memory": d, "unified": d,
                "pressure": _join(d, "cpu.pressure")}
    uni = _join(root, "unified", unified) if mode == "hybrid" else None
    return {"mode": mode, "cpu": _join(root, "cpu", cpu), "memory": _join(root, "memory", memory),
            "unified": uni, "pressure": _join(uni, "cpu.pressure") if uni else None}



def cgroup_dirs(info):
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
    info = cgroup_info(mode, root, paths.get("cpu", ""), paths.get("memory", ""), paths.get("", ""))
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



MAX_WEIGHT = 10000              # v2 cpu.weight range 1..10000 (default 100)
V1_SHARES_RANGE = (2, 262144)    # v1 cpu.shares range (default 1024)


def weight_to_shares(weight):
    """v1 cpu.shares for a v2 cpu.weight, as systemd maps CPUWeight= on v1: weight * 1024 / 100, clamped."""
    return min(max(weight * 1024 // 100, V1_SHARES_RANGE[0]), V1_SHARES_RANGE[1])


def check_sharing(cpu_weight=None, cpu_idle=False, cpu_burst_us=None, quota_us=None):
    """Raise ValueError (one line) unless the kernel's sharing controls make sense together: a weight of
    1..MAX_WEIGHT, idle without a weight (idle replaces it), a burst of 0..quota that needs a quota."""
    if cpu_weight is not None and not (isinstance(cpu_weight, int) and 1 <= cpu_weight <= MAX_WEIGHT):
        raise ValueError(f"--cpu-weight (cpu_weight) must be a whole number from 1 to {MAX_WEIGHT}, got {cpu_weight!r}")
    if cpu_idle and cpu_weight is not None:
        raise ValueError("--cpu-idle and --cpu-weight exclude each other (an idle cgroup has the lowest weight)")
    if cpu_burst_us is not None:
        if not (isinstance(cpu_burst_us, int) and cpu_burst_us >= 0):
            raise ValueError(f"--cpu-burst-us (cpu_burst_us) must be a whole number of microseconds >= 0, got {cpu_burst_us!r}")
        if quota_us is None:
            raise ValueError("--cpu-burst-us needs a CPU quota, not --unlimited (a burst carries unused quota over)")
        if cpu_burst_us > quota_us:
            raise ValueError(f"--cpu-burst-us {cpu_burst_us} exceeds the quota of {quota_us} us per period")


def read_sharing(info):
    """The kernel's CPU-sharing controls as read from the files: cpu_weight (v2 cpu.weight; on v1 derived from
    cpu.shares), cpu_shares (v1 only), cpu_idle (0/1), cpu_burst_us (v2 cpu.max.burst, v1 cpu.cfs_burst_us);
    None where the kernel has no such file."""
    d = info["cpu"]
    if info["mode"] == "v2":
        weight, shares = _int_or_none(_read(os.path.join(d, "cpu.weight"))), None
        burst = _int_or_none(_read(os.path.join(d, "cpu.max.burst")))
    else:
        shares = _int_or_none(_read(os.path.join(d, "cpu.shares")))
        weight = None if shares is None else max(1, round(shares * 100 / 1024))
        burst = _int_or_none(_read(os.path.join(d, "cpu.cfs_burst_us")))
    return {"cpu_weight": weight, "cpu_shares": shares, "cpu_idle": _int_or_none(_read(os.path.join(d, "cpu.idle"))),
            "cpu_burst_us": burst}


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
        self.info = self.limits = self.sharing = self.error = self.note = None
        self.own = False
        try:
            self.info = own_cgroup(root)
            self.limits, self.sharing = read_limits(self.info), read_sharing(self.info)
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
        return {"info": self.info, "limits": self.limits, "sharing": self.sharing, "own": self.own, "note": self.note, "error": self.error}



def cpu_quota_cores(info=None):
    """CPU quota / period of the cgroup we are in (or info), None if unlimited."""
    limits = read_limits(info or own_cgroup())
    if limits["cpu_quota_us"] is None or not limits["cpu_period_us"]:
        return None
    return limits["cpu_quota_us"] / limits["cpu_period_us"]



def parse_cpu_list(text):
    """A kernel CPU list ('0-3,8,10-11') as a sorted list of CPU numbers; None for a missing or empty one."""
    if not text or not text.strip():
        return None
    cpus = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cpus)


def _up(base, rel):
    """The directories from base/rel up to base, deepest first."""
    parts = [p for p in rel.split("/") if p]
    return [_join(base, *parts[:i]) if i else base for i in range(len(parts), -1, -1)]


def _quota_of(mode, d):
    if mode == "v2":
        fields = (_read(os.path.join(d, "cpu.max")) or "max").split()
        quota, period = _int_or_none(fields[0]), _int_or_none(fields[-1]) if len(fields) > 1 else None
    else:
        quota = _int_or_none(_read(os.path.join(d, "cpu.cfs_quota_us")))
        period = _int_or_none(_read(os.path.join(d, "cpu.cfs_period_us")))
    return quota / period if quota is not None and quota > 0 and period else None


def read_cpus(root=None, proc_file=PROC_CGROUP):
    """The CPU that this process's cgroups let it use: quota_cores (the smallest quota / period of its cpu
    cgroup and its ancestors; None: no quota), cpuset (the CPUs its cpuset allows, v2
    cpuset.cpus.effective or v1 cpuset.effective_cpus/cpuset.cpus of the nearest cgroup that has one; None:
    unknown), cpu_weight and cpu_idle of its own cgroup (read_sharing; v1 cpu.shares mapped to a weight)."""
    root = _root(root)
    mode = detect_mode(root)
    paths = own_paths(proc_file)
    if mode == "v2":
        cpu_dirs = cpuset_dirs = _up(root, paths.get("", ""))
        cpuset_files = ("cpuset.cpus.effective",)
    else:
        cpu_dirs = _up(os.path.join(root, "cpu"), paths.get("cpu", ""))
        cpuset_dirs = _up(os.path.join(root, "cpuset"), paths.get("cpuset", ""))
        cpuset_files = ("cpuset.effective_cpus", "cpuset.cpus")
    quotas = [q for q in (_quota_of(mode, d) for d in cpu_dirs) if q is not None]
    cpuset = next((c for d in cpuset_dirs for name in cpuset_files
                   for c in [parse_cpu_list(_read(os.path.join(d, name)))] if c), None)
    sharing = read_sharing({"mode": mode, "cpu": cpu_dirs[0]})
    return {"mode": mode, "quota_cores": min(quotas) if quotas else None, "cpuset": cpuset,
            "cpu_weight": sharing["cpu_weight"], "cpu_idle": sharing["cpu_idle"]}


def parse_bytes(text):
    """'4G' -> 4294967296 (K/M/G/T are powers of 1024); 'max' -> None."""
    if text.lower() == "max":
        return None
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad memory size {text!r} (expected e.g. 4G, 512M, 1073741824 or max)")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")



def procs(directory):
    """PIDs in a cgroup directory (empty if it has no cgroup.procs)."""
    text = _read(os.path.join(directory, "cgroup.procs"))
    return [int(p) for p in text.split()] if text else []



def describe_mode(root=None):
    """One line naming the host's cgroup mode and where the hierarchies are."""
    root = _root(root)
    return {"v2": f"v2 (cpu and memory at {root})",
            "hybrid": f"hybrid (v1 cpu and memory under {root}, v2 at {root}/unified for cpu.pressure)",
            "v1": f"v1 (cpu and memory under {root}; no per-cgroup cpu.pressure)"}[detect_mode(root)]

