"""Kept binaries as blobs and the compile queue in the store, without compiling anything: binaries here are
synthetic (random cubin bytes, metadata naming their key), which is all the store checks.

An import writes each file as a blob in its own short transaction and refers to them in one last transaction (all or
none as readers see it; what a failed import leaves is collected after a grace period). The compile queue lives in
the store: it survives a restart, a pair goes to one worker only, the bound and the retry back-off hold, and the
worker compiles only its own rendering of what a row names."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import replace

import pytest

pytest.importorskip("sqlalchemy", reason="the store needs the service extras (sqlalchemy, alembic)")

from sqlalchemy import event  # noqa: E402
from test_bundle import keypair, pack  # noqa: E402
from test_store import GPU, record  # noqa: E402

from tunerd.db import BundleError, InvalidRecord, Store  # noqa: E402
from tunerd.db.binaries import BinaryStore  # noqa: E402
from tunerd.db.bundle import _sign, bundle_bytes, import_bundle_bytes, load_signing_key, load_trusted_key  # noqa: E402
from tunerd.db.engine import WRITE  # noqa: E402
from tunerd.kernels import aot, conv_spec, render  # noqa: E402

NAME = "tunerd_conv2d_fwd"


def _spec(c: int = 16):
    return conv_spec(n=1, c=c, k=32, in_size=(8, 8), kernel=3, padding=1)


def binary(v, i: int, cubin_bytes: int = 4096, arch: int = 90) -> aot.Binary:
    """A synthetic binary of variant v under the i-th key: its metadata names the key and arch, its cubin is random."""
    key = hashlib.sha256(f"{v.id}/{i}".encode()).hexdigest()
    meta = json.dumps({"hash": key, "target": {"arch": arch}, "name": NAME}).encode()
    files = {f"{NAME}.json": meta, f"{NAME}.cubin": os.urandom(cubin_bytes)}
    return aot.Binary(v.id, aot.source_sha256(v), arch, "3.x", None, key, {}, NAME, {}, files)


class Writes:
    """Every write transaction of a store: (seconds held, blob chunks written, bytes of its parameters)."""

    def __init__(self, store: Store) -> None:
        self.done: list[tuple[float, int, int]] = []
        self._open: dict[int, list] = {}
        eng = store._engine
        event.listen(eng, "begin", self._begin)
        event.listen(eng, "before_cursor_execute", self._execute)
        event.listen(eng, "commit", self._end)
        event.listen(eng, "rollback", self._end)

    def _begin(self, conn) -> None:
        if conn.get_execution_options().get(WRITE):
            self._open[id(conn)] = [time.perf_counter(), 0, 0]

    def _execute(self, conn, cursor, statement, params, context, many) -> None:
        t = self._open.get(id(conn))
        if t is None:
            return
        t[1] += statement.lstrip().upper().startswith("INSERT INTO BLOB_CHUNKS")
        for p in params if many else [params]:
            values = p.values() if isinstance(p, dict) else (p or ())
            t[2] += sum(len(x) for x in values if isinstance(x, (bytes, bytearray, memoryview, str)))

    def _end(self, conn) -> None:
        t = self._open.pop(id(conn), None)
        if t is not None:
            self.done.append((time.perf_counter() - t[0], t[1], t[2]))


def signed_bundle(tmp_path, binaries_of) -> tuple[bytes, object, object]:
    """(bundle bytes, private key path, public key path): a GPU winner of _spec() and binaries_of(variant), signed."""
    priv, pub = keypair(tmp_path, "ci")
    src = Store(f"sqlite:///{tmp_path / 'ci.sqlite'}")
    v = render(_spec())
    record(src, v, 1.0, device=GPU)
    env = json.loads(gzip.decompress(bundle_bytes(src, provenance={}, signing_key=load_signing_key(priv))))
    src.close()
    env["payload"]["binaries"] = [b.to_portable() for b in binaries_of(v)]
    packed = json.loads(gzip.decompress(pack(env)))
    packed["signature"] = _sign(load_signing_key(priv), packed["sha256"])
    return pack(packed, reseal=False), priv, pub


def test_an_import_writes_one_chunk_per_transaction_and_its_rows_at_once(tmp_path, monkeypatch):
    """8 binaries of 256 KiB cubins in chunks of 64 KiB: 40 transactions of one chunk each (4 per cubin, 1 per
    metadata file), one small one per blob, then one that refers to them all, far smaller than the bundle; a failure
    there leaves no row, only blobs that the collector deletes once past the grace period."""
    from tunerd.db import binaries

    cubin, chunk = 256 << 10, 64 << 10
    monkeypatch.setattr(binaries, "CHUNK_BYTES", chunk)
    data, _, pub = signed_bundle(tmp_path, lambda v: [binary(v, i, cubin) for i in range(8)])
    store = Store(f"sqlite:///{tmp_path / 'dest.sqlite'}")
    writes = Writes(store)
    report = import_bundle_bytes(store, data, trusted_keys=[load_trusted_key(pub)])
    assert report.binaries == 8 and report.added == 1
    assert [n for _, n, _ in writes.done if n] == [1] * 40  # one chunk per transaction
    assert max(size for *_, size in writes.done) < chunk + 1024  # no transaction writes more than a chunk's bytes
    assert sum(size for _, n, size in writes.done if not n) < 64 << 10  # the rest: a few KiB for 2 MiB of binaries
    rows = store.binaries()
    assert len(rows) == 8 and all(r.binary is not None and r.binary.size > cubin for r in rows)
    assert store.blob_count() == (16, sum(r.binary.size for r in rows))
    again = import_bundle_bytes(store, data, trusted_keys=[load_trusted_key(pub)])  # idempotent: nothing new
    assert again.binaries == 8 and len(store.binaries()) == 8 and store.blob_count()[0] == 16

    fresh = Store(f"sqlite:///{tmp_path / 'failed.sqlite'}")

    def full(*a, **k):
        raise BundleError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BinaryStore, "_add_binaries", full)
        with pytest.raises(BundleError, match="disk full"):
            import_bundle_bytes(fresh, data, trusted_keys=[load_trusted_key(pub)])
    assert fresh.binaries() == [] and fresh.winners() == []  # all or nothing, as readers see it
    assert fresh.blob_count()[0] == 16  # left behind, referred to by nothing
    with sqlite3.connect(tmp_path / "failed.sqlite") as raw:  # and a chunk of a blob whose write was killed
        raw.execute("INSERT INTO blob_chunks VALUES (?, 0, x'00', '2026-01-01 00:00:00')", ("f" * 64,))
    assert fresh.collect_blobs(3600) == 1  # only the stray chunk is past the grace period: the rest may be an import's
    assert fresh.collect_blobs(0, limit=10) == 10 and fresh.collect_blobs(0) == 6 and fresh.blob_count() == (0, 0)
    with sqlite3.connect(tmp_path / "failed.sqlite") as raw:
        assert raw.execute("SELECT count(*) FROM blob_chunks").fetchone() == (0,)
    assert store.collect_blobs(0) == 0 and len(store.binaries()) == 8  # referred-to blobs are never collected

    # `tunerd gc` does the same for a store no daemon serves
    from typer.testing import CliRunner

    from tunerd.cli import app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BinaryStore, "_add_binaries", full)
        with pytest.raises(BundleError):
            import_bundle_bytes(fresh, data, trusted_keys=[load_trusted_key(pub)])
    db = f"sqlite:///{tmp_path / 'failed.sqlite'}"
    young = CliRunner().invoke(app, ["gc", "--db", db])  # within the default hour: may be an import's
    assert young.exit_code == 0 and "removed 0 " in young.output and fresh.blob_count()[0] == 16
    old = CliRunner().invoke(app, ["gc", "--db", db, "--older-than", "0"])
    assert old.exit_code == 0 and "removed 16 " in old.output and fresh.blob_count() == (0, 0), old.output
    kept = CliRunner().invoke(app, ["gc", "--db", f"sqlite:///{tmp_path / 'dest.sqlite'}", "--older-than", "0"])
    assert kept.exit_code == 0 and "removed 0 " in kept.output and "16 files" in kept.output


def test_a_blob_collected_between_its_write_and_its_rows_is_written_again(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    v = render(_spec())
    b = binary(v, 0)
    keep = store.keep_blobs
    collected = []

    def keep_then_collect(blobs):  # a collector with no grace period runs right after the first blob writes
        n = keep(blobs)
        if not collected:
            collected.append(store.collect_blobs(0))
        return n

    store.keep_blobs = keep_then_collect  # type: ignore[method-assign]
    assert store.add_binaries([b]) == 1
    assert collected == [2]  # both taken before the rows referred to them: written again
    (row,) = store.binaries()
    assert row.binary == b
    store2 = Store(f"sqlite:///{tmp_path / 't.sqlite'}")
    store2.keep_blobs = lambda blobs: 0  # type: ignore[method-assign]  # never written: refused, nothing kept
    with pytest.raises(Exception, match="keep vanishing"):
        store2.add_binaries([b])
    assert store2.binaries() == []


def test_a_damaged_blob_is_reported_and_keeping_the_binary_again_repairs_it(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    v = render(_spec())
    good = binary(v, 0)
    store.add_binaries([good])
    sha = hashlib.sha256(good.files[f"{NAME}.cubin"]).hexdigest()
    with sqlite3.connect(tmp_path / "s.sqlite") as raw:  # edited behind the store's back
        raw.execute("UPDATE blob_chunks SET data = ? WHERE sha256 = ?", (b"\x7fELF tampered", sha))
    (row,) = store.binaries()
    assert row.binary is None and "does not match its sha256" in row.problem
    store.add_binaries([good])  # the same bytes again: the blob under that sha256 is repaired
    (row,) = store.binaries()
    assert row.binary == good
    with sqlite3.connect(tmp_path / "s.sqlite") as raw:
        raw.execute("DELETE FROM blob_chunks WHERE sha256 = ?", (sha,))
    (row,) = store.binaries()
    assert row.binary is None and "missing" in row.problem
    damaged = replace(good, source_sha256="ab" * 32)  # other bytes under the same (variant, arch, key): replaced
    store.add_binaries([damaged])
    (row,) = store.binaries()
    assert row.binary == damaged and store.collect_blobs(0) == 0


def test_migration_0006_moves_kept_files_into_blobs_and_back(tmp_path):
    """A store at 0005 with two kept binaries (one damaged) upgrades: the good one reads back byte for byte from
    blobs, the damaged one is dropped; downgrading to 0005 puts the files back."""
    from alembic import command

    from tunerd.db import engine as db_engine

    url = f"sqlite:///{tmp_path / 'v5.sqlite'}"

    def migrate(rev: str, down: bool = False) -> None:
        engine = db_engine.create(url)
        with engine.connect().execution_options(**{WRITE: True}) as conn, conn.begin():
            (command.downgrade if down else command.upgrade)(db_engine._alembic_config(conn), rev)
        engine.dispose()

    migrate("0005")
    v, w = render(_spec()), render(_spec(c=32))
    good, bad = binary(v, 0), binary(w, 1)
    with sqlite3.connect(tmp_path / "v5.sqlite") as raw:
        for b, flip in ((good, False), (bad, True)):
            d = b.to_portable()
            if flip:
                d["files"][f"{NAME}.cubin"]["sha256"] = "0" * 64
            raw.execute(
                "INSERT INTO binaries (variant_id, arch, key, source_sha256, triton_version, ptxas_version, name, env, "
                "signature, files, size, origin, signed_by, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (b.variant_id, b.arch, b.key, b.source_sha256, b.triton_version, None, b.name, "{}", "{}")
                + (json.dumps(d["files"], sort_keys=True), b.size, "compiled", None, "2026-12-01 00:00:00"),
            )
    with Store(url) as store:
        assert store.revision == "0006"
        (row,) = store.binaries()
        assert row.binary == good and store.blob_count() == (2, good.size)
        store.want_compiles([(v, 90)], limit=8, retry_s=60)
    migrate("0005", down=True)
    with sqlite3.connect(tmp_path / "v5.sqlite") as raw:
        (files,) = raw.execute("SELECT files FROM binaries").fetchone()
        assert aot.Binary.from_portable({**good.to_portable(), "files": json.loads(files)}) == good
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert not {"blobs", "binary_files", "binary_compiles"} & tables
    with Store(url) as store:  # and up again
        assert [r.binary for r in store.binaries()] == [good]


# ---- the compile queue --------------------------------------------------------------------------------
def _variants(n: int) -> list:
    return [render(_spec(c=16 * (i + 1))) for i in range(n)]


def test_the_compile_queue_survives_a_restart_bounds_and_backs_off(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    vs = _variants(3)
    with Store(url) as store:
        assert store.want_compiles([(v, 90) for v in vs] + [(vs[0], 80)], limit=3, retry_s=60) == 3  # bound
        assert store.want_compiles([(vs[0], 90)], limit=3, retry_s=60) == 3  # waiting already: no duplicate
        with pytest.raises(InvalidRecord, match="arch must be"):
            store.want_compiles([(vs[0], 9)], limit=3, retry_s=60)
    with Store(url) as store:  # a restart loses nothing
        assert store.pending_compiles() == 3
        rows = store.claim_compiles("w1", limit=2, stale_s=600)
        assert [(r.variant_id, r.arch, r.attempts) for r in rows] == [(vs[0].id, 90, 1), (vs[1].id, 90, 1)]
        assert aot.rendered(rows[0].kernel).id == vs[0].id  # what renders it, never its source
        assert store.finish_compiles("w2", [r.id for r in rows]) == 0  # not w2's
        assert store.finish_compiles("w1", [r.id for r in rows]) == 2
        assert store.pending_compiles() == 1
        assert store.want_compiles([(vs[0], 90), (vs[0], 80)], limit=3, retry_s=60) == 2  # tried: backs off
        assert store.want_compiles([(vs[0], 90)], limit=3, retry_s=0) == 3  # past its back-off: queued again
        assert store.prune_compiles(0) == 1  # vs[1] tried, forgotten
        (r2,) = store.claim_compiles("w1", limit=1, stale_s=600)
        others = store.claim_compiles("w2", limit=8, stale_s=600)
        assert len(others) == 2 and store.pending_compiles() == 3
        assert store.claim_compiles("w3", limit=8, stale_s=600) == []  # all held, none stale
        again = store.claim_compiles("w3", limit=8, stale_s=0)  # their workers died: the claims go to another
        assert sorted(r.id for r in again) == sorted([r2.id] + [o.id for o in others])
        assert {r.attempts for r in again} == {2}
        assert store.claim_compiles("w4", limit=8, stale_s=0, max_attempts=2) == []  # given up: tried too often
        assert store.pending_compiles() == 0


def _claim_concurrently(url: str, workers: int) -> list[list[int]]:
    """workers threads, each with its own Store, claim one pair at a time until none is left."""
    got: list[list[int]] = [[] for _ in range(workers)]
    barrier = threading.Barrier(workers)

    def run(i: int) -> None:
        with Store(url) as store:
            barrier.wait()
            while rows := store.claim_compiles(f"w{i}", limit=1, stale_s=600):
                got[i] += [r.id for r in rows]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_two_workers_never_claim_the_same_compile(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    vs = _variants(3)
    with Store(url) as store:
        store.want_compiles([(v, a) for v in vs for a in (80, 90)], limit=64, retry_s=60)
    got = _claim_concurrently(url, 2)
    ids = [i for g in got for i in g]
    assert len(ids) == len(set(ids)) == 6


def test_the_worker_compiles_the_queue_of_another_daemon_after_a_restart(tmp_path, monkeypatch):
    """Daemon A queues (its worker never runs); a new Store and worker on the same file compile what A queued,
    rendering each kernel itself: a row whose kernel renders as another variant is dropped, never compiled."""
    from tunerd.worker import JobWorker

    url = f"sqlite:///{tmp_path / 'd.sqlite'}"
    vs = _variants(3)
    with Store(url) as store:
        a = JobWorker(store, verify_claims=False, revalidate=False, tune_misses=False)
        assert a.want_binaries([(v, 90) for v in vs]) == 3 and a.status()["binaries_pending"] == 3
    with sqlite3.connect(tmp_path / "d.sqlite") as raw:  # a row edited behind the store's back: another schedule
        (kernel,) = raw.execute("SELECT kernel FROM binary_compiles WHERE variant_id = ?", (vs[2].id,)).fetchone()
        d = json.loads(kernel)
        d["schedule"]["num_warps"] = 8 if d["schedule"]["num_warps"] != 8 else 4
        raw.execute("UPDATE binary_compiles SET kernel = ? WHERE variant_id = ?", (json.dumps(d), vs[2].id))
    compiled: list[tuple[str, int]] = []

    def compile_stand_in(variants, arches, stored=None, *, jobs=None, timeout=3600.0):
        compiled.extend((v.id, a) for v in variants for a in arches)
        return aot.Built([], [binary(v, 0, arch=a) for v in variants for a in arches], [])

    monkeypatch.setattr(aot, "build_or_reuse", compile_stand_in)
    with Store(url) as store:
        b = JobWorker(store, verify_claims=False, revalidate=False, tune_misses=False, aot_batch=8)
        assert b.run_once() is None and sorted(compiled) == sorted((v.id, 90) for v in vs[:2])
        assert sorted(r.variant_id for r in store.binaries()) == sorted(v.id for v in vs[:2])
        assert store.pending_compiles() == 0 and b.want_binaries([(v, 90) for v in vs]) == 0  # tried: backs off
        assert b.run_once() is None and len(compiled) == 2


def test_the_compile_queue_and_blobs_on_postgresql(pg_url, tmp_path):
    vs = _variants(3)
    with Store(pg_url) as store:
        assert store.want_compiles([(v, a) for v in vs for a in (80, 90)], limit=5, retry_s=60) == 5
        assert store.want_compiles([(vs[2], 90)], limit=6, retry_s=60) == 6
    got = _claim_concurrently(pg_url, 3)  # FOR UPDATE SKIP LOCKED: each pair to one worker
    ids = [i for g in got for i in g]
    assert len(ids) == len(set(ids)) == 6
    data, _, pub = signed_bundle(tmp_path, lambda v: [binary(v, i, 64 << 10) for i in range(3)])
    with Store(pg_url) as store:
        writes = Writes(store)
        assert import_bundle_bytes(store, data, trusted_keys=[load_trusted_key(pub)]).binaries == 3
        assert [n for _, n, _ in writes.done if n] == [1] * 6
        assert [r.problem for r in store.binaries()] == [None] * 3
        store.keep_blobs({hashlib.sha256(b"orphan").hexdigest(): b"orphan"})
        assert store.collect_blobs(0) == 1 and store.blob_count()[0] == 6
