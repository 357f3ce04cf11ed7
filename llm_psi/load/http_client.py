"""The load generator's client of a running service (``llm_server.py serve``), over HTTP with streaming.

Each request is sent with ``stream: true`` so that the client times its own first token. The Outcome it
returns is on the client's clock: t_arrive = the send, t_first_token and t_end = the arrival of the first
and the last token's chunk; the server's admission and start times are its reported offsets from the
request's arrival placed at the send (``srv``: the raw offsets, kept as they came). A 503 is a refusal
(status ``rejected``, with the server's decision), never a failure.
"""
from __future__ import annotations

import json
import math
import time

import httpx

from llm_psi.service.headroom import INSTANCE_HEADER
from llm_psi.service.lifecycle import Interrupted, Outcome


class RemoteError(RuntimeError):
    """The service cannot be used: unreachable, not ready, or running another configuration."""


class Remote:
    def __init__(self, url: str, label: str | None = None, wait_s: float = 0.0):
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=httpx.Timeout(None, connect=10.0),
                                 limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.info = self._ready(wait_s)
        served = self.info.get("config", {}).get("config")
        if label is not None and served != label:
            self.close()
            raise RemoteError(f"{self.url} serves config {served!r}, not {label!r}: start it with "
                              f"llm_server.py serve --config {label}, or label the cell --config {served}")

    def _ready(self, wait_s: float) -> dict:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                r = self.http.get(f"{self.url}/health")
                if r.status_code == 200:
                    return r.json()
                why = r.json().get("error") or r.json().get("status")
            except (httpx.HTTPError, ValueError) as e:
                why = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise RemoteError(f"service at {self.url} is not ready ({why})")
            time.sleep(0.2)

    def send(self, prompt: str, max_tokens: int, seed: int, stop=None):
        """(Outcome on this process's clock, the server's raw offsets or None). Raises Interrupted if
        ``stop`` is set while the request runs (the connection is closed: the server frees its slot)."""
        body = {"model": "gpt2", "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True}
        out = Outcome(status="ok", t_arrive=time.monotonic())
        final = None
        try:
            with self.http.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                out.instance = r.headers.get(INSTANCE_HEADER)
                if r.status_code != 200:
                    return self._refused(out, r), None
                for line in r.iter_lines():
                    if stop is not None and stop.is_set():
                        raise Interrupted("generation stopped")
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out.status, out.error = "failed", chunk["error"].get("message", "")[:300]
                        continue
                    now = time.monotonic()
                    if "usage" in chunk:
                        final = chunk
                        continue
                    if out.t_first_token is None:
                        out.t_first_token = now
                    out.t_end = now
                    out.output_tokens += 1
                    out.text += chunk["choices"][0]["text"]
        except httpx.HTTPError as e:
            out.status, out.error = "failed", f"{type(e).__name__}: {e}"[:300]
            return out, None
        if final is None:
            if out.status == "ok":
                out.status, out.error = "failed", "stream ended without its final chunk"
            return out, None
        t = final["timings"]
        out.prompt_tokens = final["usage"]["prompt_tokens"]
        out.decision, out.checks = t["admission"], t["checks"]
        out.pressure = math.nan if t["pressure"] is None else t["pressure"]
        out.t_admit, out.t_start = out.t_arrive + t["admit_s"], out.t_arrive + t["start_s"]
        if out.status == "ok" and out.output_tokens != max_tokens:
            out.status, out.error = "failed", f"received {out.output_tokens} of {max_tokens} tokens"
        return out, {k: t[f"{k}_s"] for k in ("admit", "start", "first_token", "end")}

    @staticmethod
    def _refused(out: Outcome, r) -> Outcome:
        r.read()
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            err = {"message": r.text[:200]}
        if r.status_code == 503:
            out.status = "rejected"
            out.decision = err.get("admission") or "overloaded"
            t = err.get("timings") or {}
            if t.get("admit_s") is not None:
                out.t_admit = out.t_arrive + t["admit_s"]
                out.checks = t.get("checks") or 0
        else:
            out.status = "failed"
        out.error = f"HTTP {r.status_code}: {err.get('message', '')}"[:300]
        return out

    def state(self) -> dict:
        """The server's running/waiting, controller state, pressure and throttling (timeline columns)."""
        try:
            return self.http.get(f"{self.url}/health").json().get("state", {})
        except (httpx.HTTPError, ValueError):
            return {}

    def counters(self) -> dict | None:
        """The service cgroup's counters, where the server runs in a cgroup made for it."""
        if not self.info.get("cgroup", {}).get("own"):
            return None
        st = self.state()
        return {k: st.get(k) for k in ("nr_periods", "nr_throttled", "throttled_usec", "usage_usec")}

    def describe(self) -> dict:
        return {"remote": self.url, **self.info.get("cgroup", {})}

    def close(self) -> None:
        self.http.close()
