"""The tunerd daemon: the versioned HTTP API, the dashboard, metrics, and the tuning worker beside it.

`create_app(settings, store, worker)` builds the FastAPI app; `serve(...)` runs it under uvicorn
with a worker thread that tunes queued jobs (and, when idle, the most requested misses) on this
machine's device. Every route is a thin shell over db.store; store failures become HTTP errors
(503 when the database is down or locked) and never take the daemon down.
"""
from __future__ import annotations

import gc
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional, Union

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from db.errors import (BundleError, InvalidRecord, SchemaError, SnapshotExists, StoreError, StoreUnavailable,
                       UnknownJob, UnknownSnapshot)
from db.fingerprint import DeviceFingerprint
from db.fingerprint import current as current_device
from kernels import generator
from kernels.schedule import ScheduleError
from kernels.spec import BlockSpec, SpecError

from .dashboard import render_dashboard, version
from .metrics import Metrics, MetricsMiddleware
from .settings import Settings

log = logging.getLogger("tunerd.service")
API = "/v1"


# ---- errors -----------------------------------------------------------------------------------------
class ApiError(StarletteHTTPException):
    """An HTTP error whose JSON body is {"detail": message, **extra}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.extra = extra


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds this server's limit of {limit} bytes", limit=limit)


_STORE_ERRORS: list[tuple[type, int]] = [  # most specific first
    (StoreUnavailable, 503), (UnknownSnapshot, 404), (UnknownJob, 404), (SnapshotExists, 409),
    (BundleError, 422), (InvalidRecord, 422), (SchemaError, 503), (StoreError, 500)]


def _status_of(e: StoreError) -> int:
    return next(code for cls, code in _STORE_ERRORS if isinstance(e, cls))


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


# ---- ASGI middleware (plain ASGI: cheap on the lookup hot path) --------------------------------------
class BodyLimit:
    """Refuse bodies over the limit with 413 before anything parses them (declared or streamed length)."""

    def __init__(self, app: Any, limit_for: Callable[[dict], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_error(send, 400, "Content-Length is not an integer")
                if declared > limit:
                    return await _send_error(send, 413, str(BodyTooLarge(limit).detail), limit=limit)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Callable, status: int, detail: str, **extra: Any) -> None:
    body = json.dumps({"detail": detail, **extra}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---- the store, opened lazily so the daemon starts (and answers 503) while the database is down -------
class StoreHandle:
    """Forwards to a db.store.Store, opening it on first use and retrying (rate-limited) after failures."""

    def __init__(self, url: Optional[str] = None, store: Any = None, retry_s: float = 2.0) -> None:
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
                from db.store import Store

                try:
                    self._store = Store(self._url)
                except StoreError as e:
                    self._error, self._failed_at = e, time.monotonic()
                    raise
            return self._store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


# ---- request bodies -------------------------------------------------------------------------------
DeviceRef = Union[str, dict[str, Any]]
_DEVICE_DOC = ("a device fingerprint object (db.fingerprint.DeviceFingerprint.to_dict()), its key (canonical JSON) "
               "or its 16-hex digest; omitted: this daemon's own device")


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    specs: list[dict[str, Any]] = Field(..., min_length=1, description="BlockSpec objects (BlockSpec.to_dict())")
    device: Optional[DeviceRef] = Field(None, description=_DEVICE_DOC)
    snapshot: Optional[str] = Field(None, max_length=64, description="answer from this snapshot's pinned winners")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    specs: Optional[list[dict[str, Any]]] = Field(None, min_length=1, description="BlockSpecs to tune")
    suite: Optional[str] = Field(None, min_length=1, max_length=100, description="a named shape suite to tune")
    strategy: str = Field("halving", min_length=1, max_length=64)
    budget_trials: Optional[int] = Field(None, ge=1, le=1_000_000)
    budget_seconds: Optional[float] = Field(None, gt=0, le=30 * 86400)
    device: Optional[DeviceRef] = Field(None, description="only workers on this device may run the job; "
                                                          "omitted: any worker")


class SnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, max_length=64, description="default: generated from the time")


# ---- response shapes (documentation: routes build their JSON directly, keeping the hot path cheap) ----
class Launch(BaseModel):
    kernel_name: Optional[str] = Field(None, description="the @triton.jit function in source")
    grid: Optional[list[int]] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None


class LookupResult(BaseModel):
    index: int = Field(..., description="position of the spec in the request")
    hit: bool
    spec: dict[str, Any]
    spec_digest: str
    schedule: Optional[dict[str, Any]] = Field(None, description="hit: the winning Schedule")
    variant_id: Optional[str] = Field(None, description="hit: sha256(source)[:24]")
    source: Optional[str] = Field(None, description="hit: the exact Triton source that was measured")
    launch: Optional[Launch] = None
    timings: Optional[dict[str, Any]] = Field(None, description="hit: median_ms, spread_ms, reps")
    numerics: Optional[dict[str, Any]] = Field(None, description="hit: max_error vs the torch reference")
    speedup_vs_default: Optional[float] = None
    fraction_of_roofline: Optional[float] = None
    provenance: Optional[dict[str, Any]] = Field(None, description="hit: device, strategy, time, job, origin")
    misses: Optional[int] = Field(None, description="miss: lookups of this spec on this device so far")
    tuning: Optional[bool] = Field(None, description="miss: whether this daemon's idle worker will tune it")


class LookupResponse(BaseModel):
    device: str = Field(..., description="digest of the device answered for")
    snapshot: Optional[str] = None
    hits: int
    misses: int
    results: list[LookupResult]


class ErrorBody(BaseModel):
    detail: Any = Field(..., description="what is wrong, in words")


def _doc(model: type[BaseModel], *errors: int) -> dict[Any, Any]:
    return {200: {"model": model}, **{code: {"model": ErrorBody} for code in errors}}


class Service:
    """The app's state: settings, store, worker, the daemon's device and a few small caches."""

    def __init__(self, settings: Settings, store: Any, worker: Any) -> None:
        self.settings = settings
        self.store = store
        self.worker = worker
        self.device: DeviceFingerprint = worker.device if worker is not None else current_device()
        self.metrics = Metrics(self)
        self._devices: dict[str, DeviceFingerprint] = {}
        self._devices_at = -1e18
        self._launch: OrderedDict[str, dict] = OrderedDict()  # variant id -> launch metadata
        self._hits: OrderedDict[tuple[str, str, str], tuple[dict, float]] = OrderedDict()  # key -> (answer, when)
        self._lock = threading.Lock()

    # ---- devices --------------------------------------------------------------------------------------
    def known_devices(self, max_age_s: float = 2.0) -> dict[str, DeviceFingerprint]:
        """Device key -> fingerprint of every device the store knows, plus this daemon's own (cached)."""
        now = time.monotonic()
        if now - self._devices_at > max_age_s:
            found = {row.key: row.fingerprint for row in self.store.devices()}
            found.setdefault(self.device.key, self.device)
            self._devices, self._devices_at = found, now
        return self._devices

    def resolve_device(self, ref: DeviceRef | None, known_only: bool = True) -> DeviceFingerprint:
        """A fingerprint, key or digest -> a device this server has data for; 422 malformed, 404 unknown.

        known_only=False accepts any well-formed fingerprint or key (a job may target a new device)."""
        if ref is None:
            return self.device
        if isinstance(ref, dict):
            try:
                fp = DeviceFingerprint.from_dict(ref)
            except InvalidRecord as e:
                raise ApiError(422, f"malformed device fingerprint: {e}") from None
        elif ref.lstrip().startswith("{"):
            try:
                fp = DeviceFingerprint.from_key(ref)
            except InvalidRecord as e:
                raise ApiError(422, f"malformed device key: {e}") from None
        else:
            fp = None
        if fp is not None and not known_only:
            return fp
        for max_age_s in (2.0, 0.25):  # a device new to this daemon: look again, at most 4 times a second
            known = self.known_devices(max_age_s)
            if fp is not None and fp.key in known:
                return known[fp.key]
            if fp is None:
                match = [d for d in known.values() if d.digest == ref]
                if match:
                    return match[0]
        raise self.unknown_device(fp, ref)

    def unknown_device(self, fp: DeviceFingerprint | None, ref: Any) -> ApiError:
        known = list(self.known_devices().values())
        what = fp.describe() if fp is not None else f"digest {str(ref)[:40]!r}"
        hint = ("no tuned kernels exist for this exact device (name, driver, CUDA, Triton, torch and generator "
                "version all count). Tune on a machine with this device (`tunerd serve` there) or import a bundle "
                "tuned on it; until then the client uses the default schedule.")
        if fp is not None and not fp.interpreter and known and all(d.interpreter for d in known):
            hint += " This server only has Triton-interpreter (CPU) timings, which never answer a GPU client."
        same = [d for d in known if fp is not None and d.name == fp.name]
        if same:
            differ = [f for f in fp.to_dict() if getattr(same[0], f) != getattr(fp, f)]
            hint += f" It has results for {fp.name} measured with a different {', '.join(differ)}."
        return ApiError(404, f"unknown device: {what}", hint=hint,
                        known_devices=[{"digest": d.digest, "description": d.describe(), "interpreter": d.interpreter}
                                       for d in known])

    # ---- specs ----------------------------------------------------------------------------------------
    @staticmethod
    def parse_specs(items: list[Any], limit: int) -> list[BlockSpec]:
        if len(items) > limit:
            raise ApiError(422, f"{len(items)} specs in one request; this server takes at most {limit}")
        specs, errors = [], []
        for i, item in enumerate(items):
            try:
                specs.append(BlockSpec.from_dict(item))
            except SpecError as e:
                errors.append({"index": i, "error": str(e)})
        if errors:
            first = errors[0]
            raise ApiError(422, f"malformed spec {first['index']}: {first['error']}"
                           + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""), errors=errors)
        return specs

    # ---- lookup ---------------------------------------------------------------------------------------
    def lookup(self, req: LookupRequest) -> dict[str, Any]:
        specs = self.parse_specs(req.specs, self.settings.max_specs_per_lookup)
        device = self.resolve_device(req.device)
        results, seen_miss = [], set()
        for i, spec in enumerate(specs):
            answer = self._answer(device, spec, req.snapshot)
            if answer is None:
                key = spec.to_json()
                count = None
                if key not in seen_miss:  # a model repeating a layer counts once per request
                    seen_miss.add(key)
                    count = self.store.record_miss(device, spec)
                answer = {"hit": False, "spec": spec.to_dict(), "spec_digest": spec.digest, "misses": count,
                          "tuning": bool(self.worker is not None and self.worker.tune_misses
                                         and device.key == self.device.key)}
                self.metrics.lookups.labels("miss").inc()
            else:
                self.metrics.lookups.labels("hit").inc()
            results.append({"index": i, **answer})
        return {"device": device.digest, "snapshot": req.snapshot, "results": results,
                "hits": sum(r["hit"] for r in results), "misses": sum(not r["hit"] for r in results)}

    def _answer(self, device: DeviceFingerprint, spec: BlockSpec, snapshot: str | None) -> dict | None:
        """The hit for (device, spec), or None. Snapshot hits are cached for good (they never change),
        live hits for settings.live_cache_s; misses are never cached (each one is counted)."""
        key = (device.key, snapshot or "", spec.to_json())
        now = time.monotonic()
        ttl = float("inf") if snapshot is not None else self.settings.live_cache_s
        if ttl > 0:
            with self._lock:
                cached = self._hits.get(key)
            if cached is not None and now - cached[1] < ttl:
                return cached[0]
        row = self.store.winner(device.key, spec, snapshot=snapshot)
        if row is None:
            return None
        answer = self.hit(row)
        if ttl > 0:
            with self._lock:
                self._hits[key] = (answer, now)
                while len(self._hits) > 50_000:
                    self._hits.popitem(last=False)
        return answer

    def launch_metadata(self, row: Any) -> dict[str, Any]:
        with self._lock:
            meta = self._launch.get(row.variant_id)
        if meta is None:
            try:
                v = generator.from_source(row.spec, row.schedule, row.source)
            except (SpecError, ScheduleError) as e:  # e.g. a bundle from a tunerd with more templates
                log.warning("cannot describe the launch of variant %s: %s", row.variant_id, e)
                return {"kernel_name": None, "grid": None, "num_warps": None, "num_stages": None, "error": str(e)}
            meta = {"kernel_name": v.kernel_name, "grid": list(v.grid), "num_warps": v.num_warps,
                    "num_stages": v.num_stages}
            with self._lock:
                self._launch[row.variant_id] = meta
                while len(self._launch) > 20_000:
                    self._launch.popitem(last=False)
        return meta

    def hit(self, row: Any) -> dict[str, Any]:
        """A winner as the lookup answers it: exact source, launch metadata, timings, numerics, provenance."""
        return {"hit": True, "spec": row.spec.to_dict(), "spec_digest": row.spec.digest,
                "schedule": row.schedule.to_dict(), "variant_id": row.variant_id, "source": row.source,
                "launch": self.launch_metadata(row),
                "timings": {"median_ms": row.median_ms, "spread_ms": row.spread_ms, "reps": row.reps},
                "numerics": {"max_error": row.max_error},
                "speedup_vs_default": row.speedup_vs_default, "fraction_of_roofline": row.fraction_of_roofline,
                "provenance": {"device": row.device.describe(), "device_digest": row.device.digest,
                               "interpreter": row.device.interpreter,
                               "generator_version": row.device.generator_version, "strategy": row.strategy,
                               "measured_at": row.created_at.isoformat(), "trial_id": row.trial_id,
                               "job_id": row.job_id, "origin": row.origin, "snapshot": row.snapshot}}

    # ---- auth -----------------------------------------------------------------------------------------
    def check_token(self, request: Request) -> None:
        token = self.settings.token
        if token is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(401, "this route needs a bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.get_secret_value().encode()):
            raise ApiError(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def body_limit(self, scope: dict) -> int:
        if scope.get("path") == f"{API}/bundle":
            return self.settings.max_bundle_bytes
        return self.settings.max_body_bytes


def _job(row: Any) -> dict[str, Any]:
    """A job as the API shows it; the device it is pinned to by digest (the full key is long)."""
    d = row.to_dict()
    if row.device_key is not None:
        try:
            d["device_key"] = DeviceFingerprint.from_key(row.device_key).digest
        except InvalidRecord:  # queued through the store directly with a free-form key
            d["device_key"] = row.device_key[:200]
    return d


def _winner(row: Any, include_source: bool) -> dict[str, Any]:
    d = row.to_dict()
    d["device"] = row.device.digest
    d["device_description"] = row.device.describe()
    d["spec_digest"] = row.spec.digest
    d["spec_description"] = row.spec.describe()
    if not include_source:
        del d["source"]
    return d


# ---- the app ---------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, store: Any = None, worker: Any = None) -> FastAPI:
    """The daemon's ASGI app. store defaults to the database at settings.db_url (opened lazily);
    a given worker is started with the app and stopped with it."""
    settings = settings or Settings()
    if store is None:
        store = StoreHandle(settings.db_url)
    svc = Service(settings, store, worker)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()

    app = FastAPI(title="tunerd", version=version(), lifespan=lifespan,
                  description="Tuned Triton convolution kernels: lookup, tuning jobs, bundles and snapshots.")
    app.state.service = svc

    def read_auth(request: Request) -> None:
        if settings.protect_reads:
            svc.check_token(request)

    def write_auth(request: Request) -> None:
        svc.check_token(request)

    reads, writes = [Depends(read_auth)], [Depends(write_auth)]

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, e: StoreError) -> Response:
        status = _status_of(e)
        if status >= 500:
            log.warning("store error (%s): %s", type(e).__name__, e)
        headers = {"Retry-After": "5"} if status == 503 else None
        return _json({"detail": str(e), "error": type(e).__name__}, status, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> Response:
        return _json({"detail": e.detail, **getattr(e, "extra", {})}, e.status_code, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError) -> Response:
        errors = [{"loc": list(err.get("loc", ())), "msg": err.get("msg"), "type": err.get("type")}
                  for err in e.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return _json({"detail": f"{where}: {first['msg']}" if where else first["msg"], "errors": errors}, 422)

    # ---- health and metrics -------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"], summary="Liveness, database and worker state")
    def healthz() -> Response:
        body: dict[str, Any] = {"status": "ok", "version": version(), "device": svc.device.describe(),
                                "worker": worker.status() if worker is not None else None}
        try:
            svc.store.ping()
            body["db"] = "ok"
        except StoreError as e:
            body.update(status="degraded", db=f"{type(e).__name__}: {e}")
            return _json(body, 503, {"Retry-After": "5"})
        return _json(body)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", dependencies=reads,
             response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- lookup -------------------------------------------------------------------------------
    @app.post(f"{API}/lookup", tags=["lookup"], dependencies=reads, responses=_doc(LookupResponse, 401, 404, 413,
                                                                                   422, 503),
              summary="Tuned kernels for one or many specs on a device (per spec: hit or miss)")
    def lookup(req: LookupRequest) -> Response:
        return _json(svc.lookup(req))

    # ---- jobs ---------------------------------------------------------------------------------
    @app.post(f"{API}/jobs", tags=["jobs"], dependencies=writes, status_code=201,
              summary="Queue tuning of specs or a suite")
    def submit_job(req: JobRequest) -> Response:
        if (req.specs is None) == (req.suite is None):
            raise ApiError(422, "give exactly one of specs (a list of BlockSpecs) or suite (a suite name)")
        specs = None if req.specs is None else svc.parse_specs(req.specs, settings.max_specs_per_job)
        _check_tuning_names(req.suite, req.strategy)
        device_key = None if req.device is None else svc.resolve_device(req.device, known_only=False).key
        job_id = svc.store.enqueue_job(specs=specs, suite=req.suite, strategy=req.strategy,
                                       budget_trials=req.budget_trials, budget_seconds=req.budget_seconds,
                                       device_key=device_key)
        return _json(_job(svc.store.job(job_id)), 201, {"Location": f"{API}/jobs/{job_id}"})

    @app.get(f"{API}/jobs/{{job_id}}", tags=["jobs"], dependencies=reads, summary="One job: status, progress, result")
    def get_job(job_id: int) -> Response:
        row = svc.store.job(job_id) if 0 < job_id < 2 ** 63 else None
        if row is None:
            raise ApiError(404, f"no job {job_id}")
        return _json(_job(row))

    @app.get(f"{API}/jobs", tags=["jobs"], dependencies=reads, summary="Recent jobs, newest first")
    def list_jobs(limit: int = Query(50, ge=1, le=1000),
                  status: Optional[str] = Query(None, pattern="^(queued|running|done|failed)$")) -> Response:
        return _json({"jobs": [_job(r) for r in svc.store.jobs(limit, status=status)],
                      "queue_depth": svc.store.queue_depth()})

    @app.delete(f"{API}/jobs/{{job_id}}", tags=["jobs"], dependencies=writes,
                summary="Cancel a queued or running job")
    def cancel_job(job_id: int) -> Response:
        if not 0 < job_id < 2 ** 63:
            raise ApiError(404, f"no job {job_id}")
        cancelled = svc.store.cancel_job(job_id)
        return _json({"id": job_id, "cancelled": cancelled, "job": _job(svc.store.job(job_id))})

    # ---- devices and winners --------------------------------------------------------------------
    @app.get(f"{API}/devices", tags=["winners"], dependencies=reads, summary="Devices with trials, winners, misses")
    def devices() -> Response:
        rows = [{**r.to_dict(), "description": r.fingerprint.describe()} for r in svc.store.devices()]
        return _json({"devices": rows, "this_device": svc.device.digest})

    @app.get(f"{API}/winners", tags=["winners"], dependencies=reads, summary="Winners, optionally per device")
    def winners(device: Optional[str] = Query(None, max_length=4096, description=_DEVICE_DOC),
                snapshot: Optional[str] = Query(None, max_length=64),
                include_source: bool = False) -> Response:
        fp = None if device is None else svc.resolve_device(device)
        rows = svc.store.winners(fp, snapshot=snapshot)
        return _json({"winners": [_winner(r, include_source) for r in rows], "snapshot": snapshot})

    # ---- bundles ------------------------------------------------------------------------------
    @app.get(f"{API}/bundle", tags=["bundles"], dependencies=reads, response_class=Response,
             summary="Export winners (with source) as a bundle, the CLI's `tunerd export` format")
    def export_bundle(device: Optional[str] = Query(None, max_length=4096, description=_DEVICE_DOC),
                      snapshot: Optional[str] = Query(None, max_length=64)) -> Response:
        from db import bundle

        fp = None if device is None else svc.resolve_device(device)
        provenance = {"exported_by": f"tunerd {version()} daemon", "server_device": svc.device.digest,
                      "device_filter": None if fp is None else fp.digest}
        data = bundle.bundle_bytes(svc.store, device=fp, snapshot=snapshot, provenance=provenance)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="tunerd.bundle"'})

    @app.post(f"{API}/bundle", tags=["bundles"], dependencies=writes,
              summary="Import a bundle (the bytes of `tunerd export`); all or nothing",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def import_bundle(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        from db import bundle

        data = await request.body()
        if not data:
            raise ApiError(422, "empty body: POST the bytes of a bundle (application/octet-stream)")
        report = await run_in_threadpool(bundle.import_bundle_bytes, svc.store, data)
        return _json(_report(report))

    # ---- snapshots ----------------------------------------------------------------------------
    @app.post(f"{API}/snapshots", tags=["snapshots"], dependencies=writes, status_code=201,
              summary="Pin the current winners under a name; lookups naming it never change")
    def create_snapshot(req: Optional[SnapshotRequest] = None) -> Response:
        name = svc.store.create_snapshot(req.name if req is not None else None)
        row = next((s for s in svc.store.snapshots() if s.name == name), None)
        return _json(row.to_dict() if row is not None else {"name": name}, 201,
                     {"Location": f"{API}/snapshots/{name}"})

    @app.get(f"{API}/snapshots", tags=["snapshots"], dependencies=reads, summary="Every snapshot")
    def list_snapshots() -> Response:
        return _json({"snapshots": [s.to_dict() for s in svc.store.snapshots()]})

    # ---- dashboard ----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, dependencies=reads, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        html, status = render_dashboard(svc)
        return HTMLResponse(html, status_code=status)

    app.add_middleware(BodyLimit, limit_for=svc.body_limit)
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)  # outermost: times 413s too
    return app


def _check_tuning_names(suite: str | None, strategy: str) -> None:
    """Refuse unknown suite or strategy names now rather than failing the job later."""
    from schedules.strategies import STRATEGIES
    from schedules.suites import SUITES

    if suite is not None and suite not in SUITES:
        raise ApiError(422, f"unknown suite {suite!r}; known: {sorted(SUITES)}")
    if strategy not in STRATEGIES:
        raise ApiError(422, f"unknown strategy {strategy!r}; known: {sorted(STRATEGIES)}")


def _report(report: Any) -> dict[str, Any]:
    if hasattr(report, "to_dict"):
        return report.to_dict()
    from dataclasses import asdict, is_dataclass

    return asdict(report) if is_dataclass(report) else dict(report)


# ---- running the daemon ------------------------------------------------------------------------------
def serve(host: str | None = None, port: int | None = None, db_url: str | None = None, *,
          token: str | None = None, worker: bool | None = None, settings: Settings | None = None,
          log_level: str | None = None) -> None:
    """Run the daemon: the API under uvicorn and a tuning worker thread on this machine's device."""
    import uvicorn

    from .worker import Worker

    overrides = {k: v for k, v in dict(host=host, port=port, db_url=db_url, token=token, worker=worker,
                                       log_level=log_level).items() if v is not None}
    base = settings or Settings()
    settings = Settings(**{**base.model_dump(), **overrides}) if overrides else base
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter on every start
    store = StoreHandle(settings.db_url)
    try:
        store.get()
    except StoreUnavailable as e:  # start anyway: routes answer 503 until the database is back
        log.warning("database unavailable at start (%s); serving 503s until it answers", e)
    tuner = Worker.from_settings(store, settings) if settings.worker else None
    app = create_app(settings, store, tuner)
    # torch, triton and friends leave ~250k long-lived objects; a full collection over them stalls every
    # request for 100+ ms. Frozen, the collector only walks what the daemon allocates from here on.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)


class ServerThread:
    """An app served by uvicorn on a background thread (tests, notebooks, embedding); a context manager.

    port 0 picks a free loopback port; `url` says where it listens once started."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name=f"tunerd-http-{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "ServerThread":
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

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
