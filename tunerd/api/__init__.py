"""The tunerd daemon's HTTP API (FastAPI): `create_app` builds it, `serve` runs it with a tuning worker.

app (factory, middleware order) · routes/ (one module per resource) · deps (auth, store handle) ·
state (the Service the routes share) · schemas (bodies, documented errors) · errors (JSON error
bodies and status mapping) · middleware (load shedding, Host/Origin, body limits) · misses (batched
miss counting) · server (serve, secure defaults, ServerThread).
"""

from .app import create_app
from .server import InsecureExposure, ServerThread, serve

__all__ = ["InsecureExposure", "ServerThread", "create_app", "serve"]
