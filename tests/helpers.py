"""Test helpers shared by several test files: a served tiny model, a fake engine, synthetic cells."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pandas as pd

from conftest import ROOT
from llm_psi.analysis import metrics
from llm_psi.engine.loop import Generation, Interrupted
from llm_psi.load import generator as rg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "llm_server.py"), "serve", "--tiny",
                                      "--port", str(self.port), *map(str, args)], cwd=ROOT,
                                     env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.health_seen = []   # every /health status answered until the service was ready

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                self.health_seen.append(r.status_code)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("service never became ready")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class FakeEngine:
    def __init__(self, hold=None):
        self.hold = hold

    def encode(self, prompt):
        import types
        return types.SimpleNamespace(shape=(1, len(prompt.split())))

    def generate(self, prompt, n, seed=0, stop=None, on_token=None):
        t0 = time.monotonic()
        times = []
        for i in range(n):
            if self.hold is not None:
                self.hold.wait(5)
            if stop is not None and stop.is_set():
                raise Interrupted("stopped")
            times.append(time.monotonic())
            if on_token:
                on_token(i, times[-1])
        return Generation(len(prompt.split()), n, t0, times[0], times[-1], times, "x" * n)

    def identity(self):
        return {"source": "fake"}


def write_cell(d, config, c, e2e_s, service_s=None, status=None, trials=1, gate=None, delta=None, limited=None,
               scale=None, runs=None, meta=None):
    """A synthetic cell: per trial, request i submitted at 0.1*i s with end-to-end e2e_s[i] and service
    service_s[i] (default: all of it), both times scale[trial - 1] (default 1); status[i] 'rejected' gives a
    request that never started. runs: per trial (run_index, started_at) for the JSON; meta: keys that
    replace the JSON's (a complete cell whose cgroup limits match its label by default)."""
    rows = []
    for trial in range(1, trials + 1):
        k = 1.0 if scale is None else scale[trial - 1]
        for i, e2e in enumerate(np.asarray(e2e_s, dtype=float) * k):
            svc = e2e if service_s is None else service_s[i] * k
            st = "ok" if status is None else status[i]
            dec, checks, defer = gate[i] if gate else ("none", 0, 0.0)
            sub = 0.1 * i
            row = dict(trial=trial, request_id=i, config=config, concurrency=c, prompt_id=i % 10, prompt_chars=30,
                       prompt_tokens=7, output_tokens=50, status=st, error="", t_submit_s=sub, t_dequeue_s=sub,
                       t_admit_s=sub + defer, gate_decision=dec, gate_checks=checks, gate_pressure=np.nan)
            if st != "rejected":
                row.update(t_start_s=sub + e2e - svc, t_first_token_s=sub + e2e - svc + svc / 50, t_end_s=sub + e2e)
            rows.append(row)
    df = metrics.derive(pd.DataFrame(rows).reindex(columns=rg.COLUMNS))
    stem = os.path.join(d, f"{config}_c{c}")
    df.to_csv(stem + ".csv", index=False)
    limited = rg.CONFIGS.get(config, {}).get("limited", False) if limited is None else limited
    full = {"limited": limited, "interrupted": False, "complete": True, "trials_planned": trials,
            "config": {"config": config, "concurrency": c, "num_requests": len(e2e_s), "trials": trials},
            "cgroup": {"limits": {"cpu_quota_us": 50000 if limited else None, "cpu_period_us": 100000,
                                  "memory_max_bytes": 4 * 2 ** 30 if limited else None}},
            "trials": [{"trial": t, "cgroup_delta": delta} for t in range(1, trials + 1)]}
    for t, (index, started) in zip(full["trials"], runs or []):
        t.update(run_index=index, started_at=started)
    with open(stem + ".json", "w") as f:
        json.dump({**full, **(meta or {})}, f)
    return stem


VLLM_COLON = re.compile(r"vllm:\w+ metric names should not contain ':'")


def promtool_problems(promtool: str, text: str) -> list[str]:
    """`promtool check metrics` on text: its findings other than vLLM's own naming (a colon, which Prometheus
    reserves for recording rules, in the vllm:* gauges that inference gateways read), and one for an exit
    status other than 0 or 3 (3: lint findings only; 1: invalid exposition)."""
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    found = (check.stdout + check.stderr).strip().splitlines()
    bad = [p for p in found if not VLLM_COLON.fullmatch(p)]
    return bad + ([f"exit status {check.returncode}"] if check.returncode not in (0, 3) else [])
