"""Response headers for balancers: the ORCA load report (``endpoint-load-metrics``) on a request that asks
for one with ``endpoint-load-metrics-format: TEXT`` or ``JSON`` (service/headroom.py writes it), and the
instance's name (``x-llm-psi-instance``, --instance-name) on every response, so that a client behind a
balancer records which instance served it."""
from __future__ import annotations

from llm_psi.service import headroom


class LoadReport:
    """Pure ASGI middleware: adds the headers to the response's start message."""

    def __init__(self, app, state, instance: str | None = None):
        self.app, self.state, self.instance = app, state, instance

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        fmt = dict(scope.get("headers") or ()).get(headroom.ORCA_FORMAT_HEADER.encode())
        extra = [(headroom.INSTANCE_HEADER.encode(), self.instance.encode())] if self.instance else []

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                more = list(extra)
                if fmt is not None:
                    value = headroom.orca_header(fmt.decode("latin-1"), headroom.read(self.state))
                    if value is not None:
                        more.append((headroom.ORCA_HEADER.encode(), value.encode()))
                if more:
                    message = {**message, "headers": [*message.get("headers", []), *more]}
            await send(message)
        await self.app(scope, receive, send_with_headers)
