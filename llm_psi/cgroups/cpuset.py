"""Pinning a cgroup to CPUs (cpuset): a "host" of its own on one machine.

    pin(info, name, cpus) -> the directories it created, to place the processes into and remove after

v2 (and pure-v2 hosts): cpuset.cpus of the cgroup itself (info["cpu"]), after enabling the cpuset controller
in the root's cgroup.subtree_control; nothing new is created. v1 and hybrid: a cgroup `name` in the cpuset
hierarchy (<root>/cpuset/<name>) with cpuset.cpus and the parent's cpuset.mems (a v1 cpuset takes no task
until both are set). Each write is read back; a CPU list the machine lacks is a CgroupError.
"""
import os

from llm_psi.cgroups.fs import CgroupError, _read, _root, _write


def parse_cpus(text: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]; ValueError for an empty or malformed list."""
    out = []
    for part in (text or "").strip().split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad CPU list {text!r} (expected e.g. 0-2,5)")
        out.extend(range(int(lo), int(hi if sep else lo) + 1))
    if not out:
        raise ValueError(f"empty CPU list {text!r}")
    return sorted(set(out))


def pin(info, name, cpus: str, root=None) -> list[str]:
    """Pin cgroup info (made by create(name, ...)) to the CPU list cpus; returns the directories created (v1,
    hybrid: the cpuset cgroup; v2: none)."""
    want = parse_cpus(cpus)
    root = _root(root)
    if info["mode"] == "v2":
        control = os.path.join(root, "cgroup.subtree_control")
        if "cpuset" not in (_read(control) or "").split():
            _write(control, "+cpuset")
        path = os.path.join(info["cpu"], "cpuset.cpus")
        made = []
    else:
        base = os.path.join(root, "cpuset")
        if not os.path.isdir(base):
            raise CgroupError(f"no cpuset hierarchy at {base}")
        d = os.path.join(base, name)
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {d}: {e.strerror}") from e
        made = [d]
        path = os.path.join(d, "cpuset.cpus")
    try:
        if made:
            _write(os.path.join(made[0], "cpuset.mems"), _read(os.path.join(root, "cpuset", "cpuset.mems")) or "0")
        _write(path, cpus)
        got = _read(path)
        if not got or parse_cpus(got) != want:
            raise CgroupError(f"{path} reads {got!r} after writing {cpus!r}")
    except BaseException:
        for d in made:
            os.rmdir(d)
        raise
    return made
