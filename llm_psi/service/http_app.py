"""The resident service over HTTP: an OpenAI-compatible API in front of ``lifecycle.Service``.

    python llm_server.py serve --port 8000 --config psi          # see --help for every option

Routes (Starlette, served by uvicorn); docs/SERVICE.md has the API, its errors and security defaults:
  POST /v1/completions       OpenAI's completion shape (choices[].text, finish_reason, usage) plus ``timings``:
                             the server's offsets of each step from the request's arrival (admit_s, start_s,
                             first_token_s, end_s) and the spans derived from them (deferral_s, queue_s, ttft_s,
                             service_s, e2e_s). ``stream: true`` answers with server-sent events, one ``data:``
                             chunk per token, the last with usage and timings, then ``data: [DONE]``.
  POST /v1/chat/completions  the same behind a plain-text chat template (openai_api.chat_prompt).
  GET  /v1/models            the served model and its aliases; GET /v1/models/{id} one of them (404 if unknown).
  GET  /health               503 while the model loads, 200 when ready, 503 while draining, with the service's
                             identity, its requests running and waiting, and its cgroup's pressure (``state``).
  GET  /metrics              Prometheus text (service/prometheus.py: the service's families and histograms).

The event loop runs no per-request work that grows with the request (JSON parsing, validation, tokenizing,
detokenizing, stop checks): that runs in threads, and generation in a thread of its own per request (idle
threads are reused; no fixed pool holds a request where the service cannot count it): a request reaches the
service, counted as waiting or running, as soon as its body is read and checked, and its wait counts from
then. A request is checked whole before any generation: its size, type, parameters and the prompt's length
in tokens against the context. Overload is never a silent drop: a request the service refuses
(``--max-waiting``, ``--on-timeout reject``, draining, loading) gets 503 with a spread Retry-After. A client
that disconnects (mid-body, mid-queue or mid-stream) is logged in one INFO line, never a traceback.
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
import os
import signal
import threading
import time

from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_psi import control as psi
from llm_psi.analysis.metrics import SERVER_SPANS, request_seed, request_spans
from llm_psi.config import DRAIN_TIMEOUT_S, MAX_BODY_BYTES
from llm_psi.service.protocol import BODY_TIMEOUT_S, HEADER_TIMEOUT_S
from llm_psi.service import http_errors
from llm_psi.service import openai_api as oa
from llm_psi.service import protocol
from llm_psi.service import security
from llm_psi.service.lifecycle import Service, ServiceConfig
from llm_psi.service.loadreport import LoadReport
from llm_psi.service.openai_api import ApiError
from llm_psi.service.prometheus import Exporter

log = logging.getLogger("http_api")
UNBOUNDED = 1 << 30   # the request threads' "pool size": never the bound


def timings(out) -> dict:
    """The server's view of one request: offsets from its arrival and the spans (s) derived from them."""
    rel = {f"{k}_s": (None if getattr(out, f"t_{k}") is None else getattr(out, f"t_{k}") - out.t_arrive)
           for k in ("admit", "start", "first_token", "end")}
    spans = request_spans(out.t_arrive, out.t_admit, out.t_start, out.t_first_token, out.t_end)
    pressure = None if out.pressure is None or math.isnan(out.pressure) else out.pressure
    return {"admission": out.decision, "checks": out.checks, "pressure": pressure, **rel, **spans}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _ready_tokens(events: asyncio.Queue, token: int) -> tuple[list[int], tuple | None]:
    """``token`` and the tokens already queued after it; the first other event, if one came (else None)."""
    batch = [token]
    while not events.empty():
        event = events.get_nowait()
        if event[0] != "token":
            return batch, event
        batch.append(event[1])
    return batch, None


class Run:
    """One request's generation on a worker thread; its tokens (when streamed) and its end reach the loop
    as events."""

    def __init__(self, svc: Service, pool, ids: list[int], max_tokens: int, seed: int, stream: bool,
                 t_arrive: float):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()

        def on_token(token, t):
            loop.call_soon_threadsafe(self.events.put_nowait, ("token", token))

        self.fut = loop.run_in_executor(pool, lambda: svc.submit(
            ids, max_tokens, seed=seed, stop=self.stop, on_token=on_token if stream else None, t_arrive=t_arrive))
        self.fut.add_done_callback(self._ended)

    def _ended(self, fut) -> None:
        if not fut.cancelled():
            fut.exception()   # retrieved here: an abandoned request's Interrupted is no error to log
        self.events.put_nowait(("done", None))

    async def first_event(self, request):
        """The first event (a token, or the end), or None if the client disconnects first."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(self.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.stop.set()
                        return None
        except asyncio.CancelledError:   # the drain deadline passed: abandon the request
            self.stop.set()
            raise


class Api:
    """The routes of one app, and what they share: the service, the worker pool, the metrics."""

    def __init__(self, cfg: ServiceConfig, retry_after_s: float, max_body_bytes: int, body_timeout_s: float):
        self.app = None   # the Starlette app, once built
        self.cfg, self.retry_after_s, self.max_body_bytes = cfg, retry_after_s, max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.exporter = None   # the /metrics registry, once the app's state exists
        # a thread per request in flight, idle ones reused: no pool size that could hold requests unseen
        # (the service's own limits, --max-waiting and the admission controller, bound them)
        self.pool = cf.ThreadPoolExecutor(max_workers=UNBOUNDED, thread_name_prefix="request")
        self.ids = itertools.count()
        self.names, self.context, self.vocab, self.created = [], 0, 0, int(time.time())

    def observe(self, out) -> None:
        if out.status == "ok":
            self.exporter.observe(timings(out))

    def attach(self, svc: Service) -> None:
        st = self.app.state
        svc.observers.append(self.observe)
        # what /health says of the service that does not change: built once, not on every poll
        st.about = {"service": svc.identity(), "config": dataclasses.asdict(self.cfg), "cgroup": st.probe.cgroup.describe()}
        mc = svc.engine.model.config
        source = st.about["service"]["model"]["source"]
        self.names = [source] + [a for a in ("gpt2",) if mc.model_type == "gpt2" and a != source]
        self.context = getattr(mc, "n_positions", None) or mc.max_position_embeddings
        self.vocab = mc.vocab_size
        st.service = svc
        log.info("ready: %s", json.dumps(st.about["service"]))

    def load(self) -> None:
        try:
            self.attach(Service.start(self.cfg))
        except BaseException as e:  # the server stays up and says why in /health
            self.app.state.load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed: %s", self.app.state.load_error)

    async def health(self, request):
        st = self.app.state
        if st.load_error:
            return JSONResponse({"status": "failed", "error": st.load_error}, status_code=503)
        if st.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        state = {**st.service.state(), **st.probe.read()}
        body = {"status": "draining" if st.draining else "ok", **st.about,   # JSON has no NaN: a reading not
                "state": {k: None if isinstance(v, float) and math.isnan(v) else v   # yet made is null
                          for k, v in state.items()}}
        return JSONResponse(body, status_code=503 if st.draining else 200)

    async def metrics(self, request):
        body, media_type = self.exporter.render()
        return Response(body, media_type=media_type)

    async def models(self, request):
        self._service()
        return JSONResponse(oa.models_body(self.names, self.created))

    async def model(self, request):
        """GET /v1/models/{id} (the openai client's ``models.retrieve``)."""
        self._service()
        name = request.path_params["model"]
        if name not in self.names:
            raise ApiError(404, f"the model {name!r} does not exist; this service serves {', '.join(self.names)}",
                           param="model", code="model_not_found")
        return JSONResponse(oa.models_body([name], self.created)["data"][0])

    async def completions(self, request):
        return await self._handle(request, oa.parse_completion)

    async def chat(self, request):
        return await self._handle(request, oa.parse_chat)

    def _service(self) -> Service:
        st = self.app.state
        if st.service is None or st.draining:
            why = "draining" if st.draining else "the model is loading"
            raise http_errors.unavailable(f"service unavailable: {why}", "unavailable", self.retry_after_s)
        return st.service

    def _off_loop(self, fn, *args):
        """``fn(*args)`` in a request thread (work that grows with the request never runs on the loop)."""
        return asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _tokens(self, svc: Service, prompt) -> list[int]:
        if isinstance(prompt, list):
            oa.check_token_ids(prompt, self.vocab)
            return prompt
        return svc.engine.encode(prompt)[0].tolist()

    def _parse(self, svc: Service, raw: bytes, parse):
        """The request checked whole (a request thread): its job, the prompt's token ids and the echo."""
        job = parse(oa.parse_body(raw), self.cfg.temperature)
        oa.check_model(job, self.names)
        oa.check_context(0, job.max_tokens, self.context)
        ids = self._tokens(svc, job.prompt)
        oa.check_context(len(ids), job.max_tokens, self.context)
        head = ""
        if job.echo:
            head = job.prompt if isinstance(job.prompt, str) else svc.engine.decode(ids)
        return job, ids, head

    async def _handle(self, request, parse):
        """Check the request whole (size, type, parameters, model, context), then generate."""
        svc = self._service()
        raw = await security.read_json_body(request, self.max_body_bytes, self.body_timeout_s)
        t_arrive = time.monotonic()   # the request's wait counts from its body's arrival
        job, ids, head = await self._off_loop(self._parse, svc, raw, parse)
        rid = next(self.ids)
        seed = job.seed if job.seed is not None else request_seed(self.cfg.seed, 0, rid)
        run = Run(svc, self.pool, ids, job.max_tokens, seed, job.stream, t_arrive)
        first = await run.first_event(request)
        if first is None:
            log.info("request %d: client disconnected before its first token; abandoned", rid)
            return Response(status_code=499)
        if first[0] == "done":
            return JSONResponse(await self._off_loop(self._final, job, run, rid, head))
        return StreamingResponse(self._stream(job, run, rid, first, head), media_type="text/event-stream")

    def _outcome(self, run: Run, rid: int):
        """The Outcome of a finished run; a refusal as 503, a failure as 500 (its reason goes to the log)."""
        try:
            out = run.fut.result()
        except Exception:
            log.exception("request %d: the service raised", rid)
            raise ApiError(500, f"internal server error (request {rid}; see the server's log)", "server_error")
        if out.status == "rejected":
            why = out.error or "pressure over the threshold"
            retry = self.retry_after_s if out.retry_after_s is None else out.retry_after_s
            raise http_errors.unavailable(f"request refused ({out.decision}): {why}", "overloaded", retry,
                                          admission=out.decision, timings=timings(out))
        if out.status == "failed":
            log.error("request %d: generation failed: %s", rid, out.error)
            raise ApiError(500, f"generation failed (request {rid}; see the server's log)", "server_error",
                           timings=timings(out))
        return out

    def _usage(self, out) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.output_tokens,
                "total_tokens": (out.prompt_tokens or 0) + out.output_tokens}

    def _final(self, job, run: Run, rid: int, head: str) -> dict:
        """The body of a finished request (a request thread: the stop check grows with the text)."""
        out = self._outcome(run, rid)
        stops = oa.StopText(job.stop)
        text = stops.feed(out.text) + stops.flush()
        return oa.completion_body(job, rid, self.names[0], head + text, "stop" if stops.hit else "length",
                                  self._usage(out), {"timings": timings(out)})

    async def _stream(self, job, run: Run, rid: int, first, head: str):
        detok, stops = oa.Detokenizer(self.app.state.service.engine.decode), oa.StopText(job.stop)
        tokens, finished = 0, False
        try:
            if job.chat:
                yield _sse(oa.role_chunk(job, rid, self.names[0]))
            event = first
            while event[0] == "token":
                batch, event = _ready_tokens(run.events, event[1])
                # one thread hop for the tokens that are ready; still one chunk per token
                # the stop check too runs there: its work grows with the text
                for delta in await self._off_loop(lambda: [stops.feed(detok.add([t])) for t in batch]):
                    tokens += 1
                    yield _sse(oa.completion_body(job, rid, self.names[0], head + delta, None))
                    head = ""
                if event is None:
                    event = await run.events.get()
            try:
                out = self._outcome(run, rid)
            except ApiError as e:
                yield _sse(e.body())
            else:
                text = await self._off_loop(lambda: stops.feed(detok.flush()) + stops.flush())
                yield _sse(oa.completion_body(job, rid, self.names[0], text, "stop" if stops.hit else "length",
                                              self._usage(out) if job.include_usage else None,
                                              {"timings": timings(out)}))
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            run.stop.set()  # a client gone mid-stream: abandon the request at its next token
            if not finished:
                why = "the drain deadline passed" if self.app.state.draining else "client disconnected"
                log.info("request %d: %s after %d tokens; abandoned", rid, why, tokens)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        if app.state.service is None:
            threading.Thread(target=self.load, name="model-load", daemon=True).start()
        yield
        app.state.draining = True
        if app.state.service is not None:
            await asyncio.get_running_loop().run_in_executor(None, app.state.service.close)
        self.pool.shutdown(wait=False)


def build_app(cfg: ServiceConfig, service: Service | None = None, retry_after_s: float = 1.0,
              max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None,
              hosts: frozenset[str] | None = None, instance: str | None = None,
              body_timeout_s: float = BODY_TIMEOUT_S) -> Starlette:
    """The app; it loads the model in the background at start-up unless ``service`` is given. ``hosts``: the
    Host names allowed (None: any); ``api_key``: the key /v1/ routes require (None: none); ``instance``: the
    name each response carries for balancers (loadreport.py)."""
    api = Api(cfg, retry_after_s, max_body_bytes, body_timeout_s)
    routes = [Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model:path}", api.model, methods=["GET"]), Route("/health", api.health, methods=["GET"]),
              Route("/metrics", api.metrics, methods=["GET"])]
    app = api.app = Starlette(routes=routes, lifespan=api.lifespan, exception_handlers=http_errors.HANDLERS)
    app.add_middleware(security.Guard, api_key=api_key, hosts=hosts)
    app.add_middleware(LoadReport, state=app.state, instance=instance)
    app.state.service, app.state.draining, app.state.load_error = None, False, None
    app.state.probe = psi.PressureProbe()
    app.state.api = api
    app.state.exporter = api.exporter = Exporter(app.state, SERVER_SPANS)
    if service is not None:
        api.attach(service)
    return app


def serve(cfg: ServiceConfig, host: str, port: int, retry_after_s: float, drain_timeout_s: float = DRAIN_TIMEOUT_S,
          api_key: str | None = None, allowed_hosts: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          agent_port: int | None = None, instance: str | None = None,
          header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S) -> int:
    """Run the service until SIGINT/SIGTERM; then drain (the listener closes, requests in flight finish
    within ``drain_timeout_s``); a second signal exits at once. ``agent_port``: HAProxy's agent check
    (agent.py) on that port of ``host``."""
    import uvicorn
    security.check_exposure(host, api_key)
    app = build_app(cfg, retry_after_s=retry_after_s, max_body_bytes=max_body_bytes, api_key=api_key,
                    hosts=security.allowed_hosts(host, allowed_hosts), instance=instance,
                    body_timeout_s=body_timeout_s)
    if agent_port is not None:
        from llm_psi.service import agent
        try:
            agent.start(app.state, host, agent_port)
        except OSError as e:
            log.error("cannot answer HAProxy's agent check on %s:%d: %s", host, agent_port, e.strerror or e)
            return 2

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if app.state.draining:
                log.warning("signal %d again: exiting now, without draining", sig)
                logging.shutdown()
                os._exit(128 + sig)
            app.state.draining = True
            if app.state.service is not None:
                app.state.service.closed = True
            log.info("signal %d: draining for at most %g s (a second signal exits at once)", sig, drain_timeout_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(http_errors.DrainDeadline(app), host=host, port=port, log_config=None, log_level="info", access_log=False,
                            timeout_graceful_shutdown=drain_timeout_s, lifespan="on",
                            http=protocol.guarded(header_timeout_s))
    # uvicorn re-raises a handled signal once it has shut down, into the handler it found at start: make
    # that a no-op, so that a drained service exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Server(config).run()
    return 0
