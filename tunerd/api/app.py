"""The app factory: routes, error handlers and middleware around one Service."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from ..dashboard import version
from ..metrics import MetricsMiddleware
from ..settings import Settings
from . import errors
from .deps import StoreHandle
from .middleware import LOOPBACK_HOSTS, Admission, BodyLimit, EarlyShed, HostGuard
from .routes import bundles, jobs, lookup, ops, snapshots, winners
from .state import Service

DESCRIPTION = """Tuned Triton convolution kernels: lookup, tuning jobs, bundles and snapshots.

Auth: `Authorization: Bearer <token>`. The admin token allows every route; the read token allows the
read routes. Every route may answer 403 (Host/Origin not allowed), 413 (body too large) and 503
(database unavailable, or the server saturated: retry after `Retry-After` seconds), each with a JSON
body `{"detail": ...}`."""


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names served: as configured, else loopback names when bound to loopback, else any (None)."""
    if settings.allowed_hosts is not None:
        return frozenset(h.strip().lower().strip("[]") for h in settings.allowed_hosts)
    if settings.host.strip("[]").lower() in LOOPBACK_HOSTS or settings.host.startswith("127."):
        return LOOPBACK_HOSTS | {settings.host.strip("[]").lower()}
    return None


def create_app(settings: Settings | None = None, store: Any = None, worker: Any = None) -> FastAPI:
    """The daemon's ASGI app. store defaults to the database at settings.db_url (opened lazily);
    a given worker is started with the app and stopped with it."""
    settings = settings or Settings()
    if store is None:
        store = StoreHandle(settings.db_url)
    svc = Service(settings, store, worker)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        svc.start()
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(title="tunerd", version=version(), lifespan=lifespan, description=DESCRIPTION)
    app.state.service = svc
    app.state.parsed_specs = lookup.ParsedSpecs(svc)
    errors.install(app)
    for module in (lookup, ops, jobs, winners, bundles, snapshots):  # the hot route first: fewer routes to match
        app.include_router(module.router)
    # added innermost first: Metrics (times everything) > Admission (sheds first) > HostGuard > BodyLimit
    app.add_middleware(BodyLimit, limit_for=svc.body_limit, timeout_s=settings.body_timeout_s)
    app.add_middleware(
        HostGuard, allowed_hosts=allowed_hosts(settings), allowed_origins=frozenset(settings.allowed_origins)
    )
    app.state.early_shed = EarlyShed()  # the server's protocol asks the Admission through it (api.server)
    app.add_middleware(
        Admission,
        limit=settings.max_concurrent_requests,
        target_s=settings.shed_target_s,
        interval_s=settings.shed_interval_s,
        early=app.state.early_shed,
    )
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)
    return app
