"""The HTTP/1.1 connection, guarded: uvicorn's h11 protocol with a header timeout and JSON parser errors.

- Header timeout (``--header-timeout-s``, default HEADER_TIMEOUT_S): a connection must deliver a request's
  whole header within that time of its first byte (or of the connection, for a new one); else it gets
  408 in OpenAI's error shape and is closed (one INFO line). A slowloris client, a header byte a second,
  holds a connection no longer than that; the others are untouched. An idle kept-alive connection is
  closed by uvicorn's own keep-alive timeout.
- The body timeout (``--body-timeout-s``, default BODY_TIMEOUT_S) is the app's: the whole body must arrive
  within that time of the header (``security.read_json_body``, 408).
- A request the HTTP parser refuses (no Host, two Host headers, a bad Content-Length, a garbage request
  line) gets 400 in OpenAI's error shape, not uvicorn's text/plain.
- Lingering close: a connection closed while its client is still sending (a request cut by a timeout, a
  parser error, a body over the limit past what the app drops) first sends its answer and shuts down its
  writing side, then reads and drops what comes for up to LINGER_S before it closes. Closed at once, the
  unread bytes would make the kernel reset the connection, and the client would never read its answer.
"""
from __future__ import annotations

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from llm_psi.service.openai_api import ApiError

HEADER_TIMEOUT_S = 10.0   # a request's header must arrive within this (s)
BODY_TIMEOUT_S = 30.0     # its body within this of its header (s)
LINGER_S = 2.0            # a connection closed mid-request reads (and drops) its client's bytes this long
log = logging.getLogger("http_api")


def error_bytes(status: int, reason: str, err: ApiError) -> bytes:
    """A whole HTTP/1.1 response carrying ``err`` in OpenAI's shape, that closes the connection."""
    body = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode() + body


class LingeringTransport:
    """A transport whose close() lingers where the client's request is unread (see the module's note)."""

    def __init__(self, transport, protocol: "GuardedH11"):
        self._transport, self._protocol, self.lingering = transport, protocol, None

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering is not None or self._transport.is_closing()

    def close(self) -> None:
        t, conn = self._transport, self._protocol.conn
        unread = conn.their_state in (h11.SEND_BODY, h11.ERROR) or (conn.their_state is h11.IDLE
                                                                     and conn.trailing_data[0])
        if self.lingering is not None or t.is_closing() or not unread or not t.can_write_eof():
            if self.lingering is not None:
                self.lingering.cancel()
            t.close()
            return
        t.write_eof()          # the answer is out; the client reads it, then sees the end
        t.resume_reading()
        self.lingering = self._protocol.loop.call_later(LINGER_S, t.close)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and parser errors in OpenAI's shape."""
    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        self._header_timer = None
        super().connection_made(LingeringTransport(transport, self))
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering is not None:
            return     # closing: the client's bytes are read and dropped
        super().data_received(data)
        # a header still coming in (h11 waits in IDLE until it is whole): the timer runs; else it stops
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()   # until the next request's first byte, uvicorn's keep-alive timeout holds
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self.transport.lingering is not None:
            self.transport.lingering.cancel()
            self.transport.lingering = None
        super().connection_lost(exc)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return   # a response is still going out (a pipelined header waits): not this timer's business
        log.info("%s: closed: no whole request header within %g s (--header-timeout-s)",
                 "%s:%d" % tuple(self.client) if self.client else "client", self.header_timeout_s)
        err = ApiError(408, f"the request header did not arrive within {self.header_timeout_s:g} s",
                       code="request_timeout")
        self.transport.write(error_bytes(408, "Request Timeout", err))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """The HTTP parser refused the request: 400 in OpenAI's shape, then close."""
        self._disarm()
        err = ApiError(400, "invalid HTTP request: the request line or headers are malformed (a missing or "
                            "repeated Host header, a bad Content-Length, ...)", code="invalid_http_request")
        self.transport.write(error_bytes(400, "Bad Request", err))
        self.transport.close()


def guarded(header_timeout_s: float) -> type[GuardedH11]:
    """The protocol class for uvicorn.Config(http=...), with this header timeout."""
    return type("GuardedH11", (GuardedH11,), {"header_timeout_s": header_timeout_s})
