"""Tuning jobs: queue (admin), list and read (read), cancel (admin: stops the running trial)."""

from __future__ import annotations

from typing import Any, TypedDict

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from tunerd.db.errors import InvalidRecord
from tunerd.db.fingerprint import DeviceFingerprint

from ..deps import ADMIN, READ, service
from ..errors import ApiError, json_response
from ..schemas import CancelResponse, Job, JobList, JobRequest, responses
from ..state import API, Service

router = APIRouter(prefix=API, tags=["jobs"])


class _Bounds(TypedDict):
    ge: int
    le: int
    description: str


JOB_ID = _Bounds(ge=1, le=2**63 - 1, description="a job id")


def job_json(row: Any) -> dict[str, Any]:
    """A job as the API shows it; the device it is pinned to by digest (the full key is long)."""
    d = row.to_dict()
    if row.device_key is not None:
        try:
            d["device_key"] = DeviceFingerprint.from_key(row.device_key).digest
        except InvalidRecord:  # queued through the store directly with a free-form key
            d["device_key"] = row.device_key[:200]
    return d


def _check_tuning_names(suite: str | None, strategy: str) -> None:
    """Refuse unknown suite or strategy names now rather than failing the job later."""
    from tunerd.schedules.block_suites import BLOCK_SUITES
    from tunerd.schedules.strategies import STRATEGIES
    from tunerd.schedules.suites import SUITES

    from ...tuning import BLOCK_SUITE

    known = [*SUITES, *(BLOCK_SUITE + name for name in BLOCK_SUITES)]
    if suite is not None and suite not in known:
        raise ApiError(422, f"unknown suite {suite!r}; known: {sorted(known)}")
    if strategy not in STRATEGIES:
        raise ApiError(422, f"unknown strategy {strategy!r}; known: {sorted(STRATEGIES)}")


@router.post(
    "/jobs",
    dependencies=ADMIN,
    status_code=201,
    responses=responses(Job, 401, 404, 422, status=201),
    summary="Queue tuning of specs or a suite",
)
def submit_job(req: JobRequest, svc: Service = Depends(service)) -> Response:
    if (req.specs is None) == (req.suite is None):
        raise ApiError(422, "give exactly one of specs (a list of BlockSpecs) or suite (a suite name)")
    specs = None if req.specs is None else svc.parse_specs(req.specs, svc.settings.max_specs_per_job)
    _check_tuning_names(req.suite, req.strategy)
    device_key = None if req.device is None else svc.resolve_device(req.device, known_only=False).key
    job_id = svc.store.enqueue_job(
        specs=specs,
        suite=req.suite,
        strategy=req.strategy,
        budget_trials=req.budget_trials,
        budget_seconds=req.budget_seconds,
        device_key=device_key,
    )
    return json_response(job_json(svc.store.job(job_id)), 201, {"Location": f"{API}/jobs/{job_id}"})


@router.get(
    "/jobs/{job_id}",
    dependencies=READ,
    responses=responses(Job, 401, 404, 422),
    summary="One job: status, progress, result",
)
def get_job(job_id: int = Path(..., **JOB_ID), svc: Service = Depends(service)) -> Response:
    row = svc.store.job(job_id)
    if row is None:
        raise ApiError(404, f"no job {job_id}")
    return json_response(job_json(row))


@router.get("/jobs", dependencies=READ, responses=responses(JobList, 401, 422), summary="Recent jobs, newest first")
def list_jobs(
    limit: int = Query(50, ge=1, le=1000),
    status: str | None = Query(None, pattern="^(queued|running|done|failed)$"),
    svc: Service = Depends(service),
) -> Response:
    return json_response(
        {
            "jobs": [job_json(r) for r in svc.store.jobs(limit, status=status)],
            "queue_depth": svc.store.queue_depth(),
            "queued_tasks": svc.store.queued_tasks(),
        }
    )


@router.delete(
    "/jobs/{job_id}",
    dependencies=ADMIN,
    responses=responses(CancelResponse, 401, 404, 422),
    summary="Cancel a queued or running job (a running trial on this daemon is stopped at once)",
)
def cancel_job(job_id: int = Path(..., **JOB_ID), svc: Service = Depends(service)) -> Response:
    cancelled = svc.store.cancel_job(job_id)
    stopped = bool(cancelled and svc.worker is not None and svc.worker.cancel(job_id))
    return json_response(
        {"id": job_id, "cancelled": cancelled, "stopped_running_trial": stopped, "job": job_json(svc.store.job(job_id))}
    )
