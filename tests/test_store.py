"""The store on SQLite: winner rules, resume after a kill, concurrent writers and workers, snapshots,
misses, jobs, migrations and error translation. Real specs, schedules and rendered sources throughout."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the store needs the service extras (sqlalchemy, alembic)")

from alembic import command  # noqa: E402
from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402

from tunerd.db import (  # noqa: E402
    DeviceFingerprint,
    InvalidRecord,
    JobNotOwned,
    SchemaError,
    SnapshotExists,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownJob,
    UnknownSnapshot,
    UnknownWinner,
    current,
    variant_id,
)
from tunerd.db import engine as db_engine  # noqa: E402
from tunerd.db.rows import WinnerRow  # noqa: E402
from tunerd.db.tables import Base  # noqa: E402
from tunerd.kernels import GENERATOR_VERSION, Schedule, Variant, conv_spec, render  # noqa: E402

TESTS = Path(__file__).resolve().parent
SPEC = conv_spec(n=1, c=16, k=32, in_size=(8, 8), kernel=3, padding=1)
DW = conv_spec(n=1, c=16, k=16, in_size=(8, 8), kernel=3, padding=1, groups=16)
DEV = current()  # this CPU box: the Triton interpreter
GPU = DeviceFingerprint(
    name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    sm_count=132,
    memory_bytes=85_045_460_992,
    driver="550.54.15",
    cuda="12.4",
    triton=DEV.triton,
    torch=DEV.torch,
    generator_version=GENERATOR_VERSION,
    interpreter=False,
)


@cache
def variants(spec=SPEC, count: int = 8) -> tuple[Variant, ...]:
    """count distinct real variants of spec (distinct schedules -> distinct sources)."""
    out: dict[str, Variant] = {}
    for bm in (16, 32, 64, 128):
        for bn in (16, 32):
            for warps in (2, 4):
                v = render(spec, Schedule(block_m=bm, block_n=bn, block_k=16, num_warps=warps))
                out.setdefault(v.id, v)
    assert len(out) >= count
    return tuple(out.values())[:count]


def record(store: Store, v: Variant, ms: float | None, *, device=DEV, status: str = "ok", **kw) -> int:
    return store.record_trial(
        device,
        v.spec,
        v.schedule,
        v.source,
        status=status,
        median_ms=ms,
        spread_ms=None if ms is None else ms / 20,
        reps=10 if status == "ok" else 0,
        max_error=1e-6 if status == "ok" else None,
        strategy=kw.pop("strategy", "halving"),
        **kw,
    )


def claim(store: Store, v: Variant, ms: float, *, device=DEV, origin: str = "bundle:test") -> str:
    """Import v as a winner measured elsewhere (a claim); returns the outcome ('added', 'kept', ...)."""
    row = WinnerRow(
        device=device,
        spec=v.spec,
        schedule=v.schedule,
        source=v.source,
        variant_id=v.id,
        median_ms=ms,
        spread_ms=None,
        reps=5,
        max_error=0.0,
        speedup_vs_default=None,
        fraction_of_roofline=None,
        strategy="ci",
        created_at=datetime.now(timezone.utc),
    )
    return store.ingest([row], origin=origin)[0]


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'tunerd.sqlite'}"


@pytest.fixture
def store(url) -> Store:
    with Store(url) as s:
        yield s


def state(store: Store) -> tuple:
    """Everything observable, to prove an operation changed nothing."""
    return (
        json.dumps([w.to_dict() for w in store.winners()]),
        store.trial_counts(),
        json.dumps([d.to_dict() for d in store.devices()]),
        [j.to_dict() for j in store.jobs()],
        [m.to_dict() for m in store.top_misses(100)],
        [s.to_dict() for s in store.snapshots()],
    )


# ---- child processes (also used by test_store_pg) -------------------------------------------------
def spawn(fn: str, *args) -> subprocess.Popen:
    """Run tests/test_store.<fn>(*args) in a fresh interpreter; its stdout is a pipe of lines."""
    paths = [str(TESTS), str(TESTS.parent)]
    code = f"import sys; sys.path[:0] = {paths!r}; import test_store; test_store.{fn}(*{args!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_together(procs: list[subprocess.Popen], go: Path) -> None:
    """Release children that wait in barrier() at the same moment, once all are ready (imports done)."""
    for p in procs:
        line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read()[-3000:]
    go.touch()


def barrier(go: str) -> None:
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)


def wait_all(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def child_write(url: str, worker: int, n: int, delay: float, go: str | None = None) -> None:
    """Record n trials cycling over SPEC's variants, printing "trial-id variant-id" after each commit.
    Worker w's i-th median is 1 + i + w/10, so the global fastest is worker 0's first trial."""
    store = Store(url)
    vs = variants(SPEC, 16)
    if go:
        barrier(go)
    print("start", time.time(), flush=True)
    for i in range(n):
        v = vs[i % len(vs)]
        tid = record(store, v, 1.0 + i + worker / 10)
        print(tid, v.id, flush=True)
        time.sleep(delay)
    print("end", time.time(), flush=True)


def child_claim(url: str, worker: str, hold: float, go: str) -> None:
    """Claim and finish jobs until the queue is empty; print each claimed id."""
    store = Store(url)
    barrier(go)
    while (job := store.claim_job(worker)) is not None:
        print(job.id, flush=True)
        time.sleep(hold)
        store.heartbeat(job.id, worker, {"step": 1})
        store.finish_job(job.id, worker, result={"worker": worker})


def child_claim_and_die(url: str, worker: str) -> None:
    """Claim one job and stop without finishing it (as a worker killed mid-job would)."""
    job = Store(url).claim_job(worker)
    print(job.id, flush=True)
    os._exit(0)


def parse_writes(out: str) -> tuple[list[str], float, float]:
    """(trial ids, start time, end time) from child_write's output."""
    lines = [line.split() for line in out.splitlines()]
    times = {w[0]: float(w[1]) for w in lines if w[0] in ("start", "end")}
    return [w[0] for w in lines if w[0] not in ("start", "end", "ready")], times["start"], times["end"]


# ---- fingerprints and ids -------------------------------------------------------------------------
def test_fingerprint_of_this_cpu_box_is_the_interpreter_and_round_trips():
    fp = current()
    assert fp.interpreter and fp.name == "triton-interpreter (CPU)" and fp.generator_version == GENERATOR_VERSION
    assert current("cpu") == fp
    assert DeviceFingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp
    assert DeviceFingerprint.from_key(fp.key) == fp and json.loads(fp.key) == fp.to_dict()
    assert fp.digest != GPU.digest and len(fp.digest) == 16
    with pytest.raises(InvalidRecord, match="missing \\['name'\\]"):
        DeviceFingerprint.from_dict({k: v for k, v in fp.to_dict().items() if k != "name"})
    with pytest.raises(InvalidRecord, match="sm_count"):
        replace(GPU, sm_count="132")
    with pytest.raises(InvalidRecord, match="not valid JSON"):
        DeviceFingerprint.from_key("{")


@pytest.mark.gpu
def test_fingerprint_reads_cuda_properties():
    import torch

    fp = current()
    props = torch.cuda.get_device_properties(0)
    assert not fp.interpreter and fp.name == props.name and fp.sm_count == props.multi_processor_count
    assert fp.compute_capability == f"{props.major}.{props.minor}" and fp.memory_bytes == props.total_memory
    assert fp.driver and fp.cuda == torch.version.cuda


def test_variant_id_is_the_generator_content_hash():
    for v in variants(SPEC, 3) + variants(DW, 2):
        assert variant_id(v.source) == v.id


def test_default_url_honours_env(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNERD_DB", raising=False)
    monkeypatch.setenv("TUNERD_CACHE_DIR", str(tmp_path / "c"))
    assert db_engine.default_url() == f"sqlite:///{tmp_path / 'c' / 'tunerd.sqlite'}"
    s = Store()
    assert (tmp_path / "c" / "tunerd.sqlite").exists() and s.backend == "sqlite"
    s.close()
    monkeypatch.setenv("TUNERD_DB", "sqlite:///" + str(tmp_path / "x.sqlite"))
    with Store.open() as s:
        assert s.url.endswith("x.sqlite")
    with Store("sqlite://") as mem:  # in memory, for tests and one-off tools
        record(mem, variants()[0], 1.0)
        assert mem.winner(DEV, SPEC).median_ms == 1.0


# ---- winners -------------------------------------------------------------------------------------
def test_winner_is_the_fastest_ok_trial_and_ratios_follow_it(store):
    v = variants()
    assert store.winner(DEV, SPEC) is None
    record(store, v[0], 4.0)
    record(store, v[1], 5.0)  # slower: no change
    record(store, v[2], None, status="timeout", error="exceeded 10 s")
    record(store, v[3], None, status="crash", error="illegal memory access")
    w = store.winner(DEV, SPEC)
    assert (w.variant_id, w.median_ms, w.source, w.schedule) == (v[0].id, 4.0, v[0].source, v[0].schedule)
    assert w.device == DEV and w.spec == SPEC and w.strategy == "halving" and w.reps == 10
    store.set_winner_stats(DEV, SPEC, speedup_vs_default=1.5, fraction_of_roofline=0.2)
    record(store, v[4], 4.0)  # a tie keeps the incumbent
    assert store.winner(DEV, SPEC).variant_id == v[0].id
    record(store, v[5], 2.0, strategy="exhaustive")
    w = store.winner(DEV, SPEC)
    assert (w.variant_id, w.median_ms, w.strategy) == (v[5].id, 2.0, "exhaustive")
    # Both ratios are reference_time / winner_time: halving the time doubles them.
    assert math.isclose(w.speedup_vs_default, 3.0) and math.isclose(w.fraction_of_roofline, 0.4)
    store.set_winner_stats(DEV, SPEC, fraction_of_roofline=0.5)
    w = store.winner(DEV, SPEC)
    assert math.isclose(w.speedup_vs_default, 3.0) and w.fraction_of_roofline == 0.5
    with pytest.raises(UnknownWinner):
        store.set_winner_stats(DEV, DW, speedup_vs_default=2.0)
    with pytest.raises(InvalidRecord, match="speedup_vs_default"):
        store.set_winner_stats(DEV, SPEC, speedup_vs_default=-1.0)
    json.dumps(w.to_dict())  # JSON-ready for the HTTP layer
    assert [x.variant_id for x in store.winners()] == [v[5].id]


def test_wrong_result_disqualifies_a_variant_and_demotes_the_winner(store):
    v = variants()
    record(store, v[0], 3.0)
    record(store, v[1], 2.0)
    record(store, v[2], 1.0)
    store.set_winner_stats(DEV, SPEC, speedup_vs_default=4.0)
    store.record_trial(
        DEV,
        SPEC,
        v[2].schedule,
        v[2].source,
        status="wrong-result",
        median_ms=None,
        spread_ms=None,
        reps=0,
        max_error=float("nan"),
        error="84.7% wrong elements",
    )
    w = store.winner(DEV, SPEC)
    assert (w.variant_id, w.median_ms) == (v[1].id, 2.0) and math.isclose(w.speedup_vs_default, 2.0)
    record(store, v[2], 0.5)  # a later ok timing of a disqualified variant never wins again
    assert store.winner(DEV, SPEC).variant_id == v[1].id
    m = store.measured(DEV, SPEC)
    assert m[v[2].id].status == "wrong-result" and m[v[2].id].max_error is None
    for u in (v[0], v[1]):
        store.record_trial(
            DEV,
            SPEC,
            u.schedule,
            u.source,
            status="wrong-result",
            median_ms=None,
            spread_ms=None,
            reps=0,
            max_error=0.5,
        )
    assert store.winner(DEV, SPEC) is None  # nothing correct left


def test_interpreter_timings_never_answer_a_gpu_client(store):
    v = variants()
    record(store, v[0], 100.0)
    assert store.winner(GPU, SPEC) is None and store.winners(GPU) == []
    assert store.winner(DEV.key, SPEC).median_ms == 100.0  # the exact key string works too
    other_torch = replace(DEV, torch="0.0.0")
    assert store.winner(other_torch, SPEC) is None
    record(store, v[1], 0.05, device=GPU)
    assert store.winner(GPU, SPEC).variant_id == v[1].id and store.winner(DEV, SPEC).variant_id == v[0].id
    rows = {d.key: d for d in store.devices()}
    assert rows[DEV.key].fingerprint.interpreter and not rows[GPU.key].fingerprint.interpreter
    assert (rows[DEV.key].trials, rows[DEV.key].winners, rows[GPU.key].trials) == (1, 1, 1)


BAD_TRIALS = {
    "unknown status": dict(status="fast"),
    "ok without a time": dict(median_ms=None),
    "NaN time": dict(median_ms=float("nan")),
    "zero time": dict(median_ms=0.0),
    "negative spread": dict(spread_ms=-1.0),
    "ok with no reps": dict(reps=0),
    "ok without a correctness check": dict(max_error=None),
    "infinite error on ok": dict(max_error=float("inf")),
    "reps not int": dict(reps=2.5),
    "empty strategy": dict(strategy=""),
    "unknown job": dict(job_id=12345),
}


@pytest.mark.parametrize("bad", BAD_TRIALS, ids=list(BAD_TRIALS))
def test_record_trial_rejects_bad_values_and_writes_nothing(store, bad):
    v = variants()[0]
    before = state(store)
    kw = dict(status="ok", median_ms=1.0, spread_ms=0.1, reps=5, max_error=1e-6) | BAD_TRIALS[bad]
    with pytest.raises(InvalidRecord if bad != "unknown job" else UnknownJob):
        store.record_trial(DEV, SPEC, v.schedule, v.source, **kw)
    assert state(store) == before


def test_record_trial_rejects_a_source_that_belongs_to_something_else(store):
    v, w = variants()[:2]
    d = variants(DW, 1)[0]
    before = state(store)
    ok = dict(status="ok", median_ms=1.0, spread_ms=0.1, reps=3, max_error=0.0)
    with pytest.raises(InvalidRecord, match="not this tunerd's rendering of depthwise2d"):
        store.record_trial(DEV, DW, d.schedule, v.source, **ok)
    with pytest.raises(InvalidRecord, match="not this tunerd's rendering.*schedule"):
        store.record_trial(DEV, SPEC, w.schedule, v.source, **ok)
    headless = "\n".join(d.source.split("\n")[4:])  # another spec's kernel with its header stripped
    assert not headless.startswith("#")
    with pytest.raises(InvalidRecord, match="not this tunerd's rendering"):
        store.record_trial(DEV, SPEC, v.schedule, headless, **ok)
    with pytest.raises(InvalidRecord, match="not this tunerd's rendering"):
        store.record_trial(DEV, SPEC, v.schedule, v.source + "\nimport os\n", **ok)
    with pytest.raises(InvalidRecord, match="cannot verify a source recorded for generator '9.9'"):
        store.record_trial(replace(DEV, generator_version="9.9"), SPEC, v.schedule, v.source, **ok)
    with pytest.raises(InvalidRecord, match="spec must be a BlockSpec"):
        store.record_trial(
            DEV, SPEC.to_dict(), v.schedule, v.source, status="ok", median_ms=1.0, spread_ms=0.1, reps=3, max_error=0.0
        )
    with pytest.raises(InvalidRecord, match="source"):
        store.record_trial(
            DEV, SPEC, v.schedule, "  ", status="ok", median_ms=1.0, spread_ms=0.1, reps=3, max_error=0.0
        )
    assert state(store) == before


def test_measured_keeps_one_row_per_variant_for_resume(store):
    v = variants()
    record(store, v[0], 3.0)
    record(store, v[0], 2.5)  # re-measured faster: the fastest ok counts
    record(store, v[0], 2.9)
    record(store, v[1], None, status="timeout", error="t1")
    record(store, v[1], None, status="compile-error", error="t2")  # latest failure counts
    record(store, v[2], None, status="crash", error="c")
    record(store, v[2], 7.0)  # an ok trial outranks failures
    m = store.measured(DEV, SPEC)
    assert set(m) == {v[0].id, v[1].id, v[2].id}
    assert (m[v[0].id].median_ms, m[v[1].id].status, m[v[1].id].error, m[v[2].id].median_ms) == (
        2.5,
        "compile-error",
        "t2",
        7.0,
    )
    assert m[v[0].id].schedule == v[0].schedule and m[v[0].id].device_key == DEV.key
    assert store.measured(GPU, SPEC) == {} and store.measured(DEV, DW) == {}
    json.dumps(m[v[0].id].to_dict())
    assert store.variant(v[0].id).source == v[0].source and store.variant("0" * 24) is None


# ---- imported timings are claims ---------------------------------------------------------------------
def test_claims_never_beat_a_local_measurement_and_end_when_measured_here(store):
    v = variants()
    assert claim(store, v[0], 1e-6) == "added"  # an empty store takes a claim, marked as such
    w = store.winner(DEV, SPEC)
    assert (w.variant_id, w.claimed, w.origin) == (v[0].id, True, "bundle:test")
    assert claim(store, v[1], 1e-3, origin="bundle:other") == "kept"  # slower claim
    assert claim(store, v[2], 1e-7) == "replaced"  # faster claim
    assert [c.variant_id for c in store.claims(DEV)] == [v[0].id, v[1].id, v[2].id]
    assert store.measured(DEV, SPEC) == {}  # claims are not measurements: a tuner measures them itself
    record(store, v[5], 50.0)  # a slow local measurement still beats every claim
    w = store.winner(DEV, SPEC)
    assert (w.variant_id, w.median_ms, w.claimed, w.origin) == (v[5].id, 50.0, False, None)
    assert claim(store, v[3], 1e-9) == "kept" and store.winner(DEV, SPEC).variant_id == v[5].id
    # Measuring a claimed variant here replaces its claim: its claimed time no longer counts anywhere.
    record(store, v[2], 80.0)
    assert store.winner(DEV, SPEC).variant_id == v[5].id
    assert {c.variant_id for c in store.claims(DEV)} == {v[0].id, v[1].id, v[3].id}
    assert store.measured(DEV, SPEC)[v[2].id].median_ms == 80.0
    record(store, v[5], None, status="wrong-result", error="wrong here")
    record(store, v[2], None, status="wrong-result", error="wrong here")
    w = store.winner(DEV, SPEC)  # no correct local measurement left: the fastest remaining claim answers
    assert (w.variant_id, w.median_ms, w.claimed) == (v[3].id, 1e-9, True)
    record(store, v[3], None, status="timeout", error="exceeded 10 s")  # a claimed winner failing here ...
    w = store.winner(DEV, SPEC)  # ... loses its place to the next claim
    assert (w.variant_id, w.claimed) == (v[0].id, True)
    record(store, v[0], 3.0)
    w = store.winner(DEV, SPEC)
    assert (w.variant_id, w.median_ms, w.claimed) == (v[0].id, 3.0, False)
    assert claim(store, v[2], 1e-9) == "kept"  # disqualified here: a later claim cannot revive it
    assert claim(store, v[0], 1e-9) == "kept"  # measured here: its claims no longer count
    assert [c.variant_id for c in store.claims(DEV, SPEC)] == [v[1].id] and store.claims(GPU) == []


def test_snapshots_keep_whether_a_winner_was_claimed(store):
    v = variants()
    claim(store, v[0], 1.0)
    record(store, v[1], 5.0, device=GPU)
    snap = store.create_snapshot("s")
    record(store, v[2], 9.0)  # the local measurement replaces the live claim, not the pinned one
    pinned = {w.device_key: w.claimed for w in store.winners(snapshot=snap)}
    assert pinned == {DEV.key: True, GPU.key: False} and not store.winner(DEV, SPEC).claimed
    assert store.winner(DEV, SPEC, snapshot=snap).to_dict()["claimed"] is True


# ---- processes -------------------------------------------------------------------------------------
def test_resume_after_a_tuner_is_killed_midway(url):
    Store(url).close()
    proc = spawn("child_write", url, 0, 8, 0.3)
    reported = []
    while len(reported) < 3:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        if line.split()[0] != "start":
            reported.append(line.split()[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = Store(url)
    done = store.measured(DEV, SPEC)
    assert set(reported) <= set(done) and len(done) <= len(reported) + 1  # at most the one in flight
    assert all(t.status == "ok" and t.median_ms > 0 and t.reps == 10 for t in done.values())
    for v in variants(SPEC, 8):  # the resumed run measures only what is missing
        if v.id not in done:
            record(store, v, 50.0)
    assert len(store.measured(DEV, SPEC)) == 8 and store.trial_counts()["ok"] == 8
    assert store.winner(DEV, SPEC).median_ms == 1.0  # the killed run's first trial is still the fastest


def test_two_processes_write_one_sqlite_file_concurrently(url, tmp_path):
    n = 200  # ~1 s of commits per writer: long enough that the windows overlap on a loaded 2-core box
    go = tmp_path / "go"
    procs = [spawn("child_write", url, w, n, 0.0, str(go)) for w in (0, 1)]  # both open (migrate) a fresh file
    start_together(procs, go)
    runs = [parse_writes(out) for out in wait_all(procs)]
    assert max(r[1] for r in runs) < min(r[2] for r in runs)  # the two writers really overlapped
    ids = [t for r in runs for t in r[0]]
    assert len(ids) == 2 * n == len(set(ids))
    store = Store(url)
    assert store.trial_counts()["ok"] == 2 * n
    assert store.winner(DEV, SPEC).median_ms == 1.0 and len(store.measured(DEV, SPEC)) == 16


def test_two_worker_processes_never_claim_the_same_job(url, tmp_path):
    store = Store(url)
    ids = [store.enqueue_job(specs=[SPEC], budget_trials=3) for _ in range(30)]
    go = tmp_path / "go"
    procs = [spawn("child_claim", url, f"w{i}", 0.005, str(go)) for i in range(2)]
    start_together(procs, go)
    claimed = [[int(x) for x in out.split()] for out in wait_all(procs)]
    assert sorted(claimed[0] + claimed[1]) == ids  # none twice, none lost
    assert all(j.status == "done" and j.attempts == 1 for j in store.jobs())
    assert {j.result["worker"] for j in store.jobs()} == {"w0", "w1"} and store.queue_depth() == 0


# ---- snapshots -------------------------------------------------------------------------------------
def test_snapshot_answers_never_change_while_tuning_continues(store):
    v = variants()
    record(store, v[0], 3.0)
    store.set_winner_stats(DEV, SPEC, speedup_vs_default=1.2)
    record(store, v[1], 9.0, device=GPU)
    pinned = store.create_snapshot("prod-1")
    before = [w.to_dict() for w in store.winners(snapshot=pinned)]
    assert len(before) == 2 and all(w["snapshot"] == "prod-1" for w in before)
    record(store, v[2], 1.0)  # tuning continues
    record(store, v[0], None, status="wrong-result", error="later found wrong")
    record(store, v[3], 2.0, device=GPU)
    store.set_winner_stats(DEV, SPEC, speedup_vs_default=7.0)
    record(store, variants(DW, 1)[0], 1.0)
    assert [w.to_dict() for w in store.winners(snapshot=pinned)] == before
    assert store.winner(DEV, SPEC, snapshot=pinned).variant_id == v[0].id
    assert store.winner(DEV, SPEC).variant_id == v[2].id and store.winner(DEV, DW, snapshot=pinned) is None
    auto = store.create_snapshot()
    assert len(store.winners(snapshot=auto)) == 3
    assert [(s.name, s.winners) for s in store.snapshots()] == [("prod-1", 2), (auto, 3)]
    with pytest.raises(UnknownSnapshot, match="nope"):
        store.winner(DEV, SPEC, snapshot="nope")
    with pytest.raises(UnknownSnapshot):
        store.winners(snapshot="nope")
    with pytest.raises(SnapshotExists):
        store.create_snapshot("prod-1")
    with pytest.raises(InvalidRecord):
        store.create_snapshot("bad name/..")
    assert len(store.snapshots()) == 2


# ---- misses ---------------------------------------------------------------------------------------
def test_misses_count_rank_and_clear(store):
    assert store.record_miss(GPU, SPEC) == 1
    assert store.record_miss(GPU, SPEC) == 2
    store.record_miss(GPU, DW)
    store.record_miss(DEV, DW)
    top = store.top_misses(10)
    assert [(m.device_key, m.spec, m.count) for m in top][:1] == [(GPU.key, SPEC, 2)] and len(top) == 3
    assert [m.spec for m in store.top_misses(10, device=DEV)] == [DW]
    assert len(store.top_misses(1)) == 1
    json.dumps([m.to_dict() for m in top])
    assert store.clear_miss(GPU, SPEC) and not store.clear_miss(GPU, SPEC)
    assert [m.count for m in store.top_misses(10)] == [1, 1]
    with pytest.raises(InvalidRecord):
        store.top_misses(0)


# ---- jobs -------------------------------------------------------------------------------------------
def test_job_queue_lifecycle(store):
    for bad in (
        dict(),
        dict(specs=[SPEC], suite="resnet50"),
        dict(specs=[]),
        dict(specs=[SPEC.to_dict()]),
        dict(suite="x", budget_trials=0),
        dict(suite="x", budget_seconds=-1.0),
        dict(suite="x", strategy=""),
    ):
        with pytest.raises(InvalidRecord):
            store.enqueue_job(**bad)
    a = store.enqueue_job(specs=[SPEC, DW], strategy="exhaustive", budget_trials=20)
    b = store.enqueue_job(suite="resnet50", budget_seconds=600.0, device_key=GPU.key)
    c = store.enqueue_job(suite="mobilenetv2")
    assert store.queue_depth() == 3
    job = store.claim_job("cpu-worker", device_key=DEV.key)  # oldest first; b is for the GPU
    assert (job.id, job.status, job.worker_id, job.attempts, job.specs) == (a, "running", "cpu-worker", 1, (SPEC, DW))
    assert store.claim_job("cpu-worker-2", device_key=DEV.key).id == c
    assert store.claim_job("cpu-worker-3", device_key=DEV.key) is None
    assert store.claim_job("gpu-worker").id == b
    store.heartbeat(a, "cpu-worker", {"trials": 4, "best_ms": 1.5})
    assert store.job(a).progress == {"trials": 4, "best_ms": 1.5}
    with pytest.raises(JobNotOwned, match="held by 'cpu-worker'"):
        store.heartbeat(a, "intruder", {})
    with pytest.raises(UnknownJob):
        store.heartbeat(999, "cpu-worker", {})
    with pytest.raises(InvalidRecord):
        store.heartbeat(a, "cpu-worker", {"x": object()})
    store.finish_job(a, "cpu-worker", result={"winners": 2})
    store.finish_job(c, "cpu-worker-2", error="suite not found")
    with pytest.raises(JobNotOwned, match="done"):
        store.finish_job(a, "cpu-worker", result={})
    assert (store.job(a).status, store.job(a).result, store.job(c).status, store.job(c).error) == (
        "done",
        {"winners": 2},
        "failed",
        "suite not found",
    )
    assert store.cancel_job(b) and not store.cancel_job(a)
    with pytest.raises(JobNotOwned, match="cancelled"):
        store.heartbeat(b, "gpu-worker", {})
    assert [j.id for j in store.jobs()] == [c, b, a] and [j.id for j in store.jobs(status="done")] == [a]
    assert store.job(12345) is None and store.queue_depth() == 0
    json.dumps([j.to_dict() for j in store.jobs()])
    with pytest.raises(InvalidRecord):
        store.jobs(status="lost")


def test_stale_jobs_are_requeued_and_their_old_worker_is_told(store):
    a = store.enqueue_job(suite="s")
    b = store.enqueue_job(suite="t")
    store.claim_job("dead")
    store.claim_job("alive")
    time.sleep(0.3)
    store.heartbeat(b, "alive", {"n": 1})
    assert store.requeue_stale(0.2) == 1
    assert (store.job(a).status, store.job(a).worker_id, store.job(b).status) == ("queued", None, "running")
    with pytest.raises(JobNotOwned, match="queued"):
        store.heartbeat(a, "dead", {})
    again = store.claim_job("new")
    assert (again.id, again.attempts) == (a, 2)
    time.sleep(0.3)
    assert store.requeue_stale(0.2, max_attempts=2) == 1  # b (attempt 1) requeued, a (attempt 2) given up
    assert store.job(a).status == "failed" and "stopped heartbeating" in store.job(a).error
    assert store.job(b).status == "queued" and store.requeue_stale(0.2) == 0


# ---- migrations and errors ------------------------------------------------------------------------------
def test_migrations_on_a_fresh_and_an_existing_file(tmp_path):
    path = tmp_path / "old.sqlite"
    raw = sqlite3.connect(path)  # an existing file from before tunerd kept tables in it
    raw.execute("CREATE TABLE notes (t TEXT)")
    raw.execute("INSERT INTO notes VALUES ('keep me')")
    raw.commit()
    raw.close()
    store = Store(f"sqlite:///{path}")
    assert store.revision == db_engine.head_revision()
    record(store, variants()[0], 2.0)
    store.close()
    with db_engine.create(f"sqlite:///{path}").connect() as conn:
        assert db_engine.current_revision(conn) == db_engine.head_revision()
        # the migrations create exactly the schema the models describe
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diff if not (d[0] == "remove_table" and d[1].name == "notes")] == []
        assert conn.exec_driver_sql("SELECT t FROM notes").scalar() == "keep me"
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    reopened = Store(f"sqlite:///{path}")  # already at head: data intact
    assert reopened.winner(DEV, SPEC).median_ms == 2.0
    reopened.close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE alembic_version SET version_num = '9999_future'")
    raw.commit()
    raw.close()
    with pytest.raises(SchemaError, match="9999_future.*newer tunerd"):
        Store(f"sqlite:///{path}")


def test_migration_0002_marks_imported_winners_claimed(tmp_path):
    url = f"sqlite:///{tmp_path / 'v1.sqlite'}"
    engine = db_engine.create(url)
    with engine.connect().execution_options(**{db_engine.WRITE: True}) as conn, conn.begin():
        command.upgrade(db_engine._alembic_config(conn), "0001")  # a store written by the previous tunerd
    engine.dispose()
    v = variants()
    with sqlite3.connect(tmp_path / "v1.sqlite") as raw:
        raw.execute("INSERT INTO devices VALUES (1, ?, 'd', 'cpu', 1, '2025-01-01')", (DEV.key,))
        for sid, spec in ((1, SPEC), (2, DW)):
            raw.execute(
                "INSERT INTO specs VALUES (?, ?, 'd', 'conv', 'fwd', 'float32', 's', '2025-01-01')",
                (sid, spec.to_json()),
            )
        for tid, (sid, var, origin) in enumerate([(1, v[0], None), (2, variants(DW, 1)[0], "bundle:abc")], 1):
            raw.execute(
                "INSERT INTO variants VALUES (?, ?, ?, ?, ?, '2025-01-01')",
                (var.id, sid, var.schedule.to_json(), var.source, GENERATOR_VERSION),
            )
            raw.execute(
                "INSERT INTO trials (id, device_id, spec_id, variant_id, status, median_ms, reps, origin, "
                "created_at) VALUES (?, 1, ?, ?, 'ok', 1.0, 3, ?, '2025-01-01')",
                (tid, sid, var.id, origin),
            )
            raw.execute("INSERT INTO winners VALUES (1, ?, ?, ?, 1.0, NULL, NULL, '2025-01-01')", (sid, tid, var.id))
    with Store(url) as store:
        assert store.revision == db_engine.head_revision()
        assert (store.winner(DEV, SPEC).claimed, store.winner(DEV, DW).claimed) == (False, True)
        assert [c.variant_id for c in store.claims(DEV)] == [variants(DW, 1)[0].id]


def test_driver_errors_become_store_errors(tmp_path, url):
    with pytest.raises(StoreError, match="runs on sqlite or postgresql"):
        Store("mysql://u@localhost/x")
    with pytest.raises(StoreError, match="not a database URL"):
        Store("::nonsense::")
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreUnavailable):
        Store(f"sqlite:///{tmp_path / 'file' / 'db.sqlite'}")
    Store(url).close()
    store = Store(url, busy_timeout_s=0.2)
    holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            record(store, variants()[0], 1.0)
        assert store.winner(DEV, SPEC) is None  # WAL: readers are not blocked
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    record(store, variants()[0], 1.0)
    assert store.trial_counts()["ok"] == 1
