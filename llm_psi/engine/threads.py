"""The engine's torch threads and OpenMP wait policy, set from the CPU that the process may use.

Under a CPU limit, every thread beyond the CPU the process may use only waits for its turn, and an OpenMP
worker that spins between parallel regions burns quota that the request then waits for
(``results/threads/``: two threads with libgomp's default policy cost a request ~1.7x the time of
``passive``). So by default (``--torch-threads auto --omp-wait-policy auto``, every entry point):

- threads = the whole CPUs the process may use: its cpuset (and affinity), capped by the smallest CPU quota
  of its cgroup and their ancestors, rounded down, at least 1 (``derive``, a pure function of those inputs);
- ``OMP_WAIT_POLICY=PASSIVE``: idle workers sleep instead of spinning, under a quota (where spinning costs
  the request its own quota) and without one (where it takes CPU from every other tenant of the host; a
  weight or ``cpu.idle`` shares only the CPU that is busy). An ``OMP_WAIT_POLICY`` already in the
  environment is kept: it is the user's choice.

The paper's three configurations keep what the paper's code ran with: torch's own thread count
(``--torch-threads default``) and no ``OMP_WAIT_POLICY`` (``--omp-wait-policy unset``: libgomp's default,
which spins a while before it sleeps).

libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it: ``apply`` writes the environment before the
first ``import torch`` of the process, and records whether it came too late (torch imported already). The
record (``threads``, ``omp_wait_policy``, what they came from) goes into the engine's identity, hence into
every cell's JSON.
"""
from __future__ import annotations

import os
import sys

POLICIES = ("auto", "passive", "active", "unset")   # --omp-wait-policy; None: leave the environment alone
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def derive(quota_cores=None, cpuset=None, cpu_count=None) -> int:
    """The thread count for a process that may use the CPUs of ``cpuset`` (a list; None: ``cpu_count``, the
    host's) under a quota of ``quota_cores`` CPUs (None: none): whole CPUs, rounded down, at least 1. A
    weight does not bound it: a weighted cgroup gets every CPU that nobody else wants."""
    cpus = len(cpuset) if cpuset else (cpu_count or 1)
    cores = min(cpus, quota_cores) if quota_cores else cpus
    return max(1, int(cores))


def available(root=None) -> dict:
    """What this process may use: ``read_cpus`` of its cgroups, the cpuset narrowed to its CPU affinity
    (``os.sched_getaffinity``: a cpuset or taskset the cgroup files may not show) unless ``root`` names
    another tree (tests); {} entries where the cgroup files cannot be read."""
    from llm_psi import cgroups
    try:
        cpus = cgroups.read_cpus(root)
    except (cgroups.CgroupError, OSError, ValueError) as e:
        cpus = {"quota_cores": None, "cpuset": None, "error": f"{type(e).__name__}: {e}"}
    if root is None and not os.environ.get("CGROUP_ROOT") and hasattr(os, "sched_getaffinity"):
        mask = set(os.sched_getaffinity(0))
        cpus["cpuset"] = sorted(mask & set(cpus.get("cpuset") or mask) or mask)
    return cpus


def resolve_threads(value, cpus=None) -> int | None:
    """``None``/``'default'`` keeps torch's own count; ``'auto'`` derives it from ``cpus`` (default:
    ``available()``); an int (or its text) is taken as is."""
    if value in (None, "", "default"):
        return None
    if value == "auto":
        cpus = available() if cpus is None else cpus
        return derive(cpus.get("quota_cores"), cpus.get("cpuset"), os.cpu_count())
    n = int(value)
    if n < 1:
        raise ValueError(f"torch threads must be >= 1, got {n}")
    return n


def resolve_policy(value, environ=None) -> tuple[str | None, str]:
    """(OMP_WAIT_POLICY to run with, None for none; where it came from) for ``--omp-wait-policy value``."""
    environ = os.environ if environ is None else environ
    if value is None:
        return environ.get("OMP_WAIT_POLICY"), "environment"
    if value not in POLICIES:
        raise ValueError(f"omp wait policy must be one of {', '.join(POLICIES)}, got {value!r}")
    if value == "auto":
        return (environ["OMP_WAIT_POLICY"], "environment") if environ.get("OMP_WAIT_POLICY") else ("PASSIVE", "auto")
    return (None, "unset") if value == "unset" else (value.upper(), "option")


def apply(torch_threads=None, omp_wait_policy=None) -> dict:
    """Resolve both settings and write them into the environment (and torch's, once imported by the caller):
    the record of what the process runs with. ``settled_before_torch`` is False where torch was imported
    before this call: OpenMP then kept the policy it had read."""
    cpus = available() if torch_threads == "auto" else None
    threads = resolve_threads(torch_threads, cpus)
    policy, source = resolve_policy(omp_wait_policy)
    early = "torch" not in sys.modules
    if threads is not None:
        for var in THREAD_VARS:
            os.environ[var] = str(threads)
    if omp_wait_policy is not None:
        if policy is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = policy
    record = {"torch_threads_option": torch_threads, "threads_resolved": threads, "omp_wait_policy": policy,
              "omp_wait_policy_source": source, "settled_before_torch": early}
    if cpus is not None:
        record["cpus"] = {k: cpus.get(k) for k in ("quota_cores", "cpuset", "cpu_weight", "cpu_idle", "error")
                          if k in cpus}
    return record
