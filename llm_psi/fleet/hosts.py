"""One host of the fleet: a service instance (llm_server.py serve, with its agent port and instance name) in
a cgroup of its own pinned to its CPUs (cgroups.cpuset), and its owner, a co-tenant pinned to the same CPUs.

Cgroup names are per host (llm_fleet_<i> for the service, llm_fleet_<i>_owner for its owner), each held by
its lock while the host runs, so a leftover of a killed run is stopped and removed by the next start (as
cgroups.create does). Without isolation (no root, no cgroups: the tests of the balancer alone) the instance
runs as a plain child, unpinned and without an owner. Every child dies with the thread that started it
(cgroups.spawn: PR_SET_PDEATHSIG), so start hosts from the main thread.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from llm_psi import REPO, cgroups
from llm_psi.cgroups import cpuset
from llm_psi.load.cotenant import Cotenant

DRAIN_GRACE_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ask_agent(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> str | None:
    """The agent's one line (as HAProxy reads it), None where it does not answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while chunk := s.recv(256):
                data += chunk
        return data.decode().strip()
    except OSError:
        return None


def agent_weight(line: str | None) -> float | None:
    """The weight (%) in an agent line: 0 for drain, None where unknown."""
    if line is None:
        return None
    if "drain" in line.split():
        return 0.0
    for word in line.replace(",", " ").split():
        if word.endswith("%") and word[:-1].isdigit():
            return float(word[:-1])
    return None


def wait_healthy(url: str, proc, what: str, timeout_s: float) -> None:
    """Until GET url/health answers 200; RuntimeError if proc exits first or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready (see its log)")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready within {timeout_s:g} s")


class Host:
    """start() (from the main thread), wait_ready(), stop(); name, port, agent_port, owner."""

    def __init__(self, index: int, cpus: str | None, serve_args: list[str], owner_spec: str | None = None,
                 isolate: bool = True, log=print, log_dir: str | None = None):
        self.index, self.name, self.cpus, self.serve_args = index, f"h{index}", cpus, list(serve_args)
        self.owner_spec, self.isolate, self.log, self.log_dir = owner_spec, isolate, log, log_dir
        self.cgroup = f"llm_fleet_{index}"
        self.port, self.agent_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = self.owner = self._lock = self._out = None
        self.dirs: list[str] = []

    def start(self):
        env = dict(os.environ)
        if self.isolate:
            self._lock = cgroups.lock(self.cgroup)
            info, self.dirs = cgroups.create(self.cgroup, None, 100000, None, log=self.log, stop_orphans=True)
            if self.cpus:
                self.dirs += cpuset.pin(info, self.cgroup, self.cpus)
            env[cgroups.CELL_ENV] = self.cgroup
        cmd = [sys.executable, os.path.join(REPO, "llm_server.py"), "serve", "--port", str(self.port),
               "--agent-port", str(self.agent_port), "--instance-name", self.name, *self.serve_args]
        self._out = open(os.path.join(self.log_dir, f"{self.name}.log"), "a") if self.log_dir else subprocess.DEVNULL
        self.proc = cgroups.spawn(self.dirs, cmd, process_group=0, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                  stdout=self._out, stderr=subprocess.STDOUT)
        if self.owner_spec and self.isolate:
            self.owner = Cotenant(self.owner_spec, name=f"{self.cgroup}_owner", cpus=self.cpus, log=self.log).start()
            self.owner.pause()                      # idle until its schedule says otherwise
        where = f"cgroup {self.cgroup} on CPUs {self.cpus}" if self.isolate else "no cgroup, unpinned"
        self.log(f"fleet: {self.name} pid {self.proc.pid} on :{self.port} (agent :{self.agent_port}), {where}")
        return self

    def wait_ready(self, timeout_s: float) -> None:
        wait_healthy(self.url, self.proc, self.name, timeout_s)

    def stop(self) -> None:
        """Drain the instance (SIGTERM; SIGKILL after DRAIN_GRACE_S), stop its owner, remove its cgroups;
        idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DRAIN_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.owner is not None:
            self.owner.stop()
        if self.dirs:
            cgroups.remove(self.dirs, self.log)
            self.dirs = []
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self._out not in (None, subprocess.DEVNULL):
            self._out.close()
            self._out = None


def cleanup(index: int, root=None, log=print) -> None:
    """Remove what a killed run left of host index (its processes died with it): its service's and its owner's
    cgroups in every hierarchy, the cpuset ones included. CgroupError where a live run holds them."""
    for name in (f"llm_fleet_{index}", f"llm_fleet_{index}_owner"):
        cgroups.cleanup(name, root=root, log=log)
        held = cgroups.lock(name)
        try:
            d = os.path.join(root or os.environ.get("CGROUP_ROOT") or "/sys/fs/cgroup", "cpuset", name)
            if os.path.isdir(d):
                cgroups.remove([d], log)
        finally:
            os.close(held)
