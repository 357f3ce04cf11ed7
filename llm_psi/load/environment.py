"""The environment of a cell: the git state of the code and the host and software facts a reader needs to
interpret the numbers (recorded in the cell's metadata JSON)."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys

from llm_psi import REPO

HERE = REPO  # the repository root: the root scripts, reference/, results/


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def code_state() -> dict:
    """The commit of the code and whether tracked code differs from it (the data aside: a sweep into results/
    changes tracked cells while it runs)."""
    return {"git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                   ":(exclude)results", ":(exclude)paper.pdf"))}


def _version(package: str) -> str | None:
    """An installed package's version, without importing it (torch and transformers take ~6 CPU-seconds to
    import: a load generator that only talks HTTP to a service need not pay them)."""
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(identity: dict) -> dict:
    """Facts about the host and software that a reader needs to interpret the numbers. The torch thread counts
    are this process's where it runs torch (an in-process engine), None where it never imported torch (a load
    generator in service mode: the service's own are in its identity, ``identity``)."""
    torch = sys.modules.get("torch")
    cpuinfo = (_read("/proc/cpuinfo") or "").splitlines()
    cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                     platform.processor() or None)
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    mem = next((int(line.split()[1]) * 1024 for line in (_read("/proc/meminfo") or "").splitlines()
                if line.startswith("MemTotal:")), None)
    return {
        **code_state(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "numpy")},
        "torch_threads": torch.get_num_threads() if torch else None,
        "torch_interop_threads": torch.get_num_interop_threads() if torch else None,
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "cpu_model": cpu_model,
        "cpu_simd": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem,
        "kernel": platform.release(),
        "proc_self_cgroup": (_read("/proc/self/cgroup") or "").splitlines(),
        "model": identity,
    }
