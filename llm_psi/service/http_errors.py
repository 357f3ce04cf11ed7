"""How the HTTP app answers what goes wrong: every error in OpenAI's shape, Starlette's own (404, 405) included;
a server fault as a bare 500 (its traceback goes to the log, never to the client); a refusal as 503 with
Retry-After; a request cut at the drain deadline as 503 and one INFO line."""
from __future__ import annotations

import asyncio
import json
import logging
import math

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from llm_psi.service.openai_api import ApiError

log = logging.getLogger("http_api")


def unavailable(message: str, kind: str, retry_after: float, **extra) -> ApiError:
    return ApiError(503, message, kind, headers={"Retry-After": str(max(1, math.ceil(retry_after)))}, **extra)


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


HANDLERS = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}


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
