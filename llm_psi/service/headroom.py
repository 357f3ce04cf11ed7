"""The service's headroom, as load balancers read it: HAProxy's agent-check line, the vLLM-named gauges an
inference gateway scrapes, and the ORCA load report (``endpoint-load-metrics``) that Envoy and gRPC read.

All three come from the state the service already keeps, read at the moment they are asked for; nothing here
measures anything of its own:

    pressure  the share of the time that the host's other work (its owner) takes the CPU from us, 0-1:
              the sharing controller's "others stall" (control/sharing.py, --sharing share) where it runs,
              else the larger of: the share of the service's CPUs that other processes kept busy over the
              last second (control/hostcpu.py: it sees an owner while the service is idle) and the service
              cgroup's own CPU pressure, PSI some avg10 / 100 (the share of the last 10 s in
              which a task of the service waited for a CPU that something else held) where that cgroup was
              made for the service (cgroup_lib.py run, a fleet host, a systemd unit's), else 0
    delay     the predicted queueing delay of a request arriving now over the shedding limit, 0-1
              (service/overload.py, --max-queue-delay-ms; 0 without a limit)
    weight    = 100% x (1 - pressure) x (1 - delay), rounded to STEP_PCT; 0% only at the shedding limit
              (else at least 1%: busy owners everywhere must not leave the balancer without a server)
    maxconn   the requests the service runs at once (the admission limit, else the batch size) plus those it
              lets wait (--max-waiting, 0 if unset); absent where nothing bounds them

The agent's answer (HAProxy agent-check syntax, one line): ``ready <weight>% [maxconn:<N>]``; ``drain``
while the model loads and from the first SIGTERM until exit. The ORCA report's application_utilization is
1 - weight (the share of this instance's capacity already spoken for), its cpu_utilization the pressure.
"""
from __future__ import annotations

import json
import math
import threading

STEP_PCT = 5
INSTANCE_HEADER = "x-llm-psi-instance"
ORCA_FORMAT_HEADER = "endpoint-load-metrics-format"
ORCA_HEADER = "endpoint-load-metrics"
LAW = ("weight = 100%% x (1 - pressure) x (1 - delay), in steps of %d%% (at least 1%% below the shedding "
       "limit): pressure is the share of time the host's other work takes the CPU from the service (the --sharing "
       "share controller's others-stall where it runs, else the larger of the share of the service's CPUs that "
       "other processes kept busy over the last second and its own cgroup's PSI some avg10), delay the predicted queueing delay over "
       "--max-queue-delay-ms (0 without it); 'drain' while loading and from the first SIGTERM; maxconn:N = the "
       "admission limit (else --max-batch when batching) + --max-waiting" % STEP_PCT)


def _unit(x) -> float:
    """x clipped to 0-1; 0 for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return 0.0
    return min(1.0, max(0.0, float(x)))


def weight_pct(pressure: float, delay: float, step: int = STEP_PCT) -> int:
    """The law: 100 x (1 - pressure) x (1 - delay), both clipped to 0-1, rounded to a multiple of step."""
    w = 100.0 * (1.0 - _unit(pressure)) * (1.0 - _unit(delay))
    return int(step * round(w / step))


_meter_lock = threading.Lock()


def host_cpu(state):
    """The state's meter of the CPU others take (control/hostcpu.py), started at the first call."""
    with _meter_lock:
        if getattr(state, "host_cpu", None) is None:
            from llm_psi.control.hostcpu import OthersCpu
            state.host_cpu = OthersCpu().start()
        return state.host_cpu


def pressure_of(svc, reading: dict | None, own_cgroup: bool = True) -> tuple[float, str]:
    """(pressure 0-1, where it was read) from the sharing controller's state, else the probe's reading of the
    service's cgroup where that cgroup was made for the service (own_cgroup; a shared one, e.g. a login
    session's, says nothing of this service's host)."""
    sharing = getattr(svc, "sharing", None)
    if sharing is not None:
        others = sharing.state().get("share_others_pct")
        if others is not None and not math.isnan(others):
            return _unit(others / 100.0), "share_others"
    avg10 = (reading or {}).get("cg_cpu_some_avg10")
    if avg10 is not None and own_cgroup:
        return _unit(avg10 / 100.0), "cgroup_some_avg10"
    return 0.0, "none"


def delay_of(svc) -> float:
    """The predicted queueing delay over the shedding limit, 0-1 (0 without --max-queue-delay-ms)."""
    shed = getattr(svc, "overload", None)
    if shed is None:
        return 0.0
    return _unit(shed.predicted_wait() / shed.max_delay_s)


def slots(svc) -> int | None:
    """Requests the service runs at once: the admission limit, else the batch size (None: unbounded)."""
    adm = getattr(svc, "admission", None)
    limit = adm.state().get("limit") if adm is not None else None
    if limit is None and svc.cfg.batching != "off":
        limit = svc.cfg.max_batch
    return None if limit is None else int(limit)


def read(state) -> dict:
    """The headroom of the app ``state`` (service, probe, draining) now: weight_pct, pressure, delay,
    maxconn, draining, running, waiting, slots and the agent line."""
    svc = state.service
    if svc is None or state.draining:
        return {"weight_pct": 0, "pressure": math.nan, "delay": math.nan, "maxconn": None, "draining": True,
                "running": svc.running if svc else 0, "waiting": svc.waiting if svc else 0, "slots": None,
                "source": "none", "line": "drain"}
    own = bool(getattr(getattr(state.probe, "cgroup", None), "own", False))
    p, source = pressure_of(svc, state.probe.read(), own)
    others = host_cpu(state).share
    if source != "share_others" and others is not None and others > p:
        p, source = others, "others_cpu"
    d = delay_of(svc)
    n = slots(svc)
    maxconn = None if n is None else n + (svc.cfg.max_waiting or 0)
    w = weight_pct(p, d)
    if w == 0 and d < 1:
        w = 1      # busy owners everywhere must not leave the balancer without a server: 0 only when shedding
    line = f"ready {w}%" + ("" if maxconn is None else f" maxconn:{maxconn}")
    return {"weight_pct": w, "pressure": p, "delay": d, "maxconn": maxconn, "draining": False,
            "running": svc.running, "waiting": svc.waiting, "slots": n, "source": source, "line": line}


def kv_cache_usage(h: dict) -> float:
    """vLLM's kv_cache_usage_perc (0-1) here: batch slots in use over the slots (a slot is the KV cache's
    unit: one sequence's cache); 0 or 1 by whether anything runs where nothing bounds the slots."""
    if h["slots"]:
        return min(1.0, h["running"] / h["slots"])
    return 1.0 if h["running"] else 0.0


def orca_header(fmt: str, h: dict) -> str | None:
    """The value of ``endpoint-load-metrics`` in format TEXT or JSON (case-insensitive), else None:
    'TEXT cpu_utilization=0.2, application_utilization=0.4, named_metrics.x=1' or 'JSON {...}' (as vLLM
    and Envoy's ORCA parser write and read them)."""
    fmt = (fmt or "").strip().upper()
    if fmt not in ("TEXT", "JSON"):
        return None
    pressure = 0.0 if math.isnan(h["pressure"]) else h["pressure"]
    named = {"num_requests_running": h["running"], "num_requests_waiting": h["waiting"],
             "kv_cache_usage_perc": round(kv_cache_usage(h), 4), "agent_weight_pct": h["weight_pct"]}
    report = {"cpu_utilization": round(pressure, 4), "application_utilization": round(1 - h["weight_pct"] / 100, 4)}
    if fmt == "JSON":
        return "JSON " + json.dumps({**report, "named_metrics": named}, separators=(",", ":"))
    parts = [f"{k}={v}" for k, v in report.items()] + [f"named_metrics.{k}={v}" for k, v in named.items()]
    return "TEXT " + ", ".join(parts)


def parse_orca(value: str) -> dict:
    """The inverse of orca_header: {'cpu_utilization': .., 'named_metrics': {..}}; ValueError on garbage."""
    kind, _, body = (value or "").partition(" ")
    if kind == "JSON":
        return json.loads(body)
    if kind != "TEXT":
        raise ValueError(f"unknown ORCA format {kind!r}")
    out = {"named_metrics": {}}
    for part in body.split(","):
        key, sep, v = part.strip().partition("=")
        if not sep:
            raise ValueError(f"ORCA part {part!r} is not key=value")
        if key.startswith("named_metrics."):
            out["named_metrics"][key[len("named_metrics."):]] = float(v)
        else:
            out[key] = float(v)
    return out
