"""The service's ASGI middleware: body size limit, cross-origin guard, refusal throttle.

Each wraps the FastAPI app (``app.add_middleware``) and works on the raw ASGI messages, so a
request it refuses never reaches the form parser or a worker:

* :class:`BodyLimit` answers 413 to a body over the upload limit (declared or streamed);
* :class:`Guard` answers 403 to a cross-origin write and adds :data:`SECURITY_HEADERS`;
* :class:`RefusalThrottle` holds the refusals of a client that keeps being refused, so a
  script that loops on bad requests slows itself down instead of taking the cores from
  valid requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "FORM_SLACK",
    "REFUSED_STATUSES",
    "SECURITY_HEADERS",
    "BodyLimit",
    "Guard",
    "RefusalThrottle",
]

logger = logging.getLogger("evidencemap.server")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}
"""Headers of every answer (the interactive API docs at /docs keep their own scripts)."""
FORM_SLACK = 64 * 1024
"""Bytes a multipart body may carry beyond the file itself (boundaries, headers, fields)."""
REFUSED_STATUSES = frozenset({400, 403, 405, 413, 415, 422})
"""Statuses that count as a refusal of the client's request (not 404: a missing asset is not
the client's fault; not 409 / 499 / 503: those are about the service's state)."""

ASGIApp = Callable[..., Awaitable[None]]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HttpMiddleware:
    """ASGI middleware base: HTTP requests go to :meth:`http`, everything else passes."""

    app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class BodyLimit(HttpMiddleware):
    """Refuse request bodies over ``limit`` bytes with 413.

    A declared ``Content-Length`` over the limit is answered at once, unread; a body that
    turns out longer (chunked uploads) stops being read at the limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body exceeds the upload limit of {self.limit - FORM_SLACK} bytes"
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"error": message}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit:
                    raise StarletteHTTPException(413, message)
            return event

        await self.app(scope, limited, send)


class Guard(HttpMiddleware):
    """Refuse cross-origin writes; add the security headers to every answer.

    A ``POST`` (or other non-GET request) whose ``Origin`` header is neither the service's own
    origin (``http://`` + its ``Host`` header) nor in ``allowed_origins`` gets 403 unread, so
    a web page elsewhere cannot drive the local service. Requests without ``Origin`` (curl,
    scripts) pass.
    """

    def __init__(self, app: ASGIApp, allowed_origins: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed_origins

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/")
        if scope.get("method", "GET") not in ("GET", "HEAD", "OPTIONS") and origin:
            host = headers.get(b"host", b"").decode("latin-1")
            own = {f"http://{host}", f"https://{host}"}
            if origin not in own and origin not in self.allowed:
                response = JSONResponse(
                    {"error": f"cross-origin request from {origin} refused"}, status_code=403
                )
                await response(scope, receive, self._secured(send, scope))
                return
        await self.app(scope, receive, self._secured(send, scope))

    @staticmethod
    def _secured(send: Send, scope: Scope) -> Send:
        docs = str(scope.get("path", "")).startswith(("/docs", "/redoc"))

        async def secured(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (k.lower().encode(), v.encode())
                    for k, v in SECURITY_HEADERS.items()
                    if not (docs and k == "Content-Security-Policy")
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        return secured


class RefusalThrottle(HttpMiddleware):
    """Hold the refusals of a client that keeps being refused.

    Every answer with a status in :data:`REFUSED_STATUSES` counts against the client's address.
    Once an address has had more than ``allowance`` refusals in the last ``window`` seconds,
    each further refusal to it waits ``delay`` seconds before it is sent (an ``asyncio`` sleep:
    no CPU, no worker). A client sending one request at a time then gets at most ``1 / delay``
    refusals a second, instead of taking the cores from valid requests with as many as the
    service can refuse (measured: ≈ 3 ms of the service's CPU and as much of the client's per
    refused upload). Valid answers are never held, also not those to a throttled address.
    At most ``max_held`` answers wait at once (more are sent without delay), and at most
    ``max_clients`` addresses are remembered (the least recently refused are forgotten), so
    the throttle's own memory stays bounded.

    Args:
        app: the ASGI app.
        delay: seconds a refusal over the allowance waits (``0``: the throttle is off).
        allowance: refusals per address and window answered at once.
        window: seconds over which refusals are counted.
    """

    def __init__(
        self,
        app: ASGIApp,
        delay: float,
        allowance: int,
        window: float = 10.0,
        max_held: int = 256,
        max_clients: int = 4096,
    ) -> None:
        self.app = app
        self.delay = delay
        self.allowance = allowance
        self.window = window
        self.max_held = max_held
        self.max_clients = max_clients
        self.held = 0
        self._refusals: OrderedDict[str, deque[float]] = OrderedDict()

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.delay <= 0:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"

        async def throttled(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] in (REFUSED_STATUSES):
                wait = self.refused(address)
                if wait > 0 and self.held < self.max_held:
                    self.held += 1
                    try:
                        await asyncio.sleep(wait)
                    finally:
                        self.held -= 1
            await send(message)

        await self.app(scope, receive, throttled)

    def refused(self, address: str, now: float | None = None) -> float:
        """Count one refusal of ``address``; the seconds its answer waits (0 or ``delay``)."""
        now = time.monotonic() if now is None else now
        times = self._refusals.pop(address, None)
        if times is None:
            times = deque(maxlen=self.allowance + 1)  # enough to tell "over the allowance"
        while times and times[0] <= now - self.window:
            times.popleft()
        before = len(times)
        times.append(now)
        self._refusals[address] = times  # most recently refused last
        while len(self._refusals) > self.max_clients:
            self._refusals.popitem(last=False)
        if len(times) <= self.allowance:
            return 0.0
        if before == self.allowance:  # it just went over
            logger.warning(
                "%s was refused more than %d times in %g s: its refusals now wait %g s each",
                address,
                self.allowance,
                self.window,
                self.delay,
            )
        return self.delay
