"""Cgroups, behind this public API: the filesystem layer (fs: detect the mode, locate files, read limits and
counters) and cells (cell: create a cgroup for one run, place a process in it, run, clean up).

Pure v2, hybrid (v1 cpu and memory, v2 at <root>/unified) and pure v1 are supported. Nothing here touches a
cgroup that it did not create.
"""
from llm_psi.cgroups.cell import (LOCK_DIR, NAME_RE, STOP_GRACE_S, cleanup, create, lock, merge_meta, place,
                                  remove, run, spawn)
from llm_psi.cgroups.fs import (CELL_ENV, UNLIMITED_BYTES, CgroupError, CgroupProbe, cgroup_dirs, cgroup_info,
                                check_sharing, counter_delta, cpu_quota_cores, describe_mode, detect_mode,
                                own_cell_cgroup, own_cgroup, own_paths, parse_bytes, parse_cpu_list, pressure_path,
                                procs, read_counters, read_cpus, read_limits, read_sharing, system_pressure_path,
                                weight_to_shares)

__all__ = ["LOCK_DIR", "NAME_RE", "STOP_GRACE_S", "cleanup", "create", "lock", "merge_meta", "place", "remove",
           "run", "spawn", "CELL_ENV", "UNLIMITED_BYTES", "CgroupError", "CgroupProbe", "cgroup_dirs", "cgroup_info",
           "counter_delta", "cpu_quota_cores", "describe_mode", "detect_mode", "own_cell_cgroup", "own_cgroup",
           "own_paths", "parse_bytes", "parse_cpu_list", "read_cpus", "pressure_path", "procs", "read_counters",
           "read_limits",
           "system_pressure_path", "check_sharing", "read_sharing", "weight_to_shares"]
