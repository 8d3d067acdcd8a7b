"""Running the daemon: `serve` (uvicorn + the tuning worker) with secure defaults, and ServerThread.

serve refuses a non-loopback host without a token unless settings.insecure, and warns when the
write routes are open on loopback. Connections must send their headers within header_timeout_s
(uvicorn has no such limit of its own: an idle or trickling connection would be held forever),
idle keep-alive connections close after keep_alive_s, and max_connections caps them. The protocol
also stamps each request with the time its head was parsed (middleware.RECEIVED): Admission sheds
on how long requests then wait for the event loop.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import threading
import time
from typing import Any

from ..settings import Settings
from .deps import StoreHandle
from .middleware import LOOPBACK_HOSTS, RECEIVED, EarlyShed

log = logging.getLogger("tunerd.api")


class InsecureExposure(ValueError):
    """Serving a non-loopback address without a token, and insecure was not asked for."""


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    if h in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse (InsecureExposure) or warn about a configuration that leaves routes open."""
    if settings.token is not None:
        return
    if not is_loopback(settings.host):
        if not settings.insecure:
            raise InsecureExposure(
                f"refusing to serve {settings.host} without a token: anyone who can reach it could queue jobs and "
                f"import bundles. Set TUNERD_TOKEN (or --token-file), or pass --insecure if this network is trusted."
            )
        log.warning("serving %s WITHOUT a token (--insecure): every route is open to the network", settings.host)
    else:
        log.warning(
            "no admin token set: write routes (jobs, bundle import, snapshots) are open to every local "
            "process; set TUNERD_TOKEN to protect them"
        )


def http_protocol(timeout_s: float, early: EarlyShed | None = None) -> type | None:
    """uvicorn's httptools protocol with a deadline for each request's headers that stamps each request
    with its arrival (scope[RECEIVED]) and, while the app's Admission sheds (early), refuses new requests
    with its pre-encoded 503 straight onto the connection, before uvicorn builds the request; None without
    httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class Protocol(HttpToolsProtocol):
        _header_timer: Any = None
        _refused = False  # the request being parsed was answered early: its body is discarded

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # a client that connects and sends nothing
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            self._refused = False
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            now = time.monotonic()
            adm = early.admission if early is not None else None
            if (
                adm is not None
                and (self.cycle is None or self.cycle.response_complete)  # nothing pipelined before it
                and not self.pipeline
                and self.url.split(b"?", 1)[0] not in adm.exempt_raw
                and adm.refuse_on_arrival(now)
            ):
                self._refused = True
                self.transport.write(adm.raw_503)
                if self.parser.should_keep_alive():
                    self.on_response_complete()  # arms the keep-alive timer, as after any response
                else:
                    self.transport.close()
                return
            self.scope[RECEIVED] = now  # type: ignore[literal-required]
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def uvicorn_options(settings: Settings, early: EarlyShed | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=64 * 1024,
        access_log=False,
    )
    protocol = http_protocol(settings.header_timeout_s, early)
    if protocol is not None:
        opts["http"] = protocol
    return opts


def serve(
    host: str | None = None,
    port: int | None = None,
    db_url: str | None = None,
    *,
    token: str | None = None,
    worker: bool | None = None,
    settings: Settings | None = None,
    log_level: str | None = None,
) -> None:
    """Run the daemon: the API under uvicorn and a tuning worker thread on this machine's device."""
    import uvicorn

    from tunerd.db.errors import StoreUnavailable

    from ..worker import JobWorker
    from .app import create_app

    overrides = {
        k: v
        for k, v in dict(host=host, port=port, db_url=db_url, token=token, worker=worker, log_level=log_level).items()
        if v is not None
    }
    base = settings or Settings()
    settings = Settings(**{**base.model_dump(), **overrides}) if overrides else base
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter on every start
    check_exposure(settings)
    store = StoreHandle(settings.db_url)
    try:
        store.get()
    except StoreUnavailable as e:  # start anyway: routes answer 503 until the database is back
        log.warning("database unavailable at start (%s); serving 503s until it answers", e)
    tuner = JobWorker.from_settings(store, settings) if settings.worker else None
    app = create_app(settings, store, tuner)
    # torch, triton and friends leave ~250k long-lived objects; a full collection over them stalls every
    # request for 100+ ms. Frozen, the collector only walks what the daemon allocates from here on.
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        **uvicorn_options(settings, app.state.early_shed),
    )


class ServerThread:
    """An app served by uvicorn on a background thread (tests, notebooks, embedding); a context manager.

    port 0 picks a free loopback port; `url` says where it listens once started."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        settings: Settings | None = None,
        early: EarlyShed | None = None,
    ) -> None:
        import socket

        import uvicorn

        settings = settings or getattr(getattr(app.state, "service", None), "settings", None) or Settings()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level=log_level,
                lifespan="on",
                timeout_graceful_shutdown=5,
                **uvicorn_options(settings, early or getattr(getattr(app, "state", None), "early_shed", None)),
            )
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name=f"tunerd-http-{self.port}"
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the tunerd server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
