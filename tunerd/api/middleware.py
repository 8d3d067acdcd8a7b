"""Plain ASGI middleware (cheap on the lookup hot path): load shedding, Host/Origin checks, body limits.

Admission answers 503 with Retry-After at once when requests queue for the event loop (a standing
queue, CoDel-like) or too many are in flight, so a flood gets fast refusals instead of seconds of
queueing; while it sheds, the server's protocol asks it first (EarlyShed) and refuses new requests as
their headers are parsed, before any scope, task or middleware is made for them. HostGuard refuses requests that name
another Host (DNS rebinding) or come from a page of another Origin (a browser's simple request).
BodyLimit refuses bodies over the limit (413) before anything parses them and bodies that arrive
too slowly (408).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .errors import ApiError, BodyTooLarge

log = logging.getLogger("tunerd.api")
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_timeout_at = getattr(asyncio, "timeout_at", None)


async def send_error(
    send: Callable, status: int, detail: str, headers: dict[str, str] | None = None, close: bool = False, **extra: Any
) -> None:
    body = json.dumps({"detail": detail, **extra}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


RECEIVED = "tunerd.received"  # scope key: time.monotonic() when the server parsed the request head
MIN_WINDOW = 8  # requests a shedding window needs before it decides


class EarlyShed:
    """Where the server's protocol (server.py) finds the app's Admission, which registers itself here."""

    admission: Admission | None = None


class Admission:
    """Load shedding: 503 + Retry-After, pre-encoded (no JSON, no routing), on two signals.

    - Queueing delay (CoDel-like). The server stamps scope[RECEIVED] when it parses a request head
      (server.py's protocol); the delay is how long the request then waited for the event loop. A
      burst is let through; a standing queue is not: once more than half of the requests of one
      window (`interval_s` and at least MIN_WINDOW requests) waited longer than `target_s`, requests
      that waited longer than target_s are refused until none has for a whole interval. Cached hits
      finish in one step on the event loop, so this, not the in-flight count, sees an overload of them.
    - In flight: at most `limit` requests (misses, database reads in threads) at once.

    While shedding, and while requests keep arriving late (one did within the last interval), the server's
    protocol refuses new requests as soon as their headers are parsed (refuse_on_arrival, raw_503): the
    cheapest refusal there is, so a flood costs little more than parsing. Once an interval passes with no
    late request, requests reach the app again and are measured; shedding ends as above.

    Paths in `exempt` always pass. Without a RECEIVED stamp (another server) only the bound applies.
    """

    def __init__(
        self,
        app: Any,
        limit: int,
        target_s: float = 0.005,
        interval_s: float = 0.05,
        exempt: frozenset[str] = frozenset({"/healthz"}),
        retry_after_s: int = 1,
        clock: Callable[[], float] = time.monotonic,
        early: EarlyShed | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.target_s = target_s
        self.interval_s = interval_s
        self.exempt = exempt
        self.clock = clock
        self.in_flight = 0
        self.shed = 0  # requests refused, both signals
        self.shedding = False  # a standing queue was seen: late requests are refused
        self._window_start = -1e18
        self._seen = self._late = 0
        self._last_late = -1e18
        busy = f"retry after {retry_after_s} s"
        self._queue_503 = _encoded(
            503,
            {"detail": f"server overloaded: requests wait longer than {target_s * 1000:g} ms; {busy}"},
            retry_after_s,
        )
        self._flight_503 = _encoded(
            503, {"detail": f"server busy: {limit} requests in flight; {busy}", "limit": limit}, retry_after_s
        )
        start, body = self._queue_503
        self.raw_503 = (  # the same response as bytes on the wire, for the protocol's early refusal
            b"HTTP/1.1 503 Service Unavailable\r\n"
            + b"".join(k + b": " + v + b"\r\n" for k, v in start["headers"])
            + b"\r\n"
            + body["body"]
        )
        self.exempt_raw = frozenset(p.encode() for p in exempt)
        if early is not None:
            early.admission = self

    def refuse_on_arrival(self, now: float) -> bool:
        """Whether the protocol should refuse a request whose headers were just parsed (counted as shed)."""
        if self.shedding and now - self._last_late < self.interval_s:
            self.shed += 1
            return True
        return False

    def overloaded(self, scope: dict) -> bool:
        """Whether to refuse this request for its queueing delay; updates the window (one event loop: no lock)."""
        received = scope.get(RECEIVED)
        if received is None:
            return False
        now = self.clock()
        if now - self._window_start >= self.interval_s and self._seen >= MIN_WINDOW:  # slow requests: a longer window
            if not self.shedding and 2 * self._late > self._seen:
                self.shedding = True
                log.warning("load shedding: most requests waited over %g ms", self.target_s * 1000)
            self._window_start, self._seen, self._late = now, 0, 0
        self._seen += 1
        if now - received > self.target_s:
            self._late += 1
            self._last_late = now
            return self.shedding
        if self.shedding and now - self._last_late >= self.interval_s:
            self.shedding = False
            log.warning("load shedding ended: %d requests refused so far", self.shed)
        return False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        if self.overloaded(scope):
            self.shed += 1
            return await _send_encoded(send, self._queue_503)
        if self.in_flight >= self.limit:
            self.shed += 1
            return await _send_encoded(send, self._flight_503)
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _encoded(status: int, body: dict, retry_after_s: int) -> tuple[dict, dict]:
    """The two ASGI messages of a fixed JSON response, built once."""
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"retry-after", str(retry_after_s).encode()),
    ]
    return {"type": "http.response.start", "status": status, "headers": headers}, {
        "type": "http.response.body",
        "body": data,
    }


async def _send_encoded(send: Callable, messages: tuple[dict, dict]) -> None:
    await send(messages[0])
    await send(messages[1])


def host_of(value: str) -> str:
    """'Host:port' / '[v6]:port' -> the lower-case host name or address."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostGuard:
    """403 for a Host outside allowed_hosts (None: any) or an Origin that is neither an allowed host,
    the request's own host, nor listed in allowed_origins."""

    def __init__(self, app: Any, allowed_hosts: frozenset[str] | None, allowed_origins: frozenset[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = origin = None
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        hostname = host_of(host) if host is not None else None
        if self.allowed_hosts is not None and hostname not in self.allowed_hosts:
            return await send_error(
                send,
                403,
                f"Host {host!r} is not served here (allowed: {sorted(self.allowed_hosts)}; set TUNERD_ALLOWED_HOSTS)",
            )
        if origin is not None and not self._origin_ok(origin, hostname):
            return await send_error(
                send,
                403,
                f"requests from the web origin {origin[:100]!r} are refused (allowed: "
                f"{sorted(self.allowed_origins)}; set TUNERD_ALLOWED_ORIGINS)",
            )
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, hostname: str | None) -> bool:
        o = origin.strip().rstrip("/").lower()
        if o in self.allowed_origins:
            return True
        parts = urlsplit(o)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (sandboxed pages, files) and anything odd
        if self.allowed_hosts is not None:
            return parts.hostname in self.allowed_hosts
        return parts.hostname == hostname


class BodyLimit:
    """413 for a body over limit_for(scope) bytes (declared or streamed), 408 for one slower than timeout_s."""

    def __init__(self, app: Any, limit_for: Callable[[dict], int], timeout_s: float) -> None:
        self.app = app
        self.limit_for = limit_for
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await send_error(send, 400, "Content-Length is not an integer", close=True)
                if declared > limit:
                    return await send_error(send, 413, str(BodyTooLarge(limit).detail), close=True, limit=limit)
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def limited() -> dict:
            nonlocal seen
            try:
                if _timeout_at is not None:  # Python 3.11+: no extra task per receive
                    async with _timeout_at(deadline):
                        message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


class BodyTimeout(ApiError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s", timeout_s=timeout_s)
