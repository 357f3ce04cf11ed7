"""The resident service over HTTP: an OpenAI-style completions API in front of ``service.Service``.

    python llm_server.py serve --port 8000 --config psi          # see --help for every option

Routes (Starlette, served by uvicorn):
  POST /v1/completions  {model, prompt, max_tokens, temperature, seed, stream}: the OpenAI completion shape
                        (choices[].text, finish_reason, usage) plus ``timings``: the server's offsets of each
                        step from the request's arrival (admit_s, start_s, first_token_s, end_s) and the spans
                        derived from them (deferral_s, queue_s, ttft_s, service_s, e2e_s), as vLLM reports
                        per-request metrics. ``stream: true`` answers with server-sent events, one ``data:``
                        chunk per token, the last with usage and timings, then ``data: [DONE]``.
  GET  /health          503 while the model loads, 200 when ready, 503 while draining; the JSON has the
                        service's identity, its requests running and waiting, and its cgroup's pressure and
                        throttling counters (``state``).
  GET  /metrics         Prometheus text: requests running/waiting, admitted/deferred/rejected counters,
                        histograms (s) of deferral, queue, TTFT, service and end-to-end time, the PSI signals
                        the controllers read and the service cgroup's throttling counters.

Overload is never a silent drop: a request the service refuses (``--max-waiting``, ``--on-timeout
reject``, draining, loading) gets 503 with Retry-After. A client that disconnects abandons its request at
the next token, which frees its slot. SIGTERM drains: new requests get 503, those in flight finish, exit 0.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import signal
import threading
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_psi import control as psi
from llm_psi.analysis.metrics import SERVER_SPANS, request_seed, request_spans
from llm_psi.service.lifecycle import Service, ServiceConfig

log = logging.getLogger("http_api")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, math.inf)


def timings(out) -> dict:
    """The server's view of one request: offsets from its arrival and the spans (s) derived from them."""
    rel = {f"{k}_s": (None if getattr(out, f"t_{k}") is None else getattr(out, f"t_{k}") - out.t_arrive)
           for k in ("admit", "start", "first_token", "end")}
    spans = request_spans(out.t_arrive, out.t_admit, out.t_start, out.t_first_token, out.t_end)
    pressure = None if out.pressure is None or math.isnan(out.pressure) else out.pressure
    return {"admission": out.decision, "checks": out.checks, "pressure": pressure, **rel, **spans}


class ServiceCollector:
    """Prometheus families read from the service at scrape time (no second copy of its counters)."""

    def __init__(self, app_state):
        self.state = app_state

    def collect(self):
        svc = self.state.service
        counts = svc.counts if svc else {}
        for name, key, doc in (("llm_requests_admitted", "admitted", "requests admitted to generation"),
                               ("llm_requests_deferred", "deferred", "requests the controller held at least once"),
                               ("llm_requests_rejected", "rejected", "requests the controller rejected"),
                               ("llm_requests_overloaded", "overloaded", "requests refused at arrival (503)"),
                               ("llm_requests_failed", "failed", "requests whose generation failed")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], counts.get(key, 0))
            yield c
        for name, value, doc in (("llm_requests_running", svc.running if svc else 0, "requests generating"),
                                 ("llm_requests_waiting", svc.waiting if svc else 0, "requests waiting for admission")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        if svc and svc.admission is not None:
            for key, value in svc.admission.state().items():
                if isinstance(value, (int, float)) and key != "waiting":
                    g = GaugeMetricFamily(f"llm_admission_{key}", f"admission controller state: {key}")
                    g.add_metric([], value)
                    yield g
        if svc and getattr(svc, "sharing", None) is not None:   # the sharing controller (control.sharing)
            for key, value in svc.sharing.state().items():
                g = GaugeMetricFamily(f"llm_{key}", f"sharing controller state: {key}")
                g.add_metric([], value)
                yield g
        reading = self.state.probe.read()
        for key, value in reading.items():
            if value is None or key.endswith("_pct"):
                continue
            source, rest = key.split("_", 1)
            if source in ("sys", "cg"):
                g = GaugeMetricFamily(f"llm_psi_{rest}", f"PSI {rest} of the {'system' if source == 'sys' else 'service cgroup'}",
                                      labels=["source"])
                g.add_metric(["system" if source == "sys" else "cgroup"], value)
            else:
                g = CounterMetricFamily(f"llm_cgroup_{key}", f"the service cgroup's cpu.stat {key}")
                g.add_metric([], value)
            yield g


def _error(status: int, message: str, kind: str, retry_after: float | None = None, **extra) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, **extra}}, status_code=status, headers=headers)


def _parse(body, cfg: ServiceConfig) -> tuple[str, int, int | None, bool]:
    """(prompt, max_tokens, seed, stream) of a completion request; ValueError with the reason."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("max_tokens must be an integer >= 1")
    temperature = body.get("temperature")
    if temperature is not None and temperature != cfg.temperature:
        raise ValueError(f"this service samples at temperature {cfg.temperature} (llm_server.py serve "
                         f"--temperature); got {temperature}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError("seed must be an integer >= 0")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError("stream must be true or false")
    return prompt, max_tokens, seed, stream


def build_app(cfg: ServiceConfig, service: Service | None = None, retry_after_s: float = 1.0,
              workers: int = 64) -> Starlette:
    """The app; it loads the model in the background at start-up unless ``service`` is given."""
    registry = CollectorRegistry()
    hist = {name: Histogram(f"llm_request_{name[:-2]}_seconds", f"per-request {name[:-2]} time",
                            buckets=BUCKETS, registry=registry) for name in SERVER_SPANS}
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="request")
    ids = itertools.count()

    def observe(out):
        if out.status != "ok":
            return
        for name, value in timings(out).items():
            if name in hist and value is not None:
                hist[name].observe(value)

    def attach(svc):
        svc.observers.append(observe)
        # what /health says of the service that does not change: built once, not on every poll
        app.state.about = {"service": svc.identity(), "config": dataclasses.asdict(cfg),
                           "cgroup": app.state.probe.cgroup.describe()}
        app.state.service = svc
        log.info("ready: %s", json.dumps(app.state.about["service"]))

    def load():
        try:
            attach(Service.start(cfg))
        except BaseException as e:  # the server stays up and says why in /health
            app.state.load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed: %s", app.state.load_error)

    async def health(request):
        st = app.state
        if st.load_error:
            return JSONResponse({"status": "failed", "error": st.load_error}, status_code=503)
        if st.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        body = {"status": "draining" if st.draining else "ok", **st.about,
                "state": {**st.service.state(), **st.probe.read()}}
        return JSONResponse(body, status_code=503 if st.draining else 200)

    async def metrics(request):
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def completions(request):
        st = app.state
        svc = st.service
        if svc is None or st.draining:
            why = "draining" if st.draining else "the model is loading"
            return _error(503, f"service unavailable: {why}", "unavailable", retry_after_s)
        try:
            prompt, max_tokens, seed, stream = _parse(await request.json(), cfg)
        except (ValueError, json.JSONDecodeError) as e:
            return _error(400, str(e), "invalid_request_error")
        rid = next(ids)
        seed = seed if seed is not None else request_seed(cfg.seed, 0, rid)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def on_token(token, t):
            loop.call_soon_threadsafe(events.put_nowait, ("token", token))

        def work():
            return svc.submit(prompt, max_tokens, seed=seed, stop=stop, on_token=on_token if stream else None)

        fut = loop.run_in_executor(pool, work)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", None)))
        try:
            first = await _first_event(request, events, stop)
        except asyncio.CancelledError:
            stop.set()
            raise
        if first is None:  # the client went away before its first token: the request is abandoned
            return Response(status_code=499)
        if first[0] == "done":
            return _final(fut, svc, rid, prompt, retry_after_s)
        return StreamingResponse(_sse(first, events, fut, svc, rid, stop), media_type="text/event-stream")

    def _final(fut, svc, rid, prompt, retry):
        try:
            out = fut.result()
        except Exception as e:
            return _error(500, f"{type(e).__name__}: {e}", "server_error")
        if out.status == "rejected":
            return _error(503, f"request refused ({out.decision}): {out.error or 'pressure over the threshold'}",
                          "overloaded", retry, admission=out.decision, timings=timings(out))
        if out.status == "failed":
            return _error(500, out.error, "server_error", timings=timings(out))
        return JSONResponse(_body(svc, rid, out.text, out, final=True))

    async def _sse(first, events, fut, svc, rid, stop):
        try:
            event = first
            while event[0] == "token":
                yield _chunk(_body(svc, rid, svc.engine.decode([event[1]]), None, final=False))
                event = await events.get()
            try:
                out = fut.result()
            except Exception as e:
                yield _chunk({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
            else:
                yield _chunk(_body(svc, rid, "", out, final=True))
            yield "data: [DONE]\n\n"
        finally:
            stop.set()  # a client gone mid-stream: abandon the request at its next token

    def _body(svc, rid, text, out, final):
        body = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                "model": svc.engine.identity()["source"],
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": ("length" if out.status == "ok" else "error") if final else None}]}
        if final and out is not None:
            body["usage"] = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.output_tokens,
                             "total_tokens": (out.prompt_tokens or 0) + out.output_tokens}
            body["timings"] = timings(out)
        return body

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if app.state.service is None:
            threading.Thread(target=load, name="model-load", daemon=True).start()
        yield
        app.state.draining = True
        if app.state.service is not None:
            await asyncio.get_running_loop().run_in_executor(None, app.state.service.close)
        pool.shutdown(wait=False)

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/health", health), Route("/metrics", metrics)], lifespan=lifespan)
    app.state.service, app.state.draining, app.state.load_error = None, False, None
    app.state.probe = psi.PressureProbe()
    registry.register(ServiceCollector(app.state))
    if service is not None:
        attach(service)
    return app


def _chunk(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _first_event(request, events, stop):
    """The first event of a request (its first token, or its end), or None if the client disconnects first."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                stop.set()
                return None


def serve(cfg: ServiceConfig, host: str, port: int, retry_after_s: float, drain_timeout_s: float | None) -> int:
    """Run the service until SIGINT/SIGTERM; then drain (503 to new requests, finish those in flight)."""
    import uvicorn
    app = build_app(cfg, retry_after_s=retry_after_s)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True
            if app.state.service is not None:
                app.state.service.closed = True
            log.info("signal %d: draining", sig)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=drain_timeout_s, lifespan="on")
    # uvicorn re-raises a handled signal once it has shut down, into the handler it found at start: make
    # that a no-op, so that a drained service exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Server(config).run()
    return 0
