"""The API's errors: every failure is a JSON body {"detail": message, ...} with a specific status.

Store errors map to statuses here (503 when the database is down, damaged, read-only or full, with
Retry-After); request validation, over-deep JSON and over-limit specs are 422; the server never
answers a plain-text 500 for a request it could describe.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunerd.db.errors import (
    BundleError,
    InvalidRecord,
    SchemaError,
    SnapshotExists,
    StoreError,
    StoreUnavailable,
    UnknownJob,
    UnknownSnapshot,
)

log = logging.getLogger("tunerd.api")
RETRY_AFTER_S = 5


class ApiError(StarletteHTTPException):
    """An HTTP error whose JSON body is {"detail": message, **extra}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.extra = extra


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds this server's limit of {limit} bytes", limit=limit)


_STORE_ERRORS: list[tuple[type, int]] = [  # most specific first
    (StoreUnavailable, 503),
    (UnknownSnapshot, 404),
    (UnknownJob, 404),
    (SnapshotExists, 409),
    (BundleError, 422),
    (InvalidRecord, 422),
    (SchemaError, 503),
    (StoreError, 500),
]


def status_of(e: StoreError) -> int:
    return next(code for cls, code in _STORE_ERRORS if isinstance(e, cls))


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def store_error_response(e: StoreError) -> Response:
    status = status_of(e)
    if status >= 500:
        log.warning("store error (%s): %s", type(e).__name__, e)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return json_response({"detail": str(e), "error": type(e).__name__}, status, headers)


def install(app: FastAPI) -> None:
    """Register the JSON error handlers on app."""

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, e: StoreError) -> Response:
        return store_error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 400 and e.__cause__ is not None:  # FastAPI could not parse the body
            why = (
                "nested too deeply"
                if isinstance(e.__cause__, RecursionError)
                else f"not valid JSON ({type(e.__cause__).__name__})"
            )
            return json_response({"detail": f"the request body is {why}"}, 422)
        return json_response(
            {"detail": e.detail, **getattr(e, "extra", {})}, e.status_code, getattr(e, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError) -> Response:
        errors = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg")), "type": str(err.get("type"))}
            for err in e.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"])
        return json_response({"detail": f"{where}: {first['msg']}" if where else first["msg"], "errors": errors}, 422)

    @app.exception_handler(RecursionError)
    async def _too_deep(_request: Request, _e: RecursionError) -> Response:
        return json_response({"detail": "the request is nested too deeply"}, 422)
