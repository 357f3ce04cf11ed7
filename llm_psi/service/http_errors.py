"""How the HTTP app answers what goes wrong: every error in OpenAI's shape, Starlette's own (404, 405) included;
a server fault as a bare 500 (its traceback goes to the log, never to the client); a refusal as 503 with
Retry-After; a request cut at the drain deadline as 503 and one INFO line; a client gone mid-body as one INFO
line.

Retry-After is spread: each 503 draws its delay uniformly from [d, 2d] (d: the refusal's estimate, or
--retry-after-s), sent as ``retry-after-ms`` (which the official openai client honours to the millisecond)
and as ``Retry-After`` in whole seconds (rounded up), so refused clients do not all come back at once."""
from __future__ import annotations

import asyncio
import json
import logging
import random

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from llm_psi.service.openai_api import ApiError

log = logging.getLogger("http_api")


def retry_headers(retry_after: float) -> dict:
    """Retry-After drawn from [d, 2d] (d at least 1 s): in ms for clients that read it, in whole seconds."""
    ms = round(max(1.0, retry_after) * random.uniform(1.0, 2.0) * 1000)
    return {"Retry-After": str(-(-ms // 1000)), "retry-after-ms": str(ms)}   # seconds: the ms rounded up


def unavailable(message: str, kind: str, retry_after: float, **extra) -> ApiError:
    return ApiError(503, message, kind, headers=retry_headers(retry_after), **extra)


async def _api_error(request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request, exc: HTTPException):
    """Starlette's own errors (404 no route, 405 wrong method, ...) in OpenAI's shape."""
    codes = {404: ("unknown_url", f"no route {request.method} {request.url.path}"),
             405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path}")}
    code, message = codes.get(exc.status_code, (None, exc.detail))
    return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code,
                        headers=exc.headers)


async def _server_error(request, exc: Exception):
    """A fault of the server's own: 500, never its text (the traceback goes to the log)."""
    return JSONResponse(ApiError(500, "internal server error", "server_error").body(), status_code=500)


async def _client_gone(request, exc: ClientDisconnect):
    """The client went away before its body was whole: one INFO line; the answer goes nowhere."""
    log.info("%s %s: client disconnected before its body was read; dropped", request.method, request.url.path)
    return Response(status_code=499)


HANDLERS = {ApiError: _api_error, HTTPException: _http_error, ClientDisconnect: _client_gone,
            Exception: _server_error}


class DrainDeadline:
    """ASGI wrapper: a request that uvicorn cancels at the drain deadline ends cleanly, with one INFO line
    instead of an ERROR traceback: 503 if its response has not started; a stream gets a last error event and
    its end (without ``data: [DONE]``); another started response just ends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                started.update({k.decode().lower(): v.decode() for k, v in message.get("headers", [])})
                started["status"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if scope["type"] != "http" or not self.app.state.draining:
                raise
            log.info("%s %s: cancelled at the drain deadline%s", scope["method"], scope["path"],
                     " mid-response" if started else "; answered 503")
            err = unavailable("the service stopped: its drain deadline passed", "unavailable", 1)
            if not started:
                await JSONResponse(err.body(), err.status, headers={"Connection": "close"})(scope, receive, send)
                return
            tail = b""
            if started.get("content-type", "").startswith("text/event-stream"):
                tail = f"data: {json.dumps(err.body())}\n\n".encode()
            await send({"type": "http.response.body", "body": tail, "more_body": False})
