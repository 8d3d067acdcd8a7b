"""Bundles: export (read) and import (admin) in the CLI's `tunerd export` format.

An export with arch (GET /v1/bundle?arch=90, repeatable) ships the ahead-of-time binaries the store keeps, signed
with the daemon's signing_key (422 without one: clients use no binary of an unsigned bundle). It never compiles:
kernels without a kept binary are named in the X-Tunerd-Clients-Compile header and the provenance, and handed to
the idle worker, which compiles and keeps them for the next request.

An import must be application/octet-stream (a browser's simple request or a rebinding page cannot
post one), its gzip stream may expand to at most max_bundle_expanded_bytes (measured by streaming
before anything is parsed), and imports run one at a time, in a thread: lookups only read, so a long
import never blocks them.
"""

from __future__ import annotations

import platform
import threading
import zlib

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ...dashboard import version
from ..deps import ADMIN, READ, service
from ..errors import ApiError, json_response
from ..schemas import DEVICE_DOC, ImportReport, responses
from ..state import API, Service

router = APIRouter(prefix=API, tags=["bundles"])
_import_lock = threading.Lock()
BUNDLE_TYPE = "application/octet-stream"
MAX_ARCHES = 8  # arches one export may name


def expanded_size(data: bytes, limit: int, chunk: int = 1 << 20) -> int:
    """Bytes the gzip data expands to, streaming (memory: one chunk); 413 past limit, 422 if not gzip."""
    d = zlib.decompressobj(31)
    size, pending = 0, data
    try:
        while not d.eof:
            out = len(d.decompress(pending, chunk))
            size += out
            if size > limit:
                raise ApiError(
                    413, f"the bundle expands to more than this server's limit of {limit} bytes", limit=limit
                )
            pending = d.unconsumed_tail
            if not out and not pending:  # truncated: read_bundle says so
                break
    except zlib.error as e:
        raise ApiError(422, f"corrupt bundle: the gzip stream is damaged ({e})") from None
    return size


@router.get(
    "/bundle",
    dependencies=READ,
    response_class=Response,
    responses={
        **responses(None, 401, 404, 422),
        200: {"content": {BUNDLE_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    },
    summary="Export winners (with source) as a bundle, the CLI's `tunerd export` format; with arch, signed and with "
    "the ahead-of-time binaries the store keeps",
)
def export_bundle(
    device: str | None = Query(None, max_length=4096, description=DEVICE_DOC),
    snapshot: str | None = Query(None, max_length=64),
    name_host: bool = Query(False, description="record this server's host name in the provenance"),
    arch: list[int] = Query(
        [],
        max_length=MAX_ARCHES,
        description="CUDA compute capability (90: sm_90) whose kept binaries to ship; repeatable. Needs the daemon's "
        "signing_key; compiles nothing (kernels without a binary: header X-Tunerd-Clients-Compile)",
    ),
    svc: Service = Depends(service),
) -> Response:
    from tunerd.db import bundle
    from tunerd.kernels import aot

    try:
        arches = sorted({aot.check_arch(a) for a in arch})
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    fp = None if device is None else svc.resolve_device(device)
    provenance = {
        "exported_by": f"tunerd {version()} daemon",
        "server_device": svc.device.digest,
        "device_filter": None if fp is None else fp.digest,
    }
    if name_host:
        provenance["host"] = platform.node()
    headers = {"Content-Disposition": 'attachment; filename="tunerd.bundle"'}
    if not arches:
        data = bundle.bundle_bytes(svc.store, device=fp, snapshot=snapshot, provenance=provenance)
        return Response(data, media_type=BUNDLE_TYPE, headers=headers)
    if svc.settings.signing_key is None:
        raise ApiError(
            422,
            "this daemon has no signing key (TUNERD_SIGNING_KEY, an ed25519 private key file): it ships binaries only "
            "in a signed bundle, because clients refuse the binaries of an unsigned one; export without arch",
        )
    try:
        key = bundle.load_signing_key(svc.settings.signing_key)
    except bundle.BundleError as e:
        raise ApiError(503, f"this daemon's signing key cannot be used: {e}") from None
    out = bundle.stored_bundle(
        svc.store, device=fp, snapshot=snapshot, provenance=provenance, signing_key=key, arches=arches
    )
    queued = svc.worker.want_binaries(out.missing) if svc.worker is not None and out.missing else 0
    headers.update(
        {
            "X-Tunerd-Binaries": str(out.binaries),
            "X-Tunerd-Clients-Compile": str(len(out.missing)),
            "X-Tunerd-Binaries-Queued": str(queued),
        }
    )
    return Response(out.data, media_type=BUNDLE_TYPE, headers=headers)


@router.post(
    "/bundle",
    dependencies=ADMIN,
    responses=responses(ImportReport, 401, 415, 422),
    summary="Import a bundle (the bytes of `tunerd export`, application/octet-stream); all or nothing",
    openapi_extra={
        "requestBody": {"required": True, "content": {BUNDLE_TYPE: {"schema": {"type": "string", "format": "binary"}}}}
    },
)
async def import_bundle(request: Request) -> Response:
    from tunerd.db import bundle

    svc: Service = request.app.state.service
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != BUNDLE_TYPE:
        raise ApiError(415, f"POST the bundle's bytes as {BUNDLE_TYPE}, not {ctype or 'no content type'}")
    data = await request.body()
    if not data:
        raise ApiError(422, f"empty body: POST the bytes of a bundle ({BUNDLE_TYPE})")
    if data[:2] == b"\x1f\x8b":
        await run_in_threadpool(expanded_size, data, svc.settings.max_bundle_expanded_bytes)

    def run() -> dict:
        with _import_lock:
            keys = [bundle.load_trusted_key(k) for k in svc.settings.trusted_keys]
            report = bundle.import_bundle_bytes(svc.store, data, trusted_keys=keys)
        return report.to_dict()

    return json_response(await run_in_threadpool(run))
