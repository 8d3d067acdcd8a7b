"""Snapshots: pin the current winners under a name (admin); list them (read)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ..deps import ADMIN, READ, service
from ..errors import json_response
from ..schemas import Snapshot, SnapshotRequest, Snapshots, responses
from ..state import API, Service

router = APIRouter(prefix=API, tags=["snapshots"])


@router.post(
    "/snapshots",
    dependencies=ADMIN,
    status_code=201,
    responses=responses(Snapshot, 401, 409, 422, status=201),
    summary="Pin the current winners under a name; lookups naming it never change",
)
def create_snapshot(req: SnapshotRequest | None = None, svc: Service = Depends(service)) -> Response:
    name = svc.store.create_snapshot(req.name if req is not None else None)
    row = next((s for s in svc.store.snapshots() if s.name == name), None)
    return json_response(
        row.to_dict() if row is not None else {"name": name}, 201, {"Location": f"{API}/snapshots/{name}"}
    )


@router.get("/snapshots", dependencies=READ, responses=responses(Snapshots, 401), summary="Every snapshot")
def list_snapshots(svc: Service = Depends(service)) -> Response:
    return json_response({"snapshots": [s.to_dict() for s in svc.store.snapshots()]})
