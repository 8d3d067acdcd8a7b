"""A fleet: tunerd daemon processes sharing one real PostgreSQL database.

A job fans out into one task per spec; tasks are claimed with SELECT ... FOR UPDATE SKIP LOCKED, so
the daemons tune one job side by side and every task runs exactly once; a daemon killed mid-task
stops heartbeating and its task is requeued and finished by another daemon. Run as a script
(`python tests/test_fleet_pg.py DB_URL URL_FILE WORKER_ID DELAY_S`) this file is one such daemon,
with a fast stand-in tuner that records one real trial per spec. The fleet timing simulator
(benchmarks/fleet.py) runs here too, at a tiny time scale.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "fleet-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEARTBEAT_S, STALE_S = 0.2, 1.5


def run_daemon(db_url: str, url_file: str, worker_id: str, delay_s: float) -> None:
    """One daemon: the HTTP API and a worker whose tuner sleeps delay_s per spec, then records a trial."""
    sys.path.insert(0, str(ROOT))
    from tunerd.api import ServerThread, create_app
    from tunerd.db.store import Store
    from tunerd.kernels import render
    from tunerd.settings import Settings
    from tunerd.worker import JobWorker

    def tuner(store, job, device, on_progress) -> dict:
        for i, spec in enumerate(job.specs):
            time.sleep(delay_s)
            v = render(spec)
            store.record_trial(
                device,
                spec,
                v.schedule,
                v.source,
                status="ok",
                median_ms=1.0 + i,
                spread_ms=0.0,
                reps=1,
                max_error=0.0,
                strategy=job.strategy,
                job_id=job.id,
            )
            on_progress({"specs_done": i + 1, "specs_total": len(job.specs)})
        return {"tuned": len(job.specs), "by": worker_id}

    store = Store(db_url)
    worker = JobWorker(
        store,
        worker_id=worker_id,
        run_job=tuner,
        poll_s=0.05,
        heartbeat_s=HEARTBEAT_S,
        stale_after_s=STALE_S,
        tune_misses=False,
    )
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with ServerThread(create_app(Settings(token=TOKEN), store=store, worker=worker)) as srv:
        tmp = url_file + ".tmp"
        Path(tmp).write_text(srv.url)
        os.replace(tmp, url_file)
        while not stop:
            time.sleep(0.1)


if __name__ == "__main__":
    run_daemon(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
    sys.exit(0)

# ---- the tests ------------------------------------------------------------------------------------------
import pytest  # noqa: E402

for _extra in ("fastapi", "sqlalchemy", "httpx", "typer"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")
import httpx  # noqa: E402

import tunerd  # noqa: E402,F401
from tunerd.db.store import Store  # noqa: E402
from tunerd.kernels import conv_spec  # noqa: E402


class Daemon:
    """A daemon process; `ready()` waits until it serves HTTP."""

    def __init__(self, db_url: str, tmp_path: Path, worker_id: str, delay_s: float) -> None:
        self.worker_id = worker_id
        self.url_file = tmp_path / f"{worker_id}.url"
        self.log = tmp_path / f"{worker_id}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, db_url, str(self.url_file), worker_id, str(delay_s)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.http: httpx.Client | None = None

    def ready(self, timeout: float = 120) -> Daemon:
        end = time.monotonic() + timeout
        while not self.url_file.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"daemon {self.worker_id} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.http = httpx.Client(base_url=self.url_file.read_text(), timeout=30)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.http is not None:
            self.http.close()


@contextmanager
def fleet(db_url: str, tmp_path: Path, *members: tuple[str, float]) -> Iterator[list[Daemon]]:
    """Launch one daemon process per (worker_id, delay_s) at once; stop them all at the end."""
    started: list[Daemon] = []
    try:
        for worker_id, delay in members:
            started.append(Daemon(db_url, tmp_path, worker_id, delay))
        yield started
    finally:
        for d in started:
            d.stop()


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def spec(n: int):
    return conv_spec(n=n, c=16, k=16, in_size=(4, 4), kernel=1)


def test_one_jobs_tasks_run_exactly_once_across_two_daemons(pg_url, tmp_path):  # noqa: F811
    store = Store(pg_url)
    specs = [spec(n).to_dict() for n in range(1, 13)]
    with fleet(pg_url, tmp_path, ("gpu-a", 0.15), ("gpu-b", 0.15)) as (a, b):
        a.ready(), b.ready()
        job = a.http.post("/v1/jobs", json={"specs": specs}, headers=AUTH).json()
        other = b.http.post("/v1/jobs", json={"specs": specs[:2]}, headers=AUTH).json()
        wait_for(lambda: b.http.get(f"/v1/jobs/{job['id']}").json()["status"] == "done", 90, "the job done")
        wait_for(lambda: a.http.get(f"/v1/jobs/{other['id']}").json()["status"] == "done", 30, "the other job done")
        done = b.http.get(f"/v1/jobs/{job['id']}").json()
    tasks = store.job_tasks(job["id"])
    assert [t.position for t in tasks] == list(range(12)) and all(t.attempts == 1 for t in tasks)
    by = Counter(t.worker_id for t in tasks)
    assert set(by) == {"gpu-a", "gpu-b"}  # both daemons took tasks of the one job
    assert done["result"]["tuned"] == 12 and sorted(done["result"]["by"]) == ["gpu-a", "gpu-b"]
    assert done["progress"]["tasks_done"] == 12 and done["progress"]["workers"] == ["gpu-a", "gpu-b"]
    # none ran twice: one trial per task (the second job's specs were tuned again, by its own tasks)
    assert store.trial_counts()["ok"] == sum(store.trial_counts().values()) == 14
    store.close()


def test_a_killed_daemons_task_is_requeued_and_finished_by_the_other(pg_url, tmp_path):  # noqa: F811
    store = Store(pg_url)
    specs = [spec(n).to_dict() for n in range(1, 11)]
    with fleet(pg_url, tmp_path, ("doomed", 4.0)) as (doomed,):
        doomed.ready()
        with fleet(pg_url, tmp_path, ("survivor", 0.02)) as (survivor,):
            # the survivor is still starting (seconds of imports): the doomed daemon claims the first task
            job = doomed.http.post("/v1/jobs", json={"specs": specs}, headers=AUTH).json()
            survivor.ready()
            held = [t for t in store.job_tasks(job["id"]) if t.status == "running" and t.worker_id == "doomed"]
            assert held, "the doomed daemon holds no task"
            doomed.proc.send_signal(signal.SIGKILL)  # no goodbye: its heartbeats just stop
            doomed.proc.wait(10)
            wait_for(
                lambda: survivor.http.get(f"/v1/jobs/{job['id']}").json()["status"] == "done",
                60,
                "the survivor to finish the requeued task",
            )
            done = survivor.http.get(f"/v1/jobs/{job['id']}").json()
            health = survivor.http.get("/healthz").json()
    tasks = {t.position: t for t in store.job_tasks(job["id"])}
    (lost,) = held
    assert tasks[lost.position].worker_id == "survivor" and tasks[lost.position].attempts == 2
    assert all(t.attempts == 1 for p, t in tasks.items() if p != lost.position)
    assert done["status"] == "done" and done["result"]["tuned"] == 10 and health["worker"]["jobs_done"] == 1
    device = store.devices()[0].fingerprint
    assert all(store.winner(device, spec(n)) is not None for n in range(1, 11))  # nothing lost with the dead one
    assert store.trial_counts()["ok"] == sum(store.trial_counts().values()) == 10  # and nothing done twice
    store.close()


def test_the_fleet_simulator_tunes_a_suite_with_two_workers(pg_url):
    from benchmarks.fleet import run_fleet

    run = run_fleet(pg_url, 2, suite="resnet50", strategy="model", budget=4, time_scale=0.001)
    assert run["status"] == "done" and run["tasks"] == 23 and run["trials"] == 23 * 4
    assert run["task_attempts"] == {1: 23} and sum(run["tasks_per_worker"].values()) == 23
    assert set(run["tasks_per_worker"]) == {"sim-0", "sim-1"} and run["simulated_serial_s"] > 0
