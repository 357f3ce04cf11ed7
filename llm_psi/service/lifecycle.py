"""The resident service: one engine behind one admission controller, and the lifecycle of every request.

``Service.submit`` is the one entry point, whoever the client is (the in-process load generator calls it
directly, the HTTP server of ``http_app.py`` from a thread per request):

    arrive -> [overload check] -> admit (the controller may defer or reject) -> generate -> release

and returns an ``Outcome``: the status, the admission decision and the raw monotonic timestamps of each
step. Metrics are derived from those timestamps elsewhere (``metrics.derive``), never here.

Overload is answered, never dropped silently: with ``max_waiting`` N, a request that the controller could
not admit at once while N requests already wait for admission is refused at arrival (status ``rejected``,
decision ``overloaded``); a controller that gives up on a request (``on_timeout=reject``) rejects it too.
With no admission controller nothing waits for admission, so ``max_waiting`` never refuses. With
``max_queue_delay_ms`` T, a request whose wait would exceed T (predicted from the measured service rate and
the queue ahead, or observed while it waits for admission) is refused too, with the estimate's Retry-After
(``overload.py`` states the control law). A request whose client went away is counted as ``abandoned``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time

from llm_psi import config as configs
from llm_psi.analysis import metrics
from llm_psi.cli import UsageError
from llm_psi.config import ServiceConfig
from llm_psi.control.pressure import PsiUnavailable  # noqa: F401  (the service's API: a client catches it)
from llm_psi.engine.loop import Interrupted  # noqa: F401  (likewise)

log = logging.getLogger("service")


def check_limits(label: str) -> None:
    """A limited configuration must run under a CPU quota, and one with kernel sharing controls (config
    cgroup_settings) in a cgroup of its own that has them; otherwise its cells would be mislabelled."""
    settings = configs.cgroup_settings(label)
    if not configs.is_limited(label) and not settings:
        return
    how = (f"run it in a sweep (sudo bash run_experiments.sh --configs {label}) or as: sudo python cgroup_lib.py run "
           f"--name llm_service ... -- python request_generator.py --config {label} ... (or ... -- python "
           f"llm_server.py serve --config {label})")
    from llm_psi import cgroups
    try:
        info = cgroups.own_cgroup()
        cores, got, own = cgroups.cpu_quota_cores(info), cgroups.read_sharing(info), cgroups.own_cell_cgroup(info)
    except Exception:
        cores, got, own = None, {}, None
    if configs.is_limited(label) and cores is None:
        raise UsageError(f"config {label!r} is limited, but no CPU quota is in force for this process; {how}")
    wanted = {"weight": ("cpu_weight", settings.get("weight")), "idle": ("cpu_idle", 1 if settings.get("idle") else None),
              "burst_us": ("cpu_burst_us", settings.get("burst_us"))}
    missing = [f"{key} {want}" for key, (field, want) in wanted.items() if want is not None and got.get(field) != want]
    if settings.get("cpus") is not None and not _pinned_as(settings["cpus"]):
        missing.append(f"cpus {settings['cpus']}")
    if missing or (settings and own is None):
        why = f"its cgroup lacks {', '.join(missing)}" if missing else "it runs in no cgroup made for it"
        raise UsageError(f"config {label!r} needs a cgroup of its own with {settings}, but {why}; {how}")


def _pinned_as(cpus) -> bool:
    """True if this process may run on exactly the CPUs of a preset's list ('last': on one CPU, the last of
    those its starter could use, which this process cannot see)."""
    import os
    have = sorted(os.sched_getaffinity(0))
    if cpus == "last":
        return len(have) == 1
    from llm_psi.cgroups.cpuset import parse_cpus
    return have == parse_cpus(str(cpus))


def build_admission(cfg: ServiceConfig, read=None):
    """The admission controller ``cfg`` asks for, or None; ``read`` injects the gate's signal (tests).
    Raises psi_admission.PsiUnavailable (with the fix) where the pressure file is unusable."""
    from llm_psi import control as psi
    if cfg.admission == "none":
        return None
    if cfg.admission == "limit":
        return psi.Limit(cfg.concurrency_limit)
    if cfg.admission == "adaptive":
        from llm_psi.control import adaptive as adaptive_control
        return adaptive_control.build(cfg, max_limit=cfg.max_batch if cfg.batching != "off" else cfg.adaptive_max)
    if cfg.admission != "gate":
        raise ValueError(f"unknown admission {cfg.admission!r}")
    interval_s = cfg.psi_interval_ms / 1000.0
    if read is not None:
        detector = psi.Detector(read, cfg.psi_threshold, "injected")
    else:
        detector = psi.make_detector(cfg.psi_source, cfg.psi_signal, cfg.psi_mode, cfg.psi_threshold, interval_s)
    return psi.Gate(detector, interval_s, cfg.psi_max_checks, cfg.on_timeout)


def load_engine(cfg: ServiceConfig):
    """The engine ``cfg`` names, wrapped in the batching scheduler when it batches."""
    from llm_psi.engine import loop as engines
    from llm_psi.engine.one_thread import OneThread

    def build():
        return engines.make_engine(cfg.engine, model=cfg.model, tiny=cfg.tiny, seed=cfg.seed,
                                   torch_threads=cfg.torch_threads, omp_wait_policy=cfg.omp_wait_policy,
                                   temperature=cfg.temperature, top_k=cfg.top_k, dtype=cfg.dtype,
                                   quantize=cfg.quantize, **({"kv": cfg.ort_kv} if cfg.engine == "ort" else {}))
    eng = OneThread(build) if cfg.engine_thread == "one" else build()
    if cfg.batching != "off":
        from llm_psi.engine import batch as batch_engine
        eng = batch_engine.wrap(eng, cfg)
    return eng


def _shedder(cfg: ServiceConfig):
    from llm_psi.service import overload
    return None if cfg.max_queue_delay_ms is None else overload.DelayShedder(cfg.max_queue_delay_ms / 1000)


@dataclasses.dataclass
class Outcome:
    """One request's result. Times are time.monotonic() values; None where the step never happened."""
    status: str                      # ok | rejected | failed
    decision: str = "none"           # admission: none | admitted | admitted_after_timeout | rejected | overloaded
    checks: int = 0
    pressure: float = math.nan
    error: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    text: str = ""
    t_arrive: float = math.nan
    t_admit: float | None = None
    t_start: float | None = None
    t_first_token: float | None = None
    t_end: float | None = None
    retry_after_s: float | None = None  # a refusal's estimate of when to retry (None: the server's default)
    instance: str | None = None      # the instance that answered, behind a balancer (HTTP client only)

    @property
    def deferred(self) -> bool:
        """Held by the controller for at least one re-check (the gate) or a queue wait counted as one."""
        return bool(metrics.deferred(self.checks, self.decision))


class Service:
    """Owns the engine (or the batching engine), the admission controller and the request counters."""

    def __init__(self, cfg: ServiceConfig, engine, admission=None):
        self.cfg, self.engine, self.admission = cfg, engine, admission
        self.observers = []              # called with every finished Outcome (the HTTP metrics)
        self._lock = threading.Lock()
        self.running = self.waiting = 0
        self.counts = {"admitted": 0, "deferred": 0, "rejected": 0, "overloaded": 0, "failed": 0, "ok": 0,
                       "abandoned": 0}
        self.closed = False
        self.overload = _shedder(cfg)
        self.sharing = None              # the controller of the cgroup's own quota (control.sharing), if any

    @classmethod
    def start(cls, cfg: ServiceConfig, engine=None) -> "Service":
        """Load the engine (unless given) and build the controllers: admission and sharing fail before any
        request (UsageError where the sharing controller has no cgroup of its own)."""
        svc = cls(cfg, engine if engine is not None else load_engine(cfg), build_admission(cfg))
        from llm_psi.control import sharing
        try:
            svc.sharing = sharing.build(cfg)
        except (ValueError, OSError) as e:
            raise UsageError(str(e)) from None
        return svc

    def renew_admission(self) -> None:
        """A fresh controller and counters (trials are independent repeats)."""
        if self.admission is not None:
            self.admission.close()
        self.admission = build_admission(self.cfg)
        self.overload = _shedder(self.cfg)
        with self._lock:
            self.counts = {k: 0 for k in self.counts}

    def state(self) -> dict:
        """Requests running and waiting, the controller's and the engine's state (for the timeline)."""
        return {**(self.admission.state() if self.admission is not None else {}),
                **(self.engine.state() if hasattr(self.engine, "state") else {}),
                **(self.overload.state() if self.overload is not None else {}),
                **(self.sharing.state() if self.sharing is not None else {}),
                "in_flight": self.running, "waiting": self.waiting}

    def submit(self, prompt: str, max_tokens: int, *, seed: int = 0, stop=None, on_token=None,
               t_arrive: float | None = None) -> Outcome:
        """Run one request through admission and generation. ``stop`` (threading.Event) abandons it at the
        next token with engine.Interrupted, which propagates (an abandoned request is not a result; it is
        counted as ``abandoned``); ``on_token(id, t)`` sees every token as it is sampled. ``t_arrive``: when
        the request arrived (time.monotonic(); default now), e.g. when the HTTP server read its body."""
        out = Outcome(status="ok", t_arrive=time.monotonic() if t_arrive is None else t_arrive)
        shed = self.overload
        if self._refused(out):
            return self._done(out, prompt)
        if shed is None:
            return self._run(out, prompt, max_tokens, seed, stop, on_token)
        first = []

        def mark(token, t):  # the first token ends the request's wait
            if not first:
                first.append(t)
                shed.started()
            if on_token is not None:
                on_token(token, t)
        try:
            return self._run(out, prompt, max_tokens, seed, stop, mark)
        finally:
            shed.leave(started=bool(first))

    def _refused(self, out: Outcome) -> bool:
        """The checks at arrival (draining, --max-queue-delay-ms, --max-waiting); True if ``out`` is refused.
        A request that goes on counts as waiting for admission (where there is a controller)."""
        adm, shed = self.admission, self.overload
        arrived = shed is not None and not self.closed
        retry = shed.arrive() if arrived else None
        with self._lock:
            if self.closed:
                out.error = "draining"
            elif retry is not None:
                out.error = (f"predicted wait {(retry + shed.max_delay_s) * 1000:.0f} ms exceeds "
                             f"max_queue_delay_ms {shed.max_delay_s * 1000:.0f}")
                out.retry_after_s = retry
            elif (self.cfg.max_waiting is not None and self.waiting >= self.cfg.max_waiting
                  and adm is not None and adm.saturated()):  # it would wait
                out.error = f"{self.waiting} requests wait (max_waiting {self.cfg.max_waiting})"
            elif adm is not None:
                self.waiting += 1
        if not out.error:
            return False
        if arrived and retry is None:
            shed.leave(started=False)  # it passed the delay check, then max_waiting refused it
        out.decision, out.status = "overloaded", "rejected"
        return True

    def _admit(self, out: Outcome) -> None:
        """Admission (where there is a controller), bounded by --max-queue-delay-ms where it is set."""
        adm, shed = self.admission, self.overload
        if adm is not None:
            try:
                dec = adm.admit() if shed is None else adm.admit(timeout=shed.max_delay_s)
            finally:
                with self._lock:
                    self.waiting -= 1
            out.decision, out.checks, out.pressure = dec.decision, dec.checks, dec.pressure
        out.t_admit = time.monotonic()
        waited = out.t_admit - out.t_arrive
        if shed is not None and out.decision != "rejected" and (out.decision == "expired"
                                                                 or waited > shed.max_delay_s):
            out.retry_after_s = shed.expired(waited)
            out.decision, out.status = "overloaded", "rejected"
            out.error = f"waited {waited * 1000:.0f} ms for admission (max_queue_delay_ms " \
                        f"{shed.max_delay_s * 1000:.0f})"
        elif out.decision == "rejected":
            out.status = "rejected"

    def _run(self, out: Outcome, prompt, max_tokens, seed, stop, on_token) -> Outcome:
        adm = self.admission
        self._admit(out)
        if out.status == "rejected":
            return self._done(out, prompt)
        with self._lock:
            self.running += 1
        service_s = None
        try:
            g = self.engine.generate(prompt, max_tokens, seed=seed, stop=stop, on_token=on_token)
            service_s = g.t_end - g.t_start
            out.prompt_tokens, out.output_tokens, out.text = g.prompt_tokens, g.output_tokens, g.text
            out.t_start, out.t_first_token, out.t_end = g.t_start, g.t_first_token, g.t_end
            if g.output_tokens != max_tokens:
                out.status, out.error = "failed", f"generated {g.output_tokens} of {max_tokens} tokens"
        except Interrupted:
            with self._lock:
                self.counts["abandoned"] += 1
            # the client's side (the HTTP app) logs the one INFO line of an abandoned request
            log.debug("request abandoned by its client after %.1f s", time.monotonic() - out.t_arrive)
            raise
        except Exception as e:
            out.status, out.error, out.output_tokens = "failed", f"{type(e).__name__}: {e}"[:300], 0
        finally:
            with self._lock:
                self.running -= 1
            if adm is not None:
                adm.release(service_s)
        return self._done(out, prompt)

    def _done(self, out: Outcome, prompt: str) -> Outcome:
        if out.prompt_tokens is None:
            try:
                out.prompt_tokens = int(self.engine.encode(prompt).shape[1])
            except Exception:
                pass
        with self._lock:
            c = self.counts
            if out.decision == "overloaded":
                c["overloaded"] += 1
            elif out.status == "rejected":
                c["rejected"] += 1
            else:
                c["admitted"] += 1
                c[out.status] += 1          # ok | failed
            c["deferred"] += out.deferred
        for fn in self.observers:
            try:
                fn(out)
            except Exception as e:  # an observer never fails a request
                log.warning("observer %r failed: %s", fn, e)
        return out

    def close(self) -> None:
        """Refuse new requests; the batching engine finishes the ones it holds; the controller stops."""
        with self._lock:
            self.closed = True
        if (self.cfg.batching != "off" or self.cfg.engine_thread == "one") and hasattr(self.engine, "close"):
            self.engine.close()
        if self.admission is not None:
            self.admission.close()
        if self.sharing is not None:
            self.sharing.close()

    def identity(self) -> dict:
        return {"config": self.cfg.config, "limited": configs.is_limited(self.cfg.config),
                "model": self.engine.identity()}
