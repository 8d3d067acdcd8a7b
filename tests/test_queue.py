"""Jobs fan out into per-spec tasks: claimed once each, heartbeated, requeued, failed, cancelled, settled.

Store level, on SQLite and (where the server binaries are installed) PostgreSQL; the PostgreSQL
variant of the race claims from many threads, each with its own connection pool, at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

pytest.importorskip("sqlalchemy", reason="the store needs the service extras (sqlalchemy, alembic)")
from tunerd.db import JobNotOwned, Store  # noqa: E402
from tunerd.db.queue import merge_results  # noqa: E402
from tunerd.kernels import conv_spec  # noqa: E402
from tunerd.kernels.spec import SpecError  # noqa: E402

SPECS = [conv_spec(n=n, c=16, k=16, in_size=(4, 4), kernel=1) for n in range(1, 6)]


def expand(job):
    if job.suite == "bogus":
        raise SpecError("unknown suite 'bogus'")
    return list(job.specs or ())


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/q.sqlite")
    else:
        s = Store(request.getfixturevalue("pg_url"))
    yield s
    s.close()


def test_a_job_fans_out_into_tasks_that_settle_it(store):
    job_id = store.enqueue_job(specs=SPECS[:3], budget_trials=4)
    assert store.job_tasks(job_id) == [] and store.job(job_id).status == "queued"
    first = store.claim_task("w1", expand=expand)
    assert (first.job_id, first.position, first.spec, first.attempts) == (job_id, 0, SPECS[0], 1)
    assert (first.job.specs, first.job.budget_trials, first.job.suite) == ((SPECS[0],), 4, None)  # the runner's view
    job = store.job(job_id)
    assert job.status == "running" and job.worker_id is None and job.attempts == 1
    assert (store.queue_depth(), store.queued_tasks()) == (0, 2)  # the job is fanned out: its tasks wait
    second, third = store.claim_task("w2", expand=expand), store.claim_task("w1", expand=expand)
    assert [second.position, third.position] == [1, 2] and store.claim_task("w3", expand=expand) is None
    assert store.queued_tasks() == 0
    store.heartbeat_task(second.id, "w2", {"trials_done": 2, "trials_total": 4})
    progress = store.job(job_id).progress
    assert (progress["tasks_total"], progress["tasks_running"], progress["workers"]) == (3, 3, ["w1", "w2"])
    assert {"task": 1, "worker_id": "w2", "trials_done": 2, "trials_total": 4} in progress["running"]
    with pytest.raises(JobNotOwned, match="does not hold task"):
        store.heartbeat_task(second.id, "w1", {})
    assert store.finish_task(first.id, "w1", result={"specs": [{"n": 1}], "trials": 4, "device": "d"}) is None
    assert store.finish_task(third.id, "w1", result={"specs": [{"n": 3}], "trials": 2, "device": "d"}) is None
    done = store.finish_task(second.id, "w2", result={"specs": [{"n": 2}], "trials": 3, "device": "d"})
    assert done is not None and done.status == "done" and done.error is None
    assert done.result == {"specs": [{"n": 1}, {"n": 2}, {"n": 3}], "trials": 9, "device": "d"}  # in spec order
    assert done.progress["tasks_done"] == 3 and done.worker_id is None  # two workers shared it
    assert [t.status for t in store.job_tasks(job_id)] == ["done"] * 3
    with pytest.raises(JobNotOwned):
        store.finish_task(first.id, "w1", result={})  # finished once only


def test_a_failed_task_fails_its_job_once_the_others_finish(store):
    store.enqueue_job(specs=SPECS[:2])
    a, b = store.claim_task("w", expand=expand), store.claim_task("w", expand=expand)
    assert store.finish_task(a.id, "w", error="RuntimeError: boom") is None  # b still runs
    job = store.finish_task(b.id, "w", result={"tuned": 1})
    assert job.status == "failed" and job.error == "1 of 2 tasks failed; task 0: RuntimeError: boom"
    assert job.result == {"tuned": 1} and job.worker_id == "w"  # what did finish is kept
    single = store.enqueue_job(specs=SPECS[2:3])
    t = store.claim_task("w", expand=expand)
    assert t.job_id == single and store.finish_task(t.id, "w", error="crash").error == "crash"


def test_a_job_that_cannot_fan_out_fails_and_the_next_is_claimed(store):
    bad = store.enqueue_job(suite="bogus")
    good = store.enqueue_job(specs=SPECS[:1])
    task = store.claim_task("w", expand=expand)
    assert task.job_id == good
    failed = store.job(bad)
    assert failed.status == "failed" and "cannot fan out: SpecError: unknown suite 'bogus'" in failed.error


def test_stale_tasks_are_requeued_then_given_up(store):
    job_id = store.enqueue_job(specs=SPECS[:2])
    dead = store.claim_task("dies-1", expand=expand)
    alive = store.claim_task("alive", expand=expand)
    time.sleep(0.3)
    store.heartbeat_task(alive.id, "alive", {})
    assert store.requeue_stale(0.25, max_attempts=2) == 1  # only the silent one
    with pytest.raises(JobNotOwned, match="it is queued"):
        store.heartbeat_task(dead.id, "dies-1", {})
    again = store.claim_task("dies-2", expand=expand)
    assert (again.id, again.attempts, again.position) == (dead.id, 2, 0)
    time.sleep(0.3)
    store.heartbeat_task(alive.id, "alive", {})
    assert store.requeue_stale(0.25, max_attempts=2) == 0  # second death: failed, not requeued
    assert store.job(job_id).status == "running"  # the other task still runs
    job = store.finish_task(alive.id, "alive", result={"tuned": 1})
    assert job.status == "failed" and "abandoned" in job.error and store.claim_task("x", expand=expand) is None


def test_cancelling_a_job_stops_its_tasks(store):
    job_id = store.enqueue_job(specs=SPECS[:3])
    running = store.claim_task("w", expand=expand)
    assert store.cancel_job(job_id) is True
    with pytest.raises(JobNotOwned, match="cancelled"):
        store.heartbeat_task(running.id, "w", {})
    assert {t.status for t in store.job_tasks(job_id)} == {"failed"} and store.claim_task("w", expand=expand) is None
    assert store.job(job_id).error == "cancelled" and store.cancel_job(job_id) is False


def test_tasks_of_another_devices_job_wait(store):
    store.enqueue_job(specs=SPECS[:2], device_key="gpu")
    assert store.claim_task("cpu", expand=expand, device_key="cpu") is None
    assert store.claim_task("gpu", expand=expand, device_key="gpu").position == 0
    assert store.claim_task("cpu", expand=expand, device_key="cpu") is None  # its tasks are the gpu's too
    assert store.claim_task("gpu-2", expand=expand, device_key="gpu").position == 1


def test_concurrent_workers_claim_every_task_exactly_once(store):
    """Eight workers, each with its own connections, race for the tasks of three jobs."""
    specs = [conv_spec(n=n, c=16, k=16, in_size=(4, 4), kernel=1) for n in range(1, 13)]
    ids = [store.enqueue_job(specs=specs) for _ in range(3)]
    claimed: list[tuple[int, int]] = []
    lock, go = threading.Lock(), threading.Barrier(8)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        own = Store(store._engine.url)
        try:
            go.wait()
            while (t := own.claim_task(f"w{i}", expand=expand)) is not None:
                with lock:
                    claimed.append((t.job_id, t.position))
                own.finish_task(t.id, f"w{i}", result={"tuned": 1})
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            own.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(claimed) == sorted((j, p) for j in ids for p in range(12))  # none twice, none lost
    for job_id in ids:
        job = store.job(job_id)
        assert job.status == "done" and job.result == {"tuned": 12}
        assert all(t.attempts == 1 for t in store.job_tasks(job_id))


def test_merge_results():
    assert merge_results([]) == {}
    merged = merge_results([{"n": 1, "xs": [1], "d": "a", "w": "x"}, {"n": 2.5, "xs": [2, 3], "d": "a", "w": "y"}])
    assert merged == {"n": 3.5, "xs": [1, 2, 3], "d": "a", "w": ["x", "y"]}
    assert merge_results([{"ok": True}, {"ok": True}, {"ok": False}]) == {"ok": [True, False]}  # bools do not add
    assert merge_results([{"a": {"b": 1}}, {"a": {"b": 2, "c": None}}]) == {"a": {"b": 3, "c": None}}
    assert Counter(merge_results([{"k": "x"}, {}, {"k": "x"}])) == Counter({"k": "x"})
