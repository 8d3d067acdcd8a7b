"""Operations: /healthz (open, minimal; details with read access), /metrics and the dashboard (read)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ...dashboard import render_dashboard, version
from ..deps import READ, can_read, service
from ..errors import RETRY_AFTER_S, json_response
from ..schemas import Health, responses
from ..state import Service

router = APIRouter(tags=["ops"])


@router.get(
    "/healthz",
    responses=responses(Health),
    summary="Health: 200 when the store has this tunerd's schema, is the file it opened and takes "
    "writes; else 503 saying what is wrong (details need read access)",
)
def healthz(request: Request, svc: Service = Depends(service)) -> Response:
    problem = svc.store_problem()
    body: dict[str, Any] = {"status": "ok" if problem is None else "degraded", "db": problem or "ok"}
    if can_read(request):
        body.update(
            version=version(),
            device=svc.device.describe(),
            worker=svc.worker.status() if svc.worker is not None else None,
        )
    elif problem is not None:
        body["db"] = "unavailable (details need read access)"
    if problem is not None:
        return json_response(body, 503, {"Retry-After": str(RETRY_AFTER_S)})
    return json_response(body)


@router.get(
    "/metrics", dependencies=READ, response_class=Response, responses=responses(None, 401), summary="Prometheus metrics"
)
def metrics(svc: Service = Depends(service)) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, dependencies=READ, include_in_schema=False)
def dashboard(svc: Service = Depends(service)) -> HTMLResponse:
    html, status = render_dashboard(svc)
    return HTMLResponse(html, status_code=status)
