"""The service's Prometheus export (GET /metrics), valid for ``promtool check metrics``.

Every family is declared once, and names follow Prometheus' conventions (base units in the name, counters
end in ``_total``, no unit-less ``_us``):

  llm_requests_{admitted,deferred,rejected,overloaded,failed,abandoned}_total   counters of the Service
  llm_requests_running, llm_requests_waiting                                    gauges
  llm_admission_<key>                       the admission controller's numeric state (e.g. its limit)
  llm_overload_predicted_wait_seconds, llm_overload_shedding, llm_overload_max_wait_seconds
                                                                               --max-queue-delay-ms
  llm_share_quota_cores, llm_share_others_stall_ratio      the sharing controller (--sharing share)
  llm_psi_cpu_some_avg10_ratio{source}      PSI "some" avg10 of the system and of the service cgroup, 0-1
  llm_psi_cpu_some_stall_seconds_total{source}   PSI "some" total= (time with a task stalled)
  llm_cgroup_cpu_{periods,throttled_periods}_total, llm_cgroup_cpu_{throttled,usage}_seconds_total
                                            the service cgroup's cpu.stat, where the cgroup was made for it
  vllm:num_requests_{running,waiting}, vllm:kv_cache_usage_perc, llm_agent_weight_ratio
                                            what an inference gateway and a balancer read (headroom.py):
                                            vLLM's names, a batch slot as the KV cache's unit
  llm_request_<span>_seconds                histograms of each request's deferral, queue, TTFT, service and
                                            end-to-end time (requests that ended ok)

The families are read from the service at scrape time (no second copy of its counters), except the
histograms, which the service's observer fills.
"""
from __future__ import annotations

import math

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llm_psi.service import headroom

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, math.inf)
COUNTERS = {"admitted": "requests admitted to generation",
            "deferred": "requests the controller held at least once",
            "rejected": "requests the controller rejected",
            "overloaded": "requests refused as overload (503): --max-waiting, --max-queue-delay-ms, draining",
            "failed": "requests whose generation failed",
            "abandoned": "requests whose client went away before the end"}
# cpu.stat key: (family, factor to the base unit, help)
CPU_STAT = {"nr_periods": ("llm_cgroup_cpu_periods_total", 1, "CFS periods of the service cgroup"),
            "nr_throttled": ("llm_cgroup_cpu_throttled_periods_total", 1,
                             "CFS periods in which the service cgroup was throttled"),
            "throttled_usec": ("llm_cgroup_cpu_throttled_seconds_total", 1e-6,
                               "time the service cgroup was throttled"),
            "usage_usec": ("llm_cgroup_cpu_usage_seconds_total", 1e-6, "CPU time of the service cgroup")}
SOURCES = {"sys": "system", "cg": "cgroup"}


def _gauge(name, doc, value, by_source=None):
    """A gauge of one value, or of one value per ``source`` label ({source: value})."""
    g = GaugeMetricFamily(name, doc, labels=["source"] if by_source else None)
    for source, v in (by_source.items() if by_source else [(None, value)]):
        g.add_metric([source] if by_source else [], v)
    return g


def _counter(name, doc, value):
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


class ServiceCollector(Collector):
    """The families read from the service (``state.service``, None while it loads) and its pressure probe
    (``state.probe``) at scrape time; each family once, with one sample per source."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        svc = self.state.service
        counts = svc.counts if svc else {}
        for key, doc in COUNTERS.items():
            yield _counter(f"llm_requests_{key}", doc, counts.get(key, 0))
        yield _gauge("llm_requests_running", "requests generating", svc.running if svc else 0)
        yield _gauge("llm_requests_waiting", "requests waiting for admission", svc.waiting if svc else 0)
        if svc is not None and svc.admission is not None:
            for key, value in svc.admission.state().items():
                if key != "waiting" and isinstance(value, (int, float)) and key.isidentifier():
                    yield _gauge(f"llm_admission_{key}", f"admission controller state: {key}", value)
        if svc is not None and getattr(svc, "sharing", None) is not None:   # the sharing controller (control.sharing)
            st = svc.sharing.state()
            yield _gauge("llm_share_quota_cores", "the sharing controller's quota of the service cgroup, CPUs",
                         st["share_quota_cores"])
            yield _gauge("llm_share_others_stall_ratio", "the share of the last interval in which other work "
                         "waited for CPU, as the sharing controller read it (0-1)", st["share_others_pct"] / 100)
        if svc is not None and getattr(svc, "overload", None) is not None:
            st = svc.overload.state()
            yield _gauge("llm_overload_predicted_wait_seconds", "predicted wait of a request arriving now "
                         "(--max-queue-delay-ms)", st["queue_delay_predicted_s"])
            yield _gauge("llm_overload_shedding", "1 while --max-queue-delay-ms refuses requests",
                         st["queue_delay_shedding"])
            yield _gauge("llm_overload_max_wait_seconds", "the shedding limit, --max-queue-delay-ms (alerts compare "
                         "the predicted wait with it)", svc.overload.max_delay_s)
        yield from self._pressure(self.state.probe.read())
        if svc is not None:
            yield from gateway_gauges(self.state, svc.cfg.model or "gpt2")

    @staticmethod
    def _pressure(reading: dict):
        avg10 = {SOURCES[s]: reading[f"{s}_cpu_some_avg10"] / 100 for s in SOURCES
                 if reading.get(f"{s}_cpu_some_avg10") is not None}
        total = {SOURCES[s]: reading[f"{s}_cpu_some_total_us"] / 1e6 for s in SOURCES
                 if reading.get(f"{s}_cpu_some_total_us") is not None}
        if avg10:
            yield _gauge("llm_psi_cpu_some_avg10_ratio", "CPU pressure: share of the last 10 s with some task "
                         "stalled (PSI some avg10 / 100)", None, avg10)
        if total:
            c = CounterMetricFamily("llm_psi_cpu_some_stall_seconds", "CPU pressure: total time with some "
                                    "task stalled (PSI some total=)", labels=["source"])
            for source, v in total.items():
                c.add_metric([source], v)
            yield c
        for key, (name, factor, doc) in CPU_STAT.items():
            if reading.get(key) is not None:
                yield _counter(name[:-len("_total")], doc, reading[key] * factor)


def gateway_gauges(state, model: str):
    """The gauges an inference gateway's endpoint picker reads, named as vLLM names them (label model_name),
    and the HAProxy agent's weight; all from headroom.read (the service's own state)."""
    h = headroom.read(state)
    for name, doc, value in (
            ("vllm:num_requests_running", "requests generating (vLLM's name; = llm_requests_running)", h["running"]),
            ("vllm:num_requests_waiting", "requests waiting for admission (vLLM's name; = llm_requests_waiting)",
             h["waiting"]),
            ("vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (vLLM's name): a batch slot (one sequence's cache) "
             "is the unit here, so this is the batch slots in use over the slots (admission limit or batch size)",
             headroom.kv_cache_usage(h))):
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([model], value)
        yield g
    yield _gauge("llm_agent_weight_ratio", "the weight the HAProxy agent answers now, 0-1 (headroom.py's law; 0 "
                 "while draining)", h["weight_pct"] / 100)


class Exporter:
    """The /metrics registry of one app: the service's families and the per-request histograms."""

    def __init__(self, state, spans):
        """``spans``: the names of the request spans (``<name>_s``), one histogram each."""
        self.registry = CollectorRegistry()
        self.hist = {name: Histogram(f"llm_request_{name[:-2]}_seconds", f"per-request {name[:-2]} time",
                                     buckets=BUCKETS, registry=self.registry) for name in spans}
        self.registry.register(ServiceCollector(state))

    def observe(self, spans: dict) -> None:
        """One finished request's spans (s; None where the step never happened)."""
        for name, value in spans.items():
            if name in self.hist and value is not None:
                self.hist[name].observe(value)

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
