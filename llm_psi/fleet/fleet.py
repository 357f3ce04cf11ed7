"""The fleet, started and stopped as one: N hosts (hosts.py), their owners' schedule (owners.py), HAProxy in
front (haproxy.py). ``Fleet`` is a context manager; stop() runs on every exit path (called, at the end of a
``with``, at exit, and after SIGTERM/SIGHUP/Ctrl-C once ``stop_on_signals`` has turned them into
KeyboardInterrupt), and a SIGKILLed parent takes every child with it (the death signal of cgroups.spawn).

    python -m llm_psi.fleet --hosts 2 --balancer agent --owner cpu:1+probe:100:10 --phase-s 30 -- --tiny
"""
from __future__ import annotations

import atexit
import os
import signal
import tempfile
import threading
import time

from llm_psi import cli
from llm_psi.fleet import haproxy
from llm_psi.fleet.hosts import Host, agent_weight, ask_agent, free_port, wait_healthy
from llm_psi.fleet.owners import Schedule


def host_cpus(n: int, per_host: int = 1, cpu_count: int | None = None) -> list[str]:
    """CPU lists of n hosts of per_host CPUs each, in order, wrapping around the machine's CPUs."""
    total = cpu_count or os.cpu_count() or 1
    return [",".join(str((i * per_host + k) % total) for k in range(per_host)) for i in range(n)]


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as Ctrl-C does, so the with-blocks
    and finally-clauses that stop the fleet run."""
    def raise_interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)


class Fleet:
    def __init__(self, n: int, balancer: str, serve_args: list[str], *, owner_spec: str | None = None,
                 phase_s: float | None = None, cpus_per_host: int = 1, isolate: bool = True, workdir: str | None = None,
                 port: int | None = None, ready_timeout_s: float = 600.0, log=print):
        if balancer not in haproxy.BALANCERS:
            raise ValueError(f"unknown balancer {balancer!r}; choose from {', '.join(haproxy.BALANCERS)}")
        if n < 1:
            raise ValueError(f"a fleet needs at least one host, got {n}")
        self.workdir = workdir or tempfile.mkdtemp(prefix="llm_fleet_")
        os.makedirs(self.workdir, exist_ok=True)
        self.balancer, self.phase_s, self.log, self.ready_timeout_s = balancer, phase_s, log, ready_timeout_s
        self.hosts = [Host(i, cpus if isolate else None, serve_args, owner_spec, isolate, log, self.workdir)
                      for i, cpus in enumerate(host_cpus(n, cpus_per_host))]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proxy = self.schedule = self._proxy_log = None
        self.t0 = None
        self.stopped = False

    def start(self) -> "Fleet":
        """Start every host (from the main thread), wait until each is ready, then HAProxy, then the owners'
        schedule (t0: its start). On any failure everything started is stopped before the error propagates."""
        atexit.register(self.stop)
        try:
            for h in self.hosts:
                h.start()
            for h in self.hosts:
                h.wait_ready(self.ready_timeout_s)
            self._proxy_log = open(os.path.join(self.workdir, "haproxy.log"), "a")
            self.switch(self.balancer)
        except BaseException:
            self.stop()
            raise
        self.log(f"fleet: {len(self.hosts)} hosts behind HAProxy ({self.balancer}) at {self.url}")
        return self

    def switch(self, balancer: str) -> float:
        """(Re)start HAProxy with ``balancer`` and the owners' schedule from now (phase 0: host 0's owner
        busy); returns that origin t0 (time.monotonic())."""
        if self.schedule is not None:
            self.schedule.stop()
            self.schedule = None
        if self.proxy is not None:
            haproxy.stop(self.proxy)
        self.balancer = balancer
        path = os.path.join(self.workdir, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(haproxy.config(balancer, [{"name": h.name, "port": h.port, "agent_port": h.agent_port}
                                              for h in self.hosts], self.port))
        self.proxy = haproxy.start(path, self._proxy_log)
        wait_healthy(self.url, self.proxy, f"HAProxy's frontend {self.url}", 30.0)
        self.t0 = time.monotonic()
        owners = [h.owner for h in self.hosts if h.owner is not None]
        if self.phase_s and owners and len(owners) == len(self.hosts):
            self.schedule = Schedule(owners, self.phase_s, self.t0, self.log).start()
        return self.t0

    def rest(self) -> None:
        """Stop the owners' schedule and idle every owner (between trials)."""
        if self.schedule is not None:
            self.schedule.stop()
            self.schedule = None
        for h in self.hosts:
            if h.owner is not None:
                h.owner.pause()

    def sample(self) -> list[dict]:
        """Per host now: owner_busy (1/0, None without an owner), agent line and weight (%)."""
        out = []
        for i, h in enumerate(self.hosts):
            line = ask_agent(h.agent_port)
            owner = None if h.owner is None else int(not h.owner.paused)
            out.append({"host": h.name, "owner_busy": owner, "agent": line, "agent_weight_pct": agent_weight(line)})
        return out

    def stop(self) -> None:
        """Stop the schedule, HAProxy and every host, removing their cgroups; idempotent, and a second Ctrl-C
        while it runs does not cut it short."""
        if self.stopped:
            return
        self.stopped = True
        atexit.unregister(self.stop)
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            if self.schedule is not None:
                self.schedule.stop()
            if self.proxy is not None:
                haproxy.stop(self.proxy)
            for h in reversed(self.hosts):
                try:
                    h.stop()
                except Exception as e:          # one host's failure does not leave the others running
                    self.log(f"fleet: stopping {h.name}: {e}")
            if self._proxy_log is not None:
                self._proxy_log.close()
        finally:
            if main and old is not None:
                signal.signal(signal.SIGINT, old)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def build_parser():
    p = cli.OneLineParser(prog="python -m llm_psi.fleet", description=(
        "Start N service instances, each a host of its own (a cgroup pinned to its CPUs, with an owner whose "
        "work comes and goes), behind HAProxy on loopback; run until Ctrl-C or SIGTERM, then stop everything. "
        "Arguments after -- go to every llm_server.py serve."))
    p.add_argument("--hosts", type=cli.finite_number(int, ge=1), default=2, help="instances (default: %(default)s)")
    p.add_argument("--balancer", choices=haproxy.BALANCERS, default="agent", help="HAProxy's balancing "
                   "(default: %(default)s)")
    p.add_argument("--cpus-per-host", type=cli.finite_number(int, ge=1), default=1, help="(default: %(default)s)")
    p.add_argument("--owner", default=None, help="each host's owner: a co-tenant spec, e.g. cpu:1+probe:100:10 "
                   "(default: none)")
    p.add_argument("--phase-s", type=cli.finite_number(float, gt=0), default=30.0,
                   help="owner i is busy in phase k when k + i is even (default: %(default)s)")
    p.add_argument("--port", type=cli.finite_number(int, ge=1, le=65535), default=None,
                   help="HAProxy's frontend port (default: a free one)")
    p.add_argument("--no-isolate", action="store_true", help="no cgroups, no pinning, no owners (not root)")
    return p


def main(argv=None) -> int:
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    serve = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    a = build_parser().parse_args(own)     # a bad option: one line, exit 2
    stop_on_signals()
    fleet = Fleet(a.hosts, a.balancer, serve, owner_spec=a.owner, phase_s=a.phase_s, cpus_per_host=a.cpus_per_host,
                  isolate=not a.no_isolate, port=a.port, log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        with fleet:
            print(fleet.url, flush=True)
            while True:
                time.sleep(5)
                print(" ".join(f"{s['host']}:{s['agent']}{'' if s['owner_busy'] is None else ' owner=' + str(s['owner_busy'])}"
                               for s in fleet.sample()), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return 0
