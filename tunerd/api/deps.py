"""Route dependencies: the app's state, bearer-token auth (read and admin), and the lazily opened store.

Tokens: the admin token allows every route; the read token (what training jobs hold) allows the
read routes only (403 elsewhere). Reads are open unless a read token is set or protect_reads is on.
When any token is set, write routes need the admin token (with none configured they are disabled).
"""

from __future__ import annotations

import hmac
import threading
import time
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request
from pydantic import SecretStr

from tunerd.db.errors import StoreError

from .errors import ApiError

if TYPE_CHECKING:
    from .state import Service

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


# Dependencies are async (they never block): FastAPI runs a sync one in its thread pool, a hop per request.
async def service(request: Request) -> Service:
    return request.app.state.service


def _matches(given: bytes, token: SecretStr | None) -> bool:
    return token is not None and hmac.compare_digest(given, token.get_secret_value().encode())


def bearer(request: Request) -> bytes | None:
    """The bearer token of the request; 401 for another scheme, None when there is no Authorization."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        raise ApiError(401, "invalid bearer token", headers=_CHALLENGE)
    return given.strip().encode("utf-8", "surrogateescape")


def _settings(request: Request) -> Any:
    return request.app.state.service.settings


def reads_open(request: Request) -> bool:
    s = _settings(request)
    return s.read_token is None and not s.protect_reads


def can_read(request: Request) -> bool:
    """Whether the request may see read-only details (no exception: for routes open to everyone)."""
    try:
        check_read(request)
    except ApiError:
        return False
    return True


def check_read(request: Request) -> None:
    if reads_open(request):
        return
    s = _settings(request)
    if s.token is None and s.read_token is None:
        return  # protect_reads without any token: nothing to check against
    given = bearer(request)
    if given is None:
        raise ApiError(
            401, "this route needs a bearer token (Authorization: Bearer <read or admin token>)", headers=_CHALLENGE
        )
    if not (_matches(given, s.token) or _matches(given, s.read_token)):
        raise ApiError(401, "invalid bearer token", headers=_CHALLENGE)


async def require_read(request: Request) -> None:
    check_read(request)


async def require_admin(request: Request) -> None:
    s = _settings(request)
    if s.token is None:
        if s.read_token is None:
            return  # no tokens at all: `tunerd serve` allows that on loopback only (or with --insecure)
        raise ApiError(403, "write routes are disabled: this server has a read token but no admin token")
    given = bearer(request)
    if given is None:
        raise ApiError(
            401, "this route needs the admin bearer token (Authorization: Bearer <token>)", headers=_CHALLENGE
        )
    if _matches(given, s.token):
        return
    if _matches(given, s.read_token):
        raise ApiError(403, "the read token does not allow this route; it needs the admin token")
    raise ApiError(401, "invalid bearer token", headers=_CHALLENGE)


READ = [Depends(require_read)]
ADMIN = [Depends(require_admin)]


class StoreHandle:
    """Forwards to a db.store.Store, opening it on first use and retrying (rate-limited) after failures,
    so the daemon starts, and answers 503, while the database is down."""

    def __init__(self, url: str | None = None, store: Any = None, retry_s: float = 2.0) -> None:
        self._url = url
        self._store = store
        self._retry_s = retry_s
        self._failed_at = -1e18
        self._error: StoreError | None = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._store is None:
                if self._error is not None and time.monotonic() - self._failed_at < self._retry_s:
                    raise type(self._error)(str(self._error))
                from tunerd.db.store import Store

                try:
                    self._store = Store(self._url)
                except StoreError as e:
                    self._error, self._failed_at = e, time.monotonic()
                    raise
            return self._store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)
