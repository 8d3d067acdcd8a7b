"""Request and response bodies of the API, as the OpenAPI schema documents them.

Routes build their JSON directly (cheap on the lookup hot path); the response models here are what
that JSON is, and the error models are the bodies the error handlers and middleware really send.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from tunerd.kernels import limits
from tunerd.kernels.block import ATTRS as BLOCK_OPS
from tunerd.kernels.spec import ACTIVATIONS, DTYPES, KINDS, OPS, PRECISIONS
from tunerd.kernels.trust import MAX_BLOCK_NODES
from tunerd.schedules.strategies import DEFAULT as DEFAULT_STRATEGY

DeviceRef = str | dict[str, Any]
DEVICE_DOC = (
    "a device fingerprint object (db.fingerprint.DeviceFingerprint.to_dict()), its key (canonical JSON) "
    "or its 16-hex digest; omitted: this daemon's own device"
)
SPEC_DOC = (
    "BlockSpec objects (BlockSpec.to_dict()); each must be within the server's work limits (tensor elements, "
    "taps, stride, estimated measurement memory: see GET /v1/limits) or the request is refused with 422"
)


def _dims(maximum: int | None = None, minimum: int = 1) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        item["maximum"] = maximum
    return {"type": "array", "items": item, "minItems": 1, "maxItems": 3}


_L = limits.DEFAULT
SPEC_SCHEMA: dict[str, Any] = {  # kernels.spec.BlockSpec.to_dict(), with the default work limits
    "type": "object",
    "additionalProperties": False,
    "title": "BlockSpec",
    "required": ["kind", "n", "c", "k", "in_size", "kernel", "stride", "padding", "dilation"],
    "description": "Rules JSON Schema cannot state are checked too and refused with 422: c and k divisible by "
    "groups, depthwise needs groups == c, every list has the same length (1-3 spatial dims), the "
    "kernel extent fits the padded input, and the work limits of GET /v1/limits (tensor "
    "elements, taps, stride, estimated measurement memory).",
    "properties": {
        "kind": {"enum": list(KINDS)},
        "op": {"enum": list(OPS), "default": "fwd"},
        "n": {"type": "integer", "minimum": 1},
        "c": {"type": "integer", "minimum": 1},
        "k": {"type": "integer", "minimum": 1},
        "groups": {"type": "integer", "minimum": 1, "default": 1},
        "in_size": _dims(),
        "kernel": _dims(),
        "stride": _dims(_L.max_stride),
        "dilation": _dims(_L.max_dilation),
        "padding": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "description": "(low, high) per spatial dim",
            "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2},
        },
        "dtype": {"enum": list(DTYPES), "default": "float32"},
        "layout": {"enum": ["channels_last"], "default": "channels_last"},
        "precision": {"enum": list(PRECISIONS), "default": "ieee"},
        "epilogue": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "bias": {"type": "boolean"},
                "affine": {"type": "boolean"},
                "layer_scale": {"type": "boolean"},
                "stats": {"type": "boolean"},
                "save_z": {"type": "boolean", "description": "forward specs only"},
                "activation": {"enum": [*ACTIVATIONS, None]},
                "residual": {"enum": ["pre", "post", None]},
            },
        },
    },
}
SpecBody = Annotated[dict[str, Any], WithJsonSchema(SPEC_SCHEMA)]  # parsed by BlockSpec.from_dict (its errors)
BLOCK_SCHEMA: dict[str, Any] = {  # kernels.block.Block.to_dict(), bounded by kernels.trust.check_block
    "type": "object",
    "additionalProperties": False,
    "title": "Block",
    "required": ["kind", "n", "c", "in_size", "nodes"],
    "description": "A fused block (kernels.block.Block.to_dict()): a graph of conv, norm, activation, gate, scale, "
    "residual and split/concat nodes. Graph rules (inputs name earlier nodes, shapes agree, every node but the last "
    f"is used) and the work limits (at most {MAX_BLOCK_NODES} nodes, every conv within GET /v1/limits) are checked "
    "too and refused with 422.",
    "properties": {
        "kind": {"const": "block"},
        "n": {"type": "integer", "minimum": 1},
        "c": {"type": "integer", "minimum": 1},
        "in_size": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "dtype": {"enum": list(DTYPES), "default": "float32"},
        "nodes": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_BLOCK_NODES,
            "items": {
                "type": "object",
                "required": ["name", "op", "inputs"],
                "description": "name, op, inputs (earlier node names or 'x') and the op's attributes",
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9_]+$"},
                    "op": {"enum": sorted(BLOCK_OPS)},
                    "inputs": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
LookupItem = Annotated[  # parsed by Service.parse_lookup: kind 'block' is a Block, anything else a BlockSpec
    dict[str, Any], WithJsonSchema({"anyOf": [SPEC_SCHEMA, BLOCK_SCHEMA], "title": "BlockSpec or Block"})
]
LOOKUP_DOC = (
    SPEC_DOC + "; or fused blocks (kind 'block', kernels.block.Block.to_dict()), answered with their winning plan "
    "and one schedule per fused step (no source: the client renders them)"
)


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    specs: list[LookupItem] = Field(..., min_length=1, description=LOOKUP_DOC)
    device: DeviceRef | None = Field(None, description=DEVICE_DOC)
    snapshot: str | None = Field(None, max_length=64, description="answer from this snapshot's pinned winners")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    specs: list[SpecBody] | None = Field(None, min_length=1, description="BlockSpecs to tune. " + SPEC_DOC)
    suite: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="a named shape suite to tune, or blocks:<name> for a block suite's fused blocks (plan x schedule)",
    )
    strategy: str = Field(DEFAULT_STRATEGY, min_length=1, max_length=64)
    budget_trials: int | None = Field(None, ge=1, le=1_000_000)
    budget_seconds: float | None = Field(
        None, gt=0, le=30 * 86400, description="wall time per spec; the trial running when it ends is stopped"
    )
    device: DeviceRef | None = Field(
        None, description="only workers on this device may run the job; omitted: any worker"
    )


class SnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="default: generated from the time",
    )


class Launch(BaseModel):
    kernel_name: str | None = Field(None, description="the @triton.jit function in source")
    grid: list[int] | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    error: str | None = None


class LookupResult(BaseModel):
    index: int = Field(..., description="position of the spec (or block) in the request")
    hit: bool
    spec: dict[str, Any] | None = Field(None, description="a spec's result: the spec")
    spec_digest: str | None = None
    block: dict[str, Any] | None = Field(None, description="a fused block's result: the block")
    block_digest: str | None = None
    plan: dict[str, Any] | None = Field(None, description="block hit: the winning plan (kernels.plan.Plan)")
    plan_description: str | None = None
    schedules: dict[str, dict[str, Any]] | None = Field(
        None, description="block hit: one Schedule per fused step of the plan, keyed by step index"
    )
    plan_id: str | None = Field(None, description="block hit: hash of the plan and of its kernels' sources")
    schedule: dict[str, Any] | None = Field(None, description="hit: the winning Schedule")
    variant_id: str | None = Field(None, description="hit: sha256(source)[:24]")
    source: str | None = Field(None, description="hit: the exact Triton source that was measured")
    launch: Launch | None = None
    timings: dict[str, Any] | None = Field(None, description="hit: median_ms, spread_ms, reps")
    numerics: dict[str, Any] | None = Field(None, description="hit: max_error vs the torch reference")
    speedup_vs_default: float | None = None
    fraction_of_roofline: float | None = None
    provenance: dict[str, Any] | None = Field(None, description="hit: device, strategy, time, job, origin")
    misses: int | None = Field(None, description="miss: lookups of this spec on this device so far")
    tuning: bool | None = Field(None, description="miss: whether this daemon's idle worker will tune it")
    stale: bool | None = Field(
        None, description="measured before an upgrade of the device's software stack; being re-validated"
    )
    borrowed: bool | None = Field(
        None,
        description="miss near a tuned shape: schedule, source and launch are the nearest winner's "
        "schedule rendered for this spec (verify before launching); the miss is counted and tuned",
    )
    borrowed_from: dict[str, Any] | None = Field(None, description="borrowed: the tuned spec, its variant and timings")


class LookupResponse(BaseModel):
    device: str = Field(..., description="digest of the device answered for")
    snapshot: str | None = None
    hits: int
    misses: int
    results: list[LookupResult]


class Job(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    status: str = Field(..., description="queued | running | done | failed")
    strategy: str
    specs: list[dict[str, Any]] | None = None
    suite: str | None = None
    device_key: str | None = Field(None, description="digest of the device the job is pinned to")
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class JobList(BaseModel):
    jobs: list[Job]
    queue_depth: int  # queued jobs
    queued_tasks: int  # queued tasks of jobs already fanned out (one per spec or block)


class CancelResponse(BaseModel):
    id: int
    cancelled: bool = Field(..., description="false when the job had already finished")
    stopped_running_trial: bool = Field(False, description="this daemon's worker was running it and was stopped")
    job: Job


class Winners(BaseModel):
    winners: list[dict[str, Any]]
    block_winners: list[dict[str, Any]] = Field(
        default_factory=list, description="fused block winners: plan and one schedule per fused step, no source"
    )
    snapshot: str | None = None


class Devices(BaseModel):
    devices: list[dict[str, Any]]
    this_device: str


class Snapshot(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class Snapshots(BaseModel):
    snapshots: list[Snapshot]


class ImportReport(BaseModel):
    model_config = ConfigDict(extra="allow")
    sha256: str
    winners: int
    added: int
    replaced: int
    kept: int
    unchanged: int


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str = Field(..., description="ok, or degraded (then the status code is 503)")
    db: str = Field(..., description="ok, or what is wrong with the store")


# ---- error bodies ------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    detail: Any = Field(..., description="what is wrong, in words")


class ValidationIssue(BaseModel):
    loc: list[str]
    msg: str
    type: str


class SpecIssue(BaseModel):
    index: int
    error: str


class ValidationErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    detail: str = Field(..., description="the first problem, in words")
    errors: list[ValidationIssue | SpecIssue] | None = Field(
        None, description="every problem: request fields (loc, msg, type) or specs (index, error)"
    )


class UnknownDeviceBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    detail: str
    hint: str | None = None
    known_devices: list[dict[str, Any]] | None = None


class StoreErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    detail: str
    error: str | None = Field(None, description="the store error class, e.g. StoreUnavailable")


_ERRORS: dict[int, tuple[type[BaseModel], str]] = {
    401: (ErrorBody, "missing or wrong bearer token (WWW-Authenticate: Bearer)"),
    403: (ErrorBody, "the Host or Origin header is not allowed, or the token does not allow this route"),
    404: (UnknownDeviceBody, "unknown device (with the known ones), job or snapshot"),
    408: (ErrorBody, "the request body arrived too slowly"),
    409: (ErrorBody, "the name is taken"),
    413: (ErrorBody, "the body is over the size limit"),
    415: (ErrorBody, "wrong Content-Type"),
    422: (ValidationErrorBody, "malformed request or spec, a spec over the work limits, JSON nested too deeply"),
    503: (
        StoreErrorBody,
        "the database is down, locked, read-only, damaged or full, or the server is saturated "
        "(Retry-After says when to retry)",
    ),
}


def responses(model: type[BaseModel] | None, *codes: int, status: int = 200) -> dict[Any, Any]:
    """OpenAPI `responses` for a route: its success model and the error bodies it can send. 403 (Host/Origin),
    413 and 503 (saturation) can come from any route."""
    out: dict[Any, Any] = {status: {"model": model}} if model is not None else {}
    for code in sorted({*codes, 403, 413, 503}):
        m, why = _ERRORS[code]
        out[code] = {"model": m, "description": why}
    return out
