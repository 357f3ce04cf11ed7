"""The service's locks: the Host header allow-list, the API key, the JSON content type and the body size.

- Host: a request whose Host header is not allowed gets 400 ``invalid_host`` (a defence against DNS
  rebinding: a web page that resolves its own name to 127.0.0.1 still sends its own name as Host). Bound to
  a loopback address, the service allows the loopback names (localhost, 127.0.0.1, ::1) and the bound
  address; bound elsewhere, any Host unless ``--allowed-hosts`` names them.
- API key (``--api-key`` or $LLM_PSI_API_KEY): every /v1/ route requires ``Authorization: Bearer KEY``,
  else 401 ``invalid_api_key``. /health and /metrics stay open (as vLLM's do): they carry counters and
  pressure, never request content, and a scraper needs no secret.
  The key is compared as bytes (UTF-8), in constant time: a non-ASCII key works.
- A POST body must be ``Content-Type: application/json`` (415), at most ``max_body_bytes`` (413), checked
  while it is read: an oversized body is refused before it is held in memory. The rest of an oversized body
  is read and dropped (up to DISCARD_BYTES) before the 413 goes out, so that the client, still sending,
  reads its 413 instead of a connection reset. The whole body must arrive within ``--body-timeout-s`` of
  the header, else 408 and the connection closes.
- A client gone before its body is whole: one INFO line (no traceback), nothing answered.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re

from starlette.responses import JSONResponse

from llm_psi.config import API_KEY_ENV
from llm_psi.service.openai_api import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DISCARD_BYTES = 64 << 20   # of a body over the limit, read and drop at most this much before the 413
# Host = uri-host [ ":" port ] (RFC 9110 7.2): a bracketed IPv6 literal or a name/IPv4, then digits only
HOST_RE = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._~-]+))(?::[0-9]{0,5})?", re.ASCII)
log = logging.getLogger("http_api")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, option: str | None) -> frozenset[str] | None:
    """The Host names allowed (None: any): ``option`` (comma-separated, ``*`` for any) or the default."""
    if option is not None:
        names = [n.strip().lower().strip("[]") for n in option.split(",") if n.strip()]
        return None if "*" in names else frozenset(names)
    if is_loopback(bind_host):
        return frozenset({*LOOPBACK_NAMES, bind_host.lower().strip("[]")})
    return None


def check_exposure(bind_host: str, api_key: str | None) -> None:
    """A warning where the service listens beyond this machine without a key."""
    if not is_loopback(bind_host) and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the "
                    "service (set --api-key or $%s)", bind_host, API_KEY_ENV)


def host_name(header: str) -> str | None:
    """The name of a Host header, without its port ([::1]:8000 -> ::1, localhost:8000 -> localhost); None
    where the header is no valid host[:port] (127.0.0.1:evil, localhost:1@evil.com)."""
    m = HOST_RE.fullmatch(header.strip().lower())
    if m is None:
        return None
    return m["v6"] if m["v6"] is not None else m["name"]


class Guard:
    """ASGI middleware: the Host allow-list on every route, the API key on /v1/ routes."""

    def __init__(self, app, api_key: str | None = None, hosts: frozenset[str] | None = None):
        self.app, self.api_key, self.hosts = app, api_key, hosts

    def check(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers", []))
        if self.hosts is not None and host_name(headers.get(b"host", b"").decode("latin-1")) not in self.hosts:
            return ApiError(400, "this Host header is not allowed (llm_server.py serve --allowed-hosts)",
                            param="Host", code="invalid_host")
        if self.api_key and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key.encode()):
                return ApiError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.check(scope)
            if err is not None:
                await JSONResponse(err.body(), err.status, headers=err.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_json_body(request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The body of a JSON request: 415 for another content type, 413 past ``max_bytes`` (read in chunks),
    408 unless it is whole within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_json_body(request, max_bytes)
    except TimeoutError:
        log.info("%s %s: closed: the body did not arrive within %g s (--body-timeout-s)", request.method,
                 request.url.path, timeout_s)
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None


async def _discard(stream, limit: int) -> bool:
    """Read and drop the rest of the body, up to ``limit`` bytes; True if it ended within them."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            return False
    return True


async def _read_json_body(request, max_bytes: int) -> bytes:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {media or 'none'}",
                       param="Content-Type", code="unsupported_media_type")
    too_big = ApiError(413, f"the body is larger than {max_bytes} bytes (llm_server.py serve --max-body-bytes)",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    chunks, size, stream = [], 0, request.stream()
    if not (length.isdigit() and int(length) > max_bytes):
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
    # over the limit: the client is still sending; read the rest (dropped) so that it reads its 413
    if not await _discard(stream, DISCARD_BYTES):
        too_big.headers = {"Connection": "close"}
    raise too_big
