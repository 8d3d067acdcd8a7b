"""The job queue: tuning jobs queued, claimed by exactly one worker, heartbeated, requeued, cancelled.

A mixin of db.store.Store (it shares the store's transactions): PostgreSQL hands each job to one
worker with SELECT ... FOR UPDATE SKIP LOCKED; SQLite claims inside BEGIN IMMEDIATE. A worker
that stops heartbeating loses its job to the next worker that looks (requeue_stale); a job whose
workers keep dying is failed after max_attempts claims.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from datetime import timedelta
from numbers import Integral
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from tunerd.kernels.spec import BlockSpec

from .errors import InvalidRecord, JobNotOwned, UnknownJob
from .rows import JobRow, json_object, label, number, row_limit, spec_of
from .tables import JOB_STATUSES, JobTable, utcnow


class JobQueue:
    """Queue operations; the class using it provides the read and write transactions."""

    def _read(self) -> AbstractContextManager[Session]:  # pragma: no cover - provided by Store
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Session]:  # pragma: no cover - provided by Store
        raise NotImplementedError

    def enqueue_job(
        self,
        *,
        specs: list[BlockSpec] | None = None,
        suite: str | None = None,
        strategy: str = "model",  # schedules.strategies.DEFAULT (db does not import schedules)
        budget_trials: int | None = None,
        budget_seconds: float | None = None,
        device_key: str | None = None,
    ) -> int:
        """Queue a tuning job over specs or a named suite (exactly one); returns its id."""
        if (specs is None) == (suite is None):
            raise InvalidRecord("a job needs exactly one of specs (a list of BlockSpec) or suite (a name)")
        if specs is not None:
            if not isinstance(specs, (list, tuple)) or not specs:
                raise InvalidRecord("specs must be a non-empty list of BlockSpec")
            for sp in specs:
                if not isinstance(sp, BlockSpec):
                    raise InvalidRecord(f"each of specs must be a BlockSpec, got {type(sp).__name__}")
        if budget_trials is not None:
            if not isinstance(budget_trials, Integral) or isinstance(budget_trials, bool) or budget_trials < 1:
                raise InvalidRecord(f"budget_trials must be a positive int or None, got {budget_trials!r}")
            budget_trials = int(budget_trials)
        job = JobTable(
            specs=None if specs is None else json.dumps([sp.to_dict() for sp in specs], sort_keys=True),
            suite=label("suite", suite, 100),
            strategy=label("strategy", strategy, 64, optional=False),
            budget_trials=budget_trials,
            budget_seconds=number("budget_seconds", budget_seconds, positive=True),
            device_key=label("device_key", device_key, 10_000),
            status="queued",
            attempts=0,
            created_at=utcnow(),
        )
        with self._write() as s:
            s.add(job)
            s.flush()
            return job.id

    def claim_job(self, worker_id: str, *, device_key: str | None = None) -> JobRow | None:
        """Take the oldest queued job (for device_key, or any device when a job names none).

        PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED; SQLite: inside BEGIN IMMEDIATE. Either way
        two workers never get the same job."""
        worker_id = label("worker_id", worker_id, 200, optional=False)
        with self._write() as s:
            q = select(JobTable).where(JobTable.status == "queued")
            if device_key is not None:
                q = q.where(or_(JobTable.device_key.is_(None), JobTable.device_key == device_key))
            job = s.scalars(q.order_by(JobTable.id).limit(1).with_for_update(skip_locked=True)).first()
            if job is None:
                return None
            now = utcnow()
            job.status, job.worker_id, job.claimed_at, job.heartbeat_at = "running", worker_id, now, now
            job.attempts += 1
            s.flush()
            return job_row(job)

    def heartbeat(self, job_id: int, worker_id: str, progress: dict) -> None:
        """Report progress; raises JobNotOwned if the job was requeued, cancelled or finished meanwhile."""
        self._owned_update(job_id, worker_id, heartbeat_at=utcnow(), progress=json_object("progress", progress))

    def finish_job(self, job_id: int, worker_id: str, *, result: dict | None = None, error: str | None = None) -> None:
        """Mark the job done (or failed when error is given) with its result."""
        if error is not None and not isinstance(error, str):
            raise InvalidRecord(f"error must be a string or None, got {type(error).__name__}")
        now = utcnow()
        self._owned_update(
            job_id,
            worker_id,
            status="failed" if error is not None else "done",
            finished_at=now,
            heartbeat_at=now,
            result=json_object("result", result),
            error=error,
        )

    def _owned_update(self, job_id: int, worker_id: str, **values: Any) -> None:
        with self._write() as s:
            n = s.execute(
                update(JobTable)
                .where(JobTable.id == job_id, JobTable.worker_id == worker_id, JobTable.status == "running")
                .values(**values)
                .execution_options(synchronize_session=False)
            ).rowcount
            if n == 1:
                return
            job = s.get(JobTable, job_id)
            if job is None:
                raise UnknownJob(f"no job {job_id}")
            raise JobNotOwned(
                f"worker {worker_id!r} does not hold job {job_id}: it is {job.status}"
                + (f" (held by {job.worker_id!r})" if job.status == "running" else "")
                + (f", error: {job.error}" if job.error else "")
            )

    def requeue_stale(self, timeout_s: float, *, max_attempts: int | None = None) -> int:
        """Running jobs whose worker has not heartbeated for timeout_s go back to the queue; returns
        how many. With max_attempts, a job already claimed that many times fails instead."""
        timeout = number("timeout_s", timeout_s, optional=False)
        now = utcnow()
        stale = and_(
            JobTable.status == "running",
            func.coalesce(JobTable.heartbeat_at, JobTable.claimed_at) < now - timedelta(seconds=timeout),
        )
        with self._write() as s:
            if max_attempts is not None:
                s.execute(
                    update(JobTable)
                    .where(stale, JobTable.attempts >= max_attempts)
                    .values(
                        status="failed",
                        finished_at=now,
                        error=f"abandoned: its worker stopped heartbeating for {timeout:g}s on each of "
                        f"{max_attempts} attempts",
                    )
                    .execution_options(synchronize_session=False)
                )
            return s.execute(
                update(JobTable)
                .where(stale)
                .values(status="queued", worker_id=None)
                .execution_options(synchronize_session=False)
            ).rowcount

    def cancel_job(self, job_id: int) -> bool:
        """Fail a queued or running job with error 'cancelled' (its worker's next heartbeat raises
        JobNotOwned); False when it had already finished."""
        with self._write() as s:
            job = s.get(JobTable, job_id, with_for_update=True)
            if job is None:
                raise UnknownJob(f"no job {job_id}")
            if job.status in ("done", "failed"):
                return False
            job.status, job.error, job.finished_at = "failed", "cancelled", utcnow()
            return True

    def job(self, job_id: int) -> JobRow | None:
        with self._read() as s:
            job = s.get(JobTable, job_id)
            return None if job is None else job_row(job)

    def jobs(self, limit: int = 100, *, status: str | None = None) -> list[JobRow]:
        """Newest first."""
        if status is not None and status not in JOB_STATUSES:
            raise InvalidRecord(f"job status must be one of {JOB_STATUSES}, got {status!r}")
        with self._read() as s:
            q = select(JobTable) if status is None else select(JobTable).where(JobTable.status == status)
            return [job_row(j) for j in s.scalars(q.order_by(JobTable.id.desc()).limit(row_limit(limit)))]

    def queue_depth(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(JobTable).where(JobTable.status == "queued"))


def job_row(j: JobTable) -> JobRow:
    specs = (
        None
        if j.specs is None
        else tuple(spec_of(json.dumps(d, sort_keys=True, separators=(",", ":"))) for d in json.loads(j.specs))
    )
    return JobRow(
        id=j.id,
        status=j.status,
        strategy=j.strategy,
        specs=specs,
        suite=j.suite,
        budget_trials=j.budget_trials,
        budget_seconds=j.budget_seconds,
        device_key=j.device_key,
        progress=None if j.progress is None else json.loads(j.progress),
        worker_id=j.worker_id,
        attempts=j.attempts,
        created_at=j.created_at,
        claimed_at=j.claimed_at,
        heartbeat_at=j.heartbeat_at,
        finished_at=j.finished_at,
        result=None if j.result is None else json.loads(j.result),
        error=j.error,
    )
