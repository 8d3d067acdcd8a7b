"""Fleet timing simulator: 1, 2, 4, 8 worker processes tune one suite job on one real PostgreSQL.

Each worker process is a real tunerd.worker.JobWorker on the real queue (the job fans out into one task
per spec; tasks are claimed with FOR UPDATE SKIP LOCKED, heartbeated, finished, and the job settles
when its last task does). Only the measurement is simulated: each task replays the job's search
strategy on the recorded timing table of its family (benchmarks/tables, schedules.replay), and every
trial costs its recorded measured duration (reps x median), scaled by --time-scale, as a sleep; no
kernel runs. Each task stores its picked schedule as a trial (one write per task). Wall time runs from
the job's enqueue (workers already started and idle) to the job's settling.

    python -m benchmarks.fleet --out benchmarks/results/$(date +%F)-fleet-sim          # starts a throwaway server
    python -m benchmarks.fleet --server postgresql+psycopg://u@host/postgres --workers 1 2

Writes fleet.json (per worker count: wall seconds, speedup, scaling efficiency, tasks per worker,
task attempts) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "benchmarks" / "tables"
FORMAT = "tunerd-fleet-sim/1"


def table_for(spec: Any, tables: Sequence[Any]) -> Any:
    """The recorded table closest to spec's family: same dimensionality and depthwise-ness first."""

    def family(s: Any) -> tuple[int, bool]:
        return len(s.in_size), s.groups > 1 and s.groups == s.c

    same = [t for t in tables if family(t.spec) == family(spec)]
    return (same or [t for t in tables if family(t.spec)[1] == family(spec)[1]] or list(tables))[0]


class SimulatedTuner:
    """A JobRunner whose trials are answered from timing tables, sleeping each trial's measured duration."""

    def __init__(self, tables: Sequence[Any], time_scale: float) -> None:
        self.tables = list(tables)
        self.time_scale = time_scale

    def __call__(self, store: Any, job: Any, device: Any, on_progress: Any) -> dict:
        from tunerd.kernels import render
        from tunerd.schedules import cost
        from tunerd.schedules.replay import ReplayMeasure
        from tunerd.schedules.strategies import Budget, make
        from tunerd.schedules.trial import best_of

        (spec,) = job.specs
        table = table_for(spec, self.tables)
        seed = int(spec.digest, 16) % 2**31
        strat = make(
            job.strategy, seed=seed, prior=lambda s: cost.predict(table.spec, s, table.limits), reps=table.reps
        )
        replay = ReplayMeasure(table, seed=seed)
        spent = [0.0]
        budget = job.budget_trials or len(table.trials)

        def measure(schedule: Any, reps: int) -> Any:
            t = replay(schedule, reps)
            duration = reps * table.trials[schedule].median_ms / 1e3  # what measuring it took on the recording box
            spent[0] += duration
            time.sleep(duration * self.time_scale)
            on_progress({"trials_done": len(found_so_far) + 1, "trials_total": budget})
            found_so_far.append(t)
            return t

        found_so_far: list[Any] = []
        found = strat.search(list(table.trials), measure, Budget(trials=budget))
        best = best_of(found)
        try:
            v = render(spec, best.schedule) if best is not None else render(spec)
        except ValueError:  # SpecError/ScheduleError: the table's pick is illegal here: store the default's trial
            v = render(spec)
        store.record_trial(
            device,
            spec,
            v.schedule,
            v.source,
            status="ok",
            median_ms=best.median_ms if best is not None else None,
            spread_ms=0.0,
            reps=table.reps,
            max_error=0.0,
            strategy=f"sim-{job.strategy}",
            job_id=job.id,
        )
        return {"tasks": 1, "trials": len(found), "simulated_s": spent[0]}


def worker_main(db_url: str, ready_file: str, worker_id: str, time_scale: float, job_id_file: str) -> None:
    """One simulated worker process: a JobWorker on the real queue; exits once the benchmark job settled."""
    sys.path.insert(0, str(ROOT))
    from tunerd.db.store import Store
    from tunerd.schedules.replay import Table
    from tunerd.worker import JobWorker

    tables = [Table.load(p) for p in sorted(TABLES.glob("*.json"))]
    store = Store(db_url)
    worker = JobWorker(
        store,
        worker_id=worker_id,
        run_job=SimulatedTuner(tables, time_scale),
        poll_s=0.05,
        heartbeat_s=1.0,
        stale_after_s=10.0,
        tune_misses=False,
        verify_claims=False,
    )
    Path(ready_file).write_text(worker_id)
    while not Path(job_id_file).exists():
        time.sleep(0.01)
    job_id = int(Path(job_id_file).read_text())
    while True:
        if worker.run_once() is None:
            job = store.job(job_id)
            if job is not None and job.status in ("done", "failed"):
                break
            time.sleep(worker.poll_s)
    store.close()
    t = os.times()
    Path(ready_file).with_suffix(".cpu").write_text(f"{t.user + t.system:.3f}")


def run_fleet(db_url: str, workers: int, *, suite: str, strategy: str, budget: int, time_scale: float) -> dict:
    """Start `workers` processes, queue one suite job, time it until it settles; the figures."""
    from tunerd.db.fingerprint import current
    from tunerd.db.store import Store

    store = Store(db_url)  # migrates before the workers open it
    tmp = Path(tempfile.mkdtemp(prefix="tunerd-fleet-"))
    job_file = tmp / "job"
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "benchmarks.fleet", "--worker", db_url, str(tmp / f"w{i}.ready"), f"sim-{i}"]
        cmd += [str(time_scale), str(job_file)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=open(tmp / f"w{i}.log", "w")))
    try:
        while not all((tmp / f"w{i}.ready").exists() for i in range(workers)):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker died while starting: {(tmp / 'w0.log').read_text()[-2000:]}")
            time.sleep(0.1)
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        job_id = store.enqueue_job(suite=suite, strategy=strategy, budget_trials=budget, device_key=current().key)
        job_file.write_text(str(job_id))
        while (job := store.job(job_id)) is not None and job.status not in ("done", "failed"):
            time.sleep(0.02)
        wall = time.monotonic() - t0
        load1 = os.getloadavg()[0]
        for p in procs:
            p.wait(60)
        cpu = [float((tmp / f"w{i}.cpu").read_text()) for i in range(workers)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert job is not None
    tasks = store.job_tasks(job_id)
    store.close()
    per_worker: dict[str, list[Any]] = {}
    for t in sorted(tasks, key=lambda t: t.claimed_at):
        per_worker.setdefault(t.worker_id, []).append(t)
    # between two tasks of one worker: finishing, requeue check, claiming (the queue's cost per task)
    gaps = [(b.claimed_at - a.finished_at).total_seconds() for ts in per_worker.values() for a, b in zip(ts, ts[1:])]
    slept = {w: sum(t.result["simulated_s"] for t in ts) * time_scale for w, ts in per_worker.items()}
    return {
        "workers": workers,
        "status": job.status,
        "wall_s": round(wall, 3),
        "tasks": len(tasks),
        "trials": job.result["trials"] if job.result else None,
        "simulated_serial_s": round(job.result["simulated_s"], 3) if job.result else None,
        # the wall time this assignment of tasks needs with no overhead at all: the busiest worker's sleeps
        "lower_bound_s": round(max(slept.values()), 3),
        # per task, time beyond its sleeps: the search, rendering and storing its pick (CPU, shared here)
        "task_overhead_s": round(
            sum((t.finished_at - t.claimed_at).total_seconds() - t.result["simulated_s"] * time_scale for t in tasks)
            / len(tasks),
            3,
        ),
        "queue_gap_s": {"mean": round(sum(gaps) / len(gaps), 4), "max": round(max(gaps), 4)} if gaps else None,
        "worker_cpu_s": round(sum(cpu), 2),
        "loadavg_1min": [round(load0, 2), round(load1, 2)],
        "tasks_per_worker": dict(sorted(Counter(t.worker_id for t in tasks).items())),
        "task_attempts": dict(Counter(t.attempts for t in tasks)),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1], argv[2], argv[3], float(argv[4]), argv[5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--suite", default="resnet50")
    ap.add_argument("--strategy", default="model")
    ap.add_argument("--budget", type=int, default=16, help="trials per spec")
    ap.add_argument("--time-scale", type=float, default=1.0, help="simulated seconds per recorded second")
    ap.add_argument("--server", help="a PostgreSQL URL to create the run databases on (default: a throwaway server)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import tunerd  # noqa: F401  (maps tunerd.db & co.)
    from tests.pg import PgServer, pg_bindir

    server = None
    if args.server is None:
        bindir = pg_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; pass --server URL")
        server = PgServer(bindir)
        server.start()
    runs = []
    try:
        for n in args.workers:
            if server is not None:
                url = server.create_database(f"fleet_{n}_{os.getpid()}")
            else:
                url = args.server
            run = run_fleet(
                url, n, suite=args.suite, strategy=args.strategy, budget=args.budget, time_scale=args.time_scale
            )
            runs.append(run)
            print(f"{n} worker(s): {run['wall_s']:.2f} s, tasks per worker {run['tasks_per_worker']}", flush=True)
    finally:
        if server is not None:
            server.stop()
    base = next((r for r in runs if r["workers"] == 1), None)
    for r in runs:
        if base is not None:
            r["speedup"] = round(base["wall_s"] / r["wall_s"], 3)
            r["efficiency"] = round(base["wall_s"] / (r["workers"] * r["wall_s"]), 3)
        r["unscaled_wall_s"] = round(r["wall_s"] / args.time_scale, 1)
    report = {
        "format": FORMAT,
        "date": datetime.now(timezone.utc).date().isoformat(),
        "suite": args.suite,
        "strategy": args.strategy,
        "budget_trials": args.budget,
        "time_scale": args.time_scale,
        "cpu_count": os.cpu_count(),
        "postgresql": "throwaway local server" if server is not None else "given server",
        "runs": runs,
    }
    print(f"{'workers':>7} {'wall s':>8} {'speedup':>8} {'efficiency':>10} {'unscaled s':>10}")
    for r in runs:
        print(
            f"{r['workers']:>7} {r['wall_s']:>8.2f} {r.get('speedup', float('nan')):>8.2f} "
            f"{r.get('efficiency', float('nan')):>10.2f} {r['unscaled_wall_s']:>10.1f}"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fleet.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
