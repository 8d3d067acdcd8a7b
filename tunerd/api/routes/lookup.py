"""POST /v1/lookup: tuned kernels for one or many specs (and fused blocks) on a device; GET /v1/limits: the
work limits."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tunerd.kernels.block import Block
from tunerd.kernels.spec import BlockSpec

from ..deps import READ, service
from ..errors import json_response
from ..schemas import LookupRequest, LookupResponse, responses
from ..state import API, Service

router = APIRouter(prefix=API, tags=["lookup"])
INLINE_SPECS = 16  # a lookup this small whose answers are all in memory is answered on the event loop


class ParsedSpecs:
    """Validated BlockSpecs and Blocks by their request JSON, the most recent `size` kept: a training job asks for the
    same few specs again and again, and parsing plus limit checks cost more than answering a cached hit."""

    def __init__(self, svc: Service, size: int = 4096) -> None:
        self.svc = svc
        self.size = size
        self._specs: OrderedDict[bytes, list[BlockSpec | Block]] = OrderedDict()
        self._lock = threading.Lock()  # the thread-pool path reads it too

    def get(self, items: list[Any]) -> list[BlockSpec | Block]:
        """svc.parse_lookup(items) (the same 422s), remembered for valid specs."""
        try:
            key = orjson.dumps(items, option=orjson.OPT_SORT_KEYS)
        except (orjson.JSONEncodeError, TypeError):  # e.g. an integer beyond 64 bits: parse_lookup says why
            return self.svc.parse_lookup(items, self.svc.settings.max_specs_per_lookup)
        with self._lock:
            specs = self._specs.get(key)
            if specs is not None:
                self._specs.move_to_end(key)
                return specs
        specs = self.svc.parse_lookup(items, self.svc.settings.max_specs_per_lookup)
        with self._lock:
            self._specs[key] = specs
            if len(self._specs) > self.size:
                self._specs.popitem(last=False)
        return specs


@router.post(
    "/lookup",
    dependencies=READ,
    responses=responses(LookupResponse, 401, 404, 422),
    summary="Tuned kernels for one or many specs or fused blocks on a device (per item: hit or miss)",
)
async def lookup(req: LookupRequest, request: Request) -> Response:
    svc: Service = request.app.state.service
    parsed: ParsedSpecs = request.app.state.parsed_specs
    if len(req.specs) <= INLINE_SPECS:  # the hot path: cached hits, no thread hop
        answer = svc.cached_lookup(parsed.get(req.specs), req.device, req.snapshot)
        if answer is not None:  # plain data built by the service: orjson encodes it in microseconds
            return Response(orjson.dumps(answer), media_type="application/json")
    return json_response(await run_in_threadpool(_lookup, svc, parsed, req))


def _lookup(svc: Service, parsed: ParsedSpecs, req: LookupRequest) -> dict:
    if len(req.specs) <= INLINE_SPECS:
        specs = parsed.get(req.specs)
    else:  # a whole model's specs: parsed once, not worth remembering
        specs = svc.parse_lookup(req.specs, svc.settings.max_specs_per_lookup)
    return svc.lookup(specs, svc.resolve_device(req.device), req.snapshot)


@router.get(
    "/limits",
    dependencies=READ,
    responses=responses(None, 401),
    summary="The work limits a spec must be within (kernels.limits.Limits) and the request limits",
)
def work_limits(svc: Service = Depends(service)) -> Response:
    s = svc.settings
    return json_response(
        {
            "spec": svc.limits.to_dict(),
            "max_specs_per_lookup": s.max_specs_per_lookup,
            "max_specs_per_job": s.max_specs_per_job,
            "max_body_bytes": s.max_body_bytes,
            "max_bundle_bytes": s.max_bundle_bytes,
            "max_bundle_expanded_bytes": s.max_bundle_expanded_bytes,
        }
    )
