"""HAProxy's agent check (``--agent-port PORT``): a TCP responder in the service process that answers every
connection with one line of the service's headroom (service/headroom.py states the law) and closes it.

    backend llm
        server a 127.0.0.1:8000 check agent-check agent-port 8100 agent-inter 500ms weight 100

HAProxy connects every agent-inter, reads the line (``ready 75% maxconn:3``, or ``drain``) and scales the
server's weight, or drains it. The responder is a thread of its own, so it answers while the event loop is
busy and through the whole drain (until the process exits). Each change of the answer is one log line.
"""
from __future__ import annotations

import logging
import socketserver
import threading

from llm_psi.service import headroom

log = logging.getLogger("agent")


class Agent:
    """The agent's answer, computed from an app state on demand; logs each change."""

    def __init__(self, state):
        self.state, self.last, self._lock = state, None, threading.Lock()

    def answer(self) -> str:
        h = headroom.read(self.state)
        with self._lock:
            if h["line"] != self.last:
                log.info("agent: %s -> %s (pressure %.2f from %s, delay %.2f of the shedding limit, %d running, "
                         "%d waiting)", self.last, h["line"], h["pressure"] if h["pressure"] == h["pressure"] else 0,
                         h["source"], h["delay"] if h["delay"] == h["delay"] else 0, h["running"], h["waiting"])
                self.last = h["line"]
        return h["line"]


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            line = self.server.agent.answer()
        except Exception as e:            # never leave HAProxy without an answer
            log.warning("agent: cannot read the service's state: %s", e)
            line = "drain"
        try:
            self.request.sendall(f"{line}\n".encode())
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start(state, host: str, port: int) -> _Server:
    """Serve the agent for the app ``state`` on host:port from a daemon thread; returns the server
    (shutdown() stops it). OSError where the port cannot be bound."""
    srv = _Server((host, port), _Handler)
    srv.agent = Agent(state)
    threading.Thread(target=srv.serve_forever, name="haproxy-agent", daemon=True).start()
    log.info("agent: HAProxy agent-check on %s:%d; %s", host, srv.server_address[1], headroom.LAW)
    return srv
