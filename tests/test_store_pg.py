"""The same Store on a throwaway PostgreSQL server: schema, API, SKIP LOCKED job claiming across worker
processes (a dead worker's job is requeued), concurrent trial writers, bundles between backends."""

from __future__ import annotations

import pytest

pytest.importorskip("sqlalchemy", reason="the store needs the service extras (sqlalchemy, alembic)")
import test_store  # noqa: E402
from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from pg import free_port  # noqa: E402
from test_store import DEV, DW, GPU, SPEC, parse_writes, record, spawn, start_together, state, variants, wait_all  # noqa: E402

from tunerd.db import BundleError, JobNotOwned, SchemaError, Store, StoreUnavailable  # noqa: E402
from tunerd.db import engine as db_engine  # noqa: E402
from tunerd.db.bundle import bundle_bytes, import_bundle_bytes  # noqa: E402
from tunerd.db.tables import Base  # noqa: E402


def test_pg_schema_and_api(pg_url):
    store = Store(pg_url)
    assert store.backend == "postgresql" and store.revision == db_engine.head_revision()
    with db_engine.create(pg_url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    v = variants()
    record(store, v[0], 3.0)
    record(store, v[1], 2.0)
    store.set_winner_stats(DEV, SPEC, speedup_vs_default=2.0)
    pinned = store.create_snapshot("pg-1")
    record(store, v[2], 1.0)
    w = store.winner(DEV, SPEC)
    assert (w.variant_id, w.speedup_vs_default) == (v[2].id, 4.0)
    assert store.winner(DEV, SPEC, snapshot=pinned).variant_id == v[1].id
    store.record_trial(
        DEV,
        SPEC,
        v[2].schedule,
        v[2].source,
        status="wrong-result",
        median_ms=None,
        spread_ms=None,
        reps=0,
        max_error=1.0,
    )
    assert store.winner(DEV, SPEC).variant_id == v[1].id and store.winner(GPU, SPEC) is None
    assert store.record_miss(GPU, DW) == 1 and store.record_miss(GPU, DW) == 2
    assert [m.count for m in store.top_misses(5)] == [2]
    assert store.trial_counts()["wrong-result"] == 1 and len(store.measured(DEV, SPEC)) == 3
    store.close()
    assert Store(pg_url).winner(DEV, SPEC).median_ms == 2.0  # reopening at head keeps everything


def test_pg_rejects_a_database_from_a_newer_tunerd(pg_url):
    Store(pg_url).close()
    with db_engine.create(pg_url).begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(SchemaError, match="newer tunerd"):
        Store(pg_url)


def test_pg_two_workers_claim_with_skip_locked_and_a_dead_workers_job_is_requeued(pg_url, tmp_path):
    store = Store(pg_url)
    ids = [store.enqueue_job(suite=f"s{i}", budget_trials=2) for i in range(30)]
    dead = spawn("child_claim_and_die", pg_url, "doomed")
    out, err = dead.communicate(timeout=120)
    assert dead.returncode == 0, err[-3000:]
    lost = int(out.split()[0])
    assert store.job(lost).status == "running" and store.job(lost).worker_id == "doomed"
    assert store.requeue_stale(0.0) == 1  # its worker never heartbeats again
    with pytest.raises(JobNotOwned):
        store.heartbeat(lost, "doomed", {})
    go = tmp_path / "go"
    procs = [spawn("child_claim", pg_url, f"w{i}", 0.005, str(go)) for i in range(2)]
    start_together(procs, go)
    claimed = [[int(x) for x in o.split()] for o in wait_all(procs)]
    assert sorted(claimed[0] + claimed[1]) == ids  # none twice, none lost (the dead one's included)
    jobs = {j.id: j for j in store.jobs()}
    assert all(j.status == "done" for j in jobs.values()) and jobs[lost].attempts == 2
    assert all(j.attempts == 1 for i, j in jobs.items() if i != lost) and store.queue_depth() == 0


def test_pg_concurrent_trial_writers_lose_nothing(pg_url, tmp_path):
    n = 40
    go = tmp_path / "go"
    procs = [spawn("child_write", pg_url, w, n, 0.0, str(go)) for w in (0, 1)]  # both migrate a fresh db
    start_together(procs, go)
    runs = [parse_writes(o) for o in wait_all(procs)]
    assert max(r[1] for r in runs) < min(r[2] for r in runs)
    store = Store(pg_url)
    assert store.trial_counts()["ok"] == 2 * n and len({t for r in runs for t in r[0]}) == 2 * n
    assert store.winner(DEV, SPEC).median_ms == 1.0 and len(store.measured(DEV, SPEC)) == 16
    assert [d.trials for d in store.devices()] == [2 * n]


def test_bundles_move_between_sqlite_and_pg(pg_url, tmp_path):
    lite = Store(f"sqlite:///{tmp_path / 'ci.sqlite'}")
    record(lite, variants()[0], 2.0)
    record(lite, variants(DW, 1)[0], 1.0, device=GPU)
    pg = Store(pg_url)
    record(pg, variants()[1], 1.5)
    before = state(pg)
    with pytest.raises(BundleError, match="truncated"):
        import_bundle_bytes(pg, bundle_bytes(lite, provenance={})[:-10])
    assert state(pg) == before
    report = import_bundle_bytes(pg, bundle_bytes(lite, provenance={"ci": 1}))
    assert (report.added, report.kept) == (1, 1) and pg.winner(GPU, DW).median_ms == 1.0
    back = import_bundle_bytes(lite, bundle_bytes(pg, provenance={}))  # pg's 1.5 is a claim here
    assert (back.kept, back.unchanged) == (1, 1) and lite.winner(DEV, SPEC).median_ms == 2.0
    assert pg.winner(GPU, DW).claimed and not pg.winner(DEV, SPEC).claimed


def test_pg_claims_rank_below_local_measurements(pg_url):
    with Store(pg_url) as store:  # the same rules through PostgreSQL's upsert and boolean ordering
        test_store.test_claims_never_beat_a_local_measurement_and_end_when_measured_here(store)


def test_pg_snapshots_keep_claims(pg_url):
    with Store(pg_url) as store:
        test_store.test_snapshots_keep_whether_a_winner_was_claimed(store)


def test_pg_down_is_store_unavailable():
    with pytest.raises(StoreUnavailable, match="127.0.0.1") as e:
        Store(f"postgresql://tunerd:secret@127.0.0.1:{free_port()}/x", busy_timeout_s=2)
    assert "secret" not in str(e.value)  # the URL in the message hides the password
