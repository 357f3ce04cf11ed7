"""HAProxy in front of the fleet: its configuration, generated from the instances, and its process.

Balancers (``BALANCERS``):
    roundrobin  each server in turn
    leastconn   the server with the fewest connections
    agent       weighted round robin, each server's weight and maxconn set by its agent check every
                AGENT_INTER (the service's --agent-port; service/headroom.py states the law)

Every balancer health-checks GET /health (a loading or draining instance answers 503 and goes down after
FALL failures). HAProxy runs in the foreground (-db) as a child that dies with its parent (cgroups.spawn's
exec wrapper sets PR_SET_PDEATHSIG), never daemonised.
"""
from __future__ import annotations

import shutil
import signal
import subprocess

from llm_psi import cgroups

BALANCERS = ("roundrobin", "leastconn", "agent")
AGENT_INTER = "500ms"
CHECK_INTER = "1s"
FALL = 2
TIMEOUT = "600s"     # client, server and queue: a generation may take minutes on a busy host


def binary() -> str | None:
    """The haproxy on PATH or in /usr/sbin, else None."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def config(balancer: str, servers: list[dict], port: int, host: str = "127.0.0.1") -> str:
    """The configuration text: one frontend on host:port, one backend of ``servers`` (dicts: name, port,
    agent_port) balanced by ``balancer``. ValueError for an unknown balancer or no server."""
    if balancer not in BALANCERS:
        raise ValueError(f"unknown balancer {balancer!r}; choose from {', '.join(BALANCERS)}")
    if not servers:
        raise ValueError("a backend needs at least one server")
    lines = ["global", "    maxconn 4096", "", "defaults", "    mode http", "    timeout connect 5s",
             f"    timeout client {TIMEOUT}", f"    timeout server {TIMEOUT}", f"    timeout queue {TIMEOUT}",
             "    retries 3", "    option redispatch", "", "frontend llm", f"    bind {host}:{port}",
             "    default_backend llm", "", "backend llm",
             f"    balance {'roundrobin' if balancer == 'agent' else balancer}",
             "    option httpchk", "    http-check send meth GET uri /health ver HTTP/1.1 hdr Host 127.0.0.1",
             "    http-check expect status 200"]
    for s in servers:
        agent = (f" agent-check agent-port {s['agent_port']} agent-inter {AGENT_INTER}" if balancer == "agent" else "")
        lines.append(f"    server {s['name']} {host}:{s['port']} check inter {CHECK_INTER} fall {FALL} rise 1 "
                     f"weight 100{agent}")
    return "\n".join(lines) + "\n"


def check(path: str, exe: str | None = None) -> None:
    """haproxy -c on the file: ValueError with HAProxy's own message if it rejects it."""
    r = subprocess.run([exe or binary(), "-c", "-f", path], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise ValueError(f"haproxy rejects {path}: {(r.stdout + r.stderr).strip()[-500:]}")


def start(path: str, log_file, exe: str | None = None) -> subprocess.Popen:
    """HAProxy on the checked configuration, in the foreground (-db), its output to log_file; it dies with
    this process's thread that started it (even on SIGKILL)."""
    exe = exe or binary()
    if exe is None:
        raise FileNotFoundError("haproxy is not installed (Debian: apt-get install haproxy)")
    check(path, exe)
    return cgroups.spawn([], [exe, "-db", "-f", path], process_group=0, stdin=subprocess.DEVNULL,
                         stdout=log_file, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGUSR1 (HAProxy's soft stop: finish what is in flight), then SIGKILL after grace_s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
