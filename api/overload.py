"""Load shedding: past ``api_max_inflight`` requests in progress, answer 503 at once instead of queueing.

A pure ASGI middleware (it does not buffer bodies): each HTTP request to a path other than the
liveness and metrics probes takes a slot; with none free the answer is a 503 problem+json with
Retry-After, so an overloaded service says so in microseconds rather than timing clients out.
"""
from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from core.errors import Unavailable
from core.settings import get_settings

EXEMPT = ("/health", "/metrics")


class LoadShedder:
    def __init__(self, app: ASGIApp, max_inflight: int | None = None) -> None:
        self.app = app
        self._max_inflight = max_inflight  # None: the setting, read on the first request
        self.inflight = 0

    @property
    def max_inflight(self) -> int:
        if self._max_inflight is None:
            self._max_inflight = get_settings().api_max_inflight
        return self._max_inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            body = json.dumps(Unavailable(f"the service is at capacity ({self.max_inflight} requests in progress); "
                                          "retry shortly").to_problem()).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/problem+json"), (b"retry-after", b"1"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
