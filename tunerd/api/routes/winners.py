"""What the store holds: devices, winners and fused block winners (read)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from tunerd.db.rows import BlockWinnerRow

from ..deps import READ, service
from ..errors import json_response
from ..schemas import DEVICE_DOC, Devices, Winners, responses
from ..state import API, Service

router = APIRouter(prefix=API, tags=["winners"])


def winner_json(row: Any, include_source: bool) -> dict[str, Any]:
    d = row.to_dict()
    d["device"] = row.device.digest
    d["device_description"] = row.device.describe()
    d["spec_digest"] = row.spec.digest
    d["spec_description"] = row.spec.describe()
    if not include_source:
        del d["source"]
    return d


@router.get(
    "/devices", dependencies=READ, responses=responses(Devices, 401), summary="Devices with trials, winners, misses"
)
def devices(svc: Service = Depends(service)) -> Response:
    rows = [{**r.to_dict(), "description": r.fingerprint.describe()} for r in svc.store.devices()]
    return json_response({"devices": rows, "this_device": svc.device.digest})


@router.get(
    "/winners", dependencies=READ, responses=responses(Winners, 401, 404, 422), summary="Winners, optionally per device"
)
def winners(
    device: str | None = Query(None, max_length=4096, description=DEVICE_DOC),
    snapshot: str | None = Query(None, max_length=64),
    include_source: bool = False,
    svc: Service = Depends(service),
) -> Response:
    fp = None if device is None else svc.resolve_device(device)
    rows = svc.store.winners(fp, snapshot=snapshot)
    blocks = [block_winner_json(b) for b in svc.store.block_winners(fp, snapshot=snapshot)]
    return json_response(
        {"winners": [winner_json(r, include_source) for r in rows], "block_winners": blocks, "snapshot": snapshot}
    )


def block_winner_json(row: BlockWinnerRow) -> dict[str, Any]:
    """A block winner (plan and schedules, no source) as the winners route lists it."""
    d = row.to_dict()
    d["device"] = row.device.digest
    d["device_description"] = row.device.describe()
    d["block_digest"] = row.block.digest
    d["description"] = row.describe()
    d["plan_description"] = row.plan.describe()
    return d
