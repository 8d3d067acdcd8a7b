"""The job queue: tuning jobs queued, fanned out into tasks, claimed by exactly one worker each,
heartbeated, requeued, cancelled.

A mixin of db.store.Store (it shares the store's transactions). A worker's claim_task takes the next
queued task of a running job or, when there is none, claims the oldest queued job and fans it out
into one task per spec in the same transaction, so the workers of a fleet tune one suite side by
side. PostgreSQL hands each task (and job) to one worker with SELECT ... FOR UPDATE SKIP LOCKED;
SQLite claims inside BEGIN IMMEDIATE. A worker that stops heartbeating loses its task (or a job it
claimed whole with claim_job) to the next worker that looks (requeue_stale); one whose workers keep
dying is failed after max_attempts claims. A job is done when all its tasks are: its result merges
theirs (merge_results) and its progress counts them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from numbers import Integral, Real
from typing import Any, cast

from sqlalchemy import CursorResult, Result, and_, func, or_, select, update
from sqlalchemy.orm import Session

from tunerd.kernels.block import Block
from tunerd.kernels.spec import BlockSpec

from .engine import Transactional
from .errors import InvalidRecord, JobNotOwned, UnknownJob
from .rows import JobRow, TaskRow, json_object, label, number, row_limit, target_of
from .tables import JOB_STATUSES, JobTable, TaskTable, utcnow

FINISHED = ("done", "failed")
# expand(job) -> the specs (or fused blocks) a job names (tunerd.tuning.job_specs: db does not import the suites)
Expand = Callable[[JobRow], Sequence[BlockSpec | Block]]


class JobQueue(Transactional):
    """Queue operations; the class using it provides the read and write transactions."""

    def enqueue_job(
        self,
        *,
        specs: list[BlockSpec | Block] | None = None,
        suite: str | None = None,
        strategy: str = "model",  # schedules.strategies.DEFAULT (db does not import schedules)
        budget_trials: int | None = None,
        budget_seconds: float | None = None,
        device_key: str | None = None,
    ) -> int:
        """Queue a tuning job over specs (single convs and/or fused blocks) or a named suite (exactly one);
        returns its id."""
        if (specs is None) == (suite is None):
            raise InvalidRecord("a job needs exactly one of specs (a list of BlockSpec or Block) or suite (a name)")
        if specs is not None:
            if not isinstance(specs, (list, tuple)) or not specs:
                raise InvalidRecord("specs must be a non-empty list of BlockSpec or Block")
            for sp in specs:
                if not isinstance(sp, (BlockSpec, Block)):
                    raise InvalidRecord(f"each of specs must be a BlockSpec or Block, got {type(sp).__name__}")
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
            job = _next_job(s, device_key)
            if job is None:
                return None
            _take(job, worker_id)
            s.flush()
            return job_row(job)

    def claim_task(self, worker_id: str, *, expand: Expand, device_key: str | None = None) -> TaskRow | None:
        """Take the next queued task of a running job (for device_key, or any device when a job names none);
        when there is none, claim the oldest queued job, fan it out into one task per spec of expand(job) and
        take its first. Each in one transaction: no task runs twice, no job fans out twice.

        A job expand refuses (raises) is failed with the reason and the next one is tried."""
        worker_id = label("worker_id", worker_id, 200, optional=False)
        while True:
            with self._write() as s:
                task = _next_task(s, device_key)
                job = None if task is None else s.get(JobTable, task.job_id)
                if task is None:
                    job = _next_job(s, device_key)
                    if job is None:
                        return None
                    task = _fan_out(s, job, expand)
                    if task is None:
                        continue  # committed as failed
                assert job is not None
                _take(task, worker_id)
                s.flush()
                return task_row(task, job_row(job))

    def heartbeat_task(self, task_id: int, worker_id: str, progress: dict) -> None:
        """Report a task's progress; raises JobNotOwned if it was requeued, cancelled or finished meanwhile."""
        self._owned_update(
            task_id, worker_id, table=TaskTable, heartbeat_at=utcnow(), progress=json_object("progress", progress)
        )

    def finish_task(
        self, task_id: int, worker_id: str, *, result: dict | None = None, error: str | None = None
    ) -> JobRow | None:
        """Mark the task done (or failed when error is given); when it was its job's last, the job settles:
        returns the finished job, else None."""
        if error is not None and not isinstance(error, str):
            raise InvalidRecord(f"error must be a string or None, got {type(error).__name__}")
        now = utcnow()
        with self._write() as s:
            self._owned_update(
                task_id,
                worker_id,
                table=TaskTable,
                session=s,
                status="failed" if error is not None else "done",
                finished_at=now,
                heartbeat_at=now,
                result=json_object("result", result),
                error=error,
            )
            job_id = s.scalar(select(TaskTable.job_id).where(TaskTable.id == task_id))
            if job_id is None:
                raise UnknownJob(f"no task {task_id}")
            job = _settle(s, job_id)
            return None if job is None else job_row(job, _tasks_of(s, [job.id]).get(job.id))

    def job_tasks(self, job_id: int) -> list[TaskRow]:
        """The tasks a job fanned out into, in spec order (empty while it has not)."""
        with self._read() as s:
            job = s.get(JobTable, job_id)
            if job is None:
                raise UnknownJob(f"no job {job_id}")
            view = job_row(job)
            tasks = s.scalars(select(TaskTable).where(TaskTable.job_id == job_id).order_by(TaskTable.position))
            return [task_row(t, view) for t in tasks]

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

    def _owned_update(
        self,
        row_id: int,
        worker_id: str,
        *,
        table: type[JobTable] | type[TaskTable] = JobTable,
        session: Session | None = None,
        **values: Any,
    ) -> None:
        """Update a job (or task) only while worker_id holds it; JobNotOwned (UnknownJob) otherwise."""
        if session is None:
            with self._write() as s:
                return self._owned_update(row_id, worker_id, table=table, session=s, **values)
        s = session
        n = rowcount(
            s.execute(
                update(table)
                .where(table.id == row_id, table.worker_id == worker_id, table.status == "running")
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        )
        if n == 1:
            return None
        row = s.get(JobTable, row_id) if table is JobTable else s.get(TaskTable, row_id)
        what = "job" if table is JobTable else "task"
        if row is None:
            raise UnknownJob(f"no {what} {row_id}")
        raise JobNotOwned(
            f"worker {worker_id!r} does not hold {what} {row_id}: it is {row.status}"
            + (f" (held by {row.worker_id!r})" if row.status == "running" else "")
            + (f", error: {row.error}" if row.error else "")
        )

    def requeue_stale(self, timeout_s: float, *, max_attempts: int | None = None) -> int:
        """Running tasks (and jobs claimed whole) whose worker has not heartbeated for timeout_s go back to
        the queue; returns how many. With max_attempts, one already claimed that many times fails instead
        (a task's job then settles once its other tasks have)."""
        timeout = number("timeout_s", timeout_s, optional=False)
        now = utcnow()
        cutoff = now - timedelta(seconds=timeout)
        abandoned: dict[str, Any] = dict(
            status="failed",
            finished_at=now,
            error=f"abandoned: its worker stopped heartbeating for {timeout:g}s on each of {max_attempts} attempts",
        )
        requeued = 0
        with self._write() as s:
            stale_tasks = s.scalars(
                select(TaskTable)
                .where(
                    TaskTable.status == "running",
                    func.coalesce(TaskTable.heartbeat_at, TaskTable.claimed_at) < cutoff,
                )
                .order_by(TaskTable.id)
                .with_for_update(skip_locked=True)
            ).all()
            settle: set[int] = set()
            for t in stale_tasks:
                if max_attempts is not None and t.attempts >= max_attempts:
                    t.status, t.finished_at, t.error = abandoned["status"], now, abandoned["error"]
                    settle.add(t.job_id)
                else:
                    t.status, t.worker_id = "queued", None
                    requeued += 1
            s.flush()
            for job_id in sorted(settle):
                _settle(s, job_id)
            stale = and_(
                JobTable.status == "running",
                JobTable.tasks_total.is_(None),
                func.coalesce(JobTable.heartbeat_at, JobTable.claimed_at) < cutoff,
            )
            if max_attempts is not None:
                s.execute(
                    update(JobTable)
                    .where(stale, JobTable.attempts >= max_attempts)
                    .values(**abandoned)
                    .execution_options(synchronize_session=False)
                )
            return requeued + rowcount(
                s.execute(
                    update(JobTable)
                    .where(stale)
                    .values(status="queued", worker_id=None)
                    .execution_options(synchronize_session=False)
                )
            )

    def cancel_job(self, job_id: int) -> bool:
        """Fail a queued or running job with error 'cancelled' (its worker's next heartbeat raises
        JobNotOwned); False when it had already finished."""
        with self._write() as s:
            now = utcnow()
            s.execute(  # tasks before the job: the order finish_task and requeue_stale lock them in
                update(TaskTable)
                .where(TaskTable.job_id == job_id, TaskTable.status.in_(("queued", "running")))
                .values(status="failed", error="cancelled", finished_at=now)
                .execution_options(synchronize_session=False)
            )
            job = s.get(JobTable, job_id, with_for_update=True)
            if job is None:
                raise UnknownJob(f"no job {job_id}")
            if job.status in FINISHED:
                return False
            job.status, job.error, job.finished_at = "failed", "cancelled", now
            return True

    def job(self, job_id: int) -> JobRow | None:
        with self._read() as s:
            job = s.get(JobTable, job_id)
            return None if job is None else job_row(job, _tasks_of(s, [job.id]).get(job.id))

    def jobs(self, limit: int = 100, *, status: str | None = None) -> list[JobRow]:
        """Newest first."""
        if status is not None and status not in JOB_STATUSES:
            raise InvalidRecord(f"job status must be one of {JOB_STATUSES}, got {status!r}")
        with self._read() as s:
            q = select(JobTable) if status is None else select(JobTable).where(JobTable.status == status)
            found = list(s.scalars(q.order_by(JobTable.id.desc()).limit(row_limit(limit))))
            tasks = _tasks_of(s, [j.id for j in found if j.tasks_total is not None])
            return [job_row(j, tasks.get(j.id)) for j in found]

    def queue_depth(self) -> int:
        """Jobs waiting for a worker (not yet fanned out into tasks)."""
        with self._read() as s:
            return s.execute(select(func.count()).select_from(JobTable).where(JobTable.status == "queued")).scalar_one()

    def queued_tasks(self) -> int:
        """Tasks of fanned-out jobs waiting for a worker: the fleet's backlog, one per spec or block."""
        with self._read() as s:
            queued = select(func.count()).select_from(TaskTable).where(TaskTable.status == "queued")
            return s.execute(queued).scalar_one()


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched: Session.execute is typed Result, but a DML statement's is a CursorResult."""
    return cast(CursorResult[Any], result).rowcount


def _next_job(s: Session, device_key: str | None) -> JobTable | None:
    q = select(JobTable).where(JobTable.status == "queued")
    if device_key is not None:
        q = q.where(or_(JobTable.device_key.is_(None), JobTable.device_key == device_key))
    return s.scalars(q.order_by(JobTable.id).limit(1).with_for_update(skip_locked=True)).first()


def _next_task(s: Session, device_key: str | None) -> TaskTable | None:
    q = (
        select(TaskTable)
        .join(JobTable, JobTable.id == TaskTable.job_id)
        .where(TaskTable.status == "queued", JobTable.status == "running")
    )
    if device_key is not None:
        q = q.where(or_(JobTable.device_key.is_(None), JobTable.device_key == device_key))
    q = q.order_by(TaskTable.job_id, TaskTable.position).limit(1)
    return s.scalars(q.with_for_update(skip_locked=True, of=TaskTable)).first()


def _take(row: JobTable | TaskTable, worker_id: str) -> None:
    now = utcnow()
    row.status, row.worker_id, row.claimed_at, row.heartbeat_at = "running", worker_id, now, now
    row.attempts += 1


def _fan_out(s: Session, job: JobTable, expand: Expand) -> TaskTable | None:
    """One queued task per spec of a claimed job (the job then runs as its tasks); None when expand refuses."""
    now = utcnow()
    job.attempts += 1
    try:
        specs = list(dict.fromkeys(expand(job_row(job))))
        if not specs:
            raise InvalidRecord("the job names no specs")
    except Exception as e:  # an unknown suite, a spec this tunerd no longer parses: the job cannot run
        job.status, job.finished_at, job.error = "failed", now, f"cannot fan out: {type(e).__name__}: {e}"
        return None
    job.status, job.worker_id, job.claimed_at, job.heartbeat_at = "running", None, now, now
    job.tasks_total = len(specs)
    tasks = [
        TaskTable(job_id=job.id, position=i, spec=sp.to_json(), status="queued", attempts=0)
        for i, sp in enumerate(specs)
    ]
    s.add_all(tasks)
    s.flush()
    return tasks[0]


def _settle(s: Session, job_id: int) -> JobTable | None:
    """Finish a running job whose tasks have all finished (done, or failed when one did); the job, or None.

    Locks the job row: of two workers finishing the last tasks at once, the second sees both."""
    job = s.get(JobTable, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.status != "running" or job.tasks_total is None:
        return None
    tasks = s.scalars(select(TaskTable).where(TaskTable.job_id == job_id).order_by(TaskTable.position)).all()
    if any(t.status not in FINISHED for t in tasks):
        return None
    failed = [t for t in tasks if t.status == "failed"]
    workers = list(dict.fromkeys(t.worker_id for t in tasks if t.worker_id))
    now = utcnow()
    job.status = "failed" if failed else "done"
    job.result = json_object("result", merge_results([json.loads(t.result) for t in tasks if t.result]))
    job.worker_id = workers[0] if len(workers) == 1 else None
    job.finished_at = job.heartbeat_at = now
    if failed:
        first = failed[0]
        job.error = (
            first.error
            if len(tasks) == 1
            else f"{len(failed)} of {len(tasks)} tasks failed; task {first.position}: {first.error}"
        )
    s.flush()
    return job


def merge_results(results: Sequence[Any]) -> Any:
    """A job's result from its tasks' (in task order): numbers add up, lists concatenate, dicts merge key by
    key, equal values are kept, differing ones become the list of distinct values."""
    if not results:
        return {}
    first = results[0]
    if all(isinstance(r, dict) for r in results):
        keys = list(dict.fromkeys(k for r in results for k in r))
        return {k: merge_results([r[k] for r in results if k in r]) for k in keys}
    if all(isinstance(r, list) for r in results):
        return [x for r in results for x in r]
    if all(isinstance(r, Real) and not isinstance(r, bool) for r in results):
        return sum(results)
    if all(r == first for r in results):
        return first
    distinct: list[Any] = []
    for r in results:
        if r not in distinct:
            distinct.append(r)
    return distinct


def _tasks_of(s: Session, job_ids: Sequence[int]) -> dict[int, list[TaskTable]]:
    out: dict[int, list[TaskTable]] = {}
    if job_ids:
        q = select(TaskTable).where(TaskTable.job_id.in_(list(job_ids))).order_by(TaskTable.job_id, TaskTable.position)
        for t in s.scalars(q):
            out.setdefault(t.job_id, []).append(t)
    return out


def _progress(j: JobTable, tasks: Sequence[TaskTable]) -> dict:
    """A fanned-out job's progress: its tasks counted by status, the workers on it, what each running task
    reported (and, for a one-task job, that task's own report)."""
    counts = {status: 0 for status in JOB_STATUSES}
    for t in tasks:
        counts[t.status] += 1
    reports = {t.position: json.loads(t.progress) if t.progress else {} for t in tasks}
    out: dict[str, Any] = dict(reports[tasks[0].position]) if len(tasks) == 1 else {}
    out.update(
        tasks_total=j.tasks_total,
        tasks_done=counts["done"],
        tasks_failed=counts["failed"],
        tasks_running=counts["running"],
        tasks_queued=counts["queued"],
        workers=sorted({t.worker_id for t in tasks if t.worker_id}),
        running=[
            {"task": t.position, "worker_id": t.worker_id, **reports[t.position]}
            for t in tasks
            if t.status == "running"
        ],
    )
    return out


def task_row(t: TaskTable, job: JobRow) -> TaskRow:
    spec = target_of(t.spec)
    return TaskRow(
        id=t.id,
        job_id=t.job_id,
        position=t.position,
        spec=spec,
        status=t.status,
        worker_id=t.worker_id,
        attempts=t.attempts,
        progress=None if t.progress is None else json.loads(t.progress),
        result=None if t.result is None else json.loads(t.result),
        error=t.error,
        claimed_at=t.claimed_at,
        heartbeat_at=t.heartbeat_at,
        finished_at=t.finished_at,
        job=dataclasses.replace(job, specs=(spec,), suite=None),
    )


def job_row(j: JobTable, tasks: Sequence[TaskTable] | None = None) -> JobRow:
    """The job as the store hands it out; with its tasks, progress is theirs aggregated (_progress)."""
    specs = (
        None
        if j.specs is None
        else tuple(target_of(json.dumps(d, sort_keys=True, separators=(",", ":"))) for d in json.loads(j.specs))
    )
    progress = None if j.progress is None else json.loads(j.progress)
    if tasks:
        progress = _progress(j, tasks)
    return JobRow(
        id=j.id,
        status=j.status,
        strategy=j.strategy,
        specs=specs,
        suite=j.suite,
        budget_trials=j.budget_trials,
        budget_seconds=j.budget_seconds,
        device_key=j.device_key,
        progress=progress,
        worker_id=j.worker_id,
        attempts=j.attempts,
        created_at=j.created_at,
        claimed_at=j.claimed_at,
        heartbeat_at=j.heartbeat_at,
        finished_at=j.finished_at,
        result=None if j.result is None else json.loads(j.result),
        error=j.error,
    )
