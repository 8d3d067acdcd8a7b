"""Ahead-of-time binaries in bundles: `tunerd export --arch 90` compiles the winners' kernels on this CPU box; a
client that pins the signing key installs them into a fresh Triton cache, where triton.compile of the JIT's own
launch of each kernel is a cache hit (no compile stage runs); tampered, unsigned or mismatched binaries are never
installed. Two small kernels (a conv winner, a fused ConvNeXt block step) are compiled once for the module."""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import sqlite3
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget

from tunerd.kernels import aot, conv, conv_spec, render, runtime
from tunerd.kernels.block import convnext
from tunerd.kernels.plan import plans

SM90, SM80 = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)
SPEC = conv_spec(n=1, c=16, k=32, in_size=(8, 8), kernel=3, padding=1)
BLOCK = convnext(n=1, c=16, in_size=(8, 8))
FUSED_PLAN = next(p for p in plans(BLOCK) if p.describe() == "convnext[dw+ln+pw1+act+pw2+gamma+res]")


@pytest.fixture(scope="module")
def svc():
    """The store, bundle and client side (the service extras, absent on a bare GPU box)."""
    pytest.importorskip("sqlalchemy", reason="the store needs the service extras (sqlalchemy, alembic)")
    from test_bundle import keypair, pack
    from test_store import GPU, record
    from typer.testing import CliRunner

    from tunerd.cli import app
    from tunerd.client import BundleAnswers
    from tunerd.db import BundleError, Store
    from tunerd.db.bundle import (
        _sign,
        bundle_binaries,
        import_bundle_bytes,
        key_id,
        load_signing_key,
        load_trusted_key,
        read_bundle,
        stored_bundle,
    )

    return SimpleNamespace(
        keypair=keypair,
        pack=pack,
        GPU=GPU,
        record=record,
        CliRunner=CliRunner,
        app=app,
        BundleAnswers=BundleAnswers,
        BundleError=BundleError,
        Store=Store,
        _sign=_sign,
        bundle_binaries=bundle_binaries,
        load_signing_key=load_signing_key,
        read_bundle=read_bundle,
        import_bundle_bytes=import_bundle_bytes,
        key_id=key_id,
        load_trusted_key=load_trusted_key,
        stored_bundle=stored_bundle,
    )


@pytest.fixture(scope="module")
def exported(svc, tmp_path_factory):
    """(signed bundle bytes, public key path, private key path): a conv winner and a fused block winner, exported
    through the CLI with --arch 90 --sign (two kernels compiled for sm_90, in child processes)."""
    tmp = tmp_path_factory.mktemp("aot")
    priv, pub = svc.keypair(tmp, "ci")
    url = f"sqlite:///{tmp / 'ci.sqlite'}"
    store = svc.Store(url)
    svc.record(store, render(SPEC), 1.0, device=svc.GPU)
    store.record_block_winner(svc.GPU, BLOCK, FUSED_PLAN, {}, median_ms=1.0, spread_ms=0.05, reps=10, max_error=1e-6)
    store.close()
    out = tmp / "winners.tunerd.gz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(tmp / "exporter-triton-cache"))
        r = svc.CliRunner().invoke(
            svc.app,
            ["export", "--out", str(out), "--db", url, "--sign", str(priv), "--arch", "90"],
            catch_exceptions=False,
        )
    assert r.exit_code == 0, r.output
    assert "2 binaries for sm_90 (0 reused from the store, 2 compiled)" in r.output, r.output
    with svc.Store(url) as store:  # the export keeps what it compiled
        assert (
            sorted((b.arch, b.origin, b.binary is not None) for b in store.binaries()) == [(90, "compiled", True)] * 2
        )
    return out.read_bytes(), pub, priv


@pytest.fixture
def client_cache(tmp_path, monkeypatch):
    """A fresh Triton cache: the client machine's."""
    d = tmp_path / "client-triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(d))
    return d


def _kernels() -> list:
    from tunerd.kernels import trust

    schedules = trust.complete_schedules(BLOCK, FUSED_PLAN, {})
    return [render(SPEC), *trust.verify_plan(BLOCK, FUSED_PLAN, schedules).variants]


def _no_compiling(monkeypatch) -> None:
    """Make any compile stage fail loudly: only a cache hit gets through triton.compile."""
    from triton.backends.nvidia.compiler import CUDABackend

    def refuse(self, stages, options, language=None):
        raise AssertionError("triton.compile compiled: not a cache hit")

    monkeypatch.setattr(CUDABackend, "add_stages", refuse)


def test_a_pinned_client_installs_binaries_and_the_jit_finds_them(svc, exported, client_cache, monkeypatch):
    data, pub, _ = exported
    _installs_and_hits(svc, data, pub, client_cache, monkeypatch)


def _installs_and_hits(svc, data: bytes, pub, client_cache, monkeypatch) -> None:
    """A client pinning pub installs both binaries of the bundle data; the JIT's own compile of each is a hit."""
    answers = svc.BundleAnswers(data, trusted_keys=[pub])
    assert answers.error is None and answers.binaries == 2 and answers.binaries_note is None
    kernels = _kernels()
    inputs = [aot.launch_inputs(v, target=SM90) for v in kernels]  # the JIT's own launch of each kernel on sm_90
    assert not list(client_cache.glob("*/__grp__*"))
    assert answers.install_binaries(target=SM90) == {"installed": 2, "skipped": 0}
    _no_compiling(monkeypatch)
    before = runtime.compiles()
    for v, (src, target, options) in zip(kernels, inputs):
        k = triton.compile(src, target=target, options=options)
        assert k.hash == aot.compile_key(src, target, options) and k.asm["cubin"][:4] == b"\x7fELF", v.id
    after = runtime.compiles()
    assert after["jit_compiles"] - before["jit_compiles"] == 0  # zero JIT compiles at job start
    assert after["jit_cache_hits"] - before["jit_cache_hits"] == 2
    group = json.loads(next(client_cache.glob("*/__grp__tunerd_conv2d_fwd.json")).read_text())
    assert all(p.startswith(str(client_cache)) for p in group["child_paths"].values())  # local paths, not the CI's


def test_binaries_are_keyed_by_target_triton_environment_and_source(svc, exported, client_cache, monkeypatch):
    data, pub, _ = exported
    env = svc.read_bundle(data)
    binaries = {b.variant_id: b for b in svc.bundle_binaries(env)}
    v = render(SPEC)
    b = binaries[v.id]
    assert (b.arch, b.triton_version, b.source_sha256) == (90, triton.__version__, aot.source_sha256(v))
    assert not aot.install(b, v, target=SM80)  # another arch: this process's key differs
    assert not aot.install(replace(b, key="0" * 64, triton_version="3.6.0"), v, target=SM90)  # another Triton build
    other = next(o for o in _kernels() if o.id != v.id)
    assert not aot.install(b, other, target=SM90)  # not this kernel's rendering
    with monkeypatch.context() as mp:
        mp.setenv("TRITON_DEFAULT_FP_FUSION", "0")  # a cache-invalidating Triton setting the exporter did not have
        assert not aot.install(b, v, target=SM90)
    assert not list(client_cache.glob("*/*"))  # nothing written
    assert aot.install(b, v, target=SM90) and aot.installed(b)


def test_a_tampered_binary_is_refused_and_nothing_installed(svc, exported, client_cache, tmp_path):
    data, pub, priv = exported
    env = json.loads(gzip.decompress(data))
    entry = env["payload"]["binaries"][0]
    cubin = next(n for n in entry["files"] if n.endswith(".cubin"))
    raw = bytearray(base64.b64decode(entry["files"][cubin]["data"]))
    raw[len(raw) // 2] ^= 0x01
    entry["files"][cubin]["data"] = base64.b64encode(bytes(raw)).decode()
    resealed = svc.pack(env)  # checksum recomputed: the signature no longer verifies, the whole bundle is refused
    answers = svc.BundleAnswers(resealed, trusted_keys=[pub])
    assert answers.error and "does not verify" in answers.error and answers.binaries == 0
    # the signer's own manifest disagreeing with a file (re-signed after the edit): binaries refused, winners kept
    env["signature"] = svc._sign(svc.load_signing_key(priv), env["sha256"])
    answers = svc.BundleAnswers(svc.pack(env), trusted_keys=[pub])
    assert answers.error is None and len(answers) == 1 and answers.binaries == 0
    assert "does not match its sha256" in (answers.binaries_note or "")
    assert answers.install_binaries(target=SM90) == {"installed": 0, "skipped": 0}
    assert not client_cache.exists() or not list(client_cache.glob("*/*"))
    with pytest.raises(aot.AotError, match="does not match its sha256"):
        aot.Binary.from_portable(entry)


def test_unsigned_or_unpinned_bundles_never_install_binaries(svc, exported, client_cache, tmp_path):
    data, pub, _ = exported
    env = json.loads(gzip.decompress(data))
    del env["signature"]
    unsigned = svc.pack(env)
    for bundle, keys in ((unsigned, []), (data, [])):  # unsigned; signed but no key pinned by this client
        answers = svc.BundleAnswers(bundle, trusted_keys=keys)
        assert answers.error is None and len(answers) == 1  # its winners still answer, re-rendered as today
        assert answers.binaries == 0 and "not signed by a pinned key" in answers.binaries_note
        assert answers.install_binaries(target=SM90) == {"installed": 0, "skipped": 0}
    _, stranger = svc.keypair(tmp_path, "stranger")
    assert svc.BundleAnswers(data, trusted_keys=[stranger]).binaries == 0  # signed by a key this client does not pin
    assert not client_cache.exists() or not list(client_cache.glob("*/*"))


def test_binary_entries_are_bounded_and_checked(svc, exported):
    env = svc.read_bundle(exported[0])
    with pytest.raises(svc.BundleError, match="more than the limit of 1"):
        svc.bundle_binaries(env, max_count=1)
    with pytest.raises(svc.BundleError, match="exceed 1000 bytes"):
        svc.bundle_binaries(env, max_bytes=1000)
    entry = env["payload"]["binaries"][0]
    cubin = next(n for n in entry["files"] if n.endswith(".cubin"))
    cases = {
        "path": {**entry, "files": {**entry["files"], "../evil.cubin": entry["files"][cubin]}},
        "name": {**entry, "name": "../x"},
        "key": {**entry, "key": "zz"},
        "extra": {**entry, "shell": "rm -rf /"},
        "arch": {**entry, "arch": "90"},
    }
    for d in cases.values():
        with pytest.raises(aot.AotError):
            aot.Binary.from_portable(d)
        bad = json.loads(json.dumps(env))
        bad["payload"]["binaries"][0] = d
        with pytest.raises(svc.BundleError):
            svc.bundle_binaries(bad)
    with pytest.raises(aot.AotError, match="larger than"):
        aot.Binary.from_portable(entry, max_file_bytes=16)


def test_the_key_is_the_one_a_real_launch_specializes_on(tmp_path, monkeypatch):
    """Meta-device example arguments specialize like a launch's real tensors (types, 16-byte alignment); the key
    depends neither on the batch size nor on where this process keeps its kernel sources."""
    v = render(SPEC)
    x = torch.randn(SPEC.n, SPEC.c, *SPEC.in_size)
    w = torch.randn(SPEC.k, SPEC.c, *SPEC.kernel)
    out = torch.full((SPEC.n, *SPEC.out_size, SPEC.k), float("nan"))
    real = conv.forward_args(SPEC, x, w, conv.EpilogueArgs(), out)
    key = aot.cache_key(v, target=SM90)
    assert aot.cache_key(v, real, target=SM90) == key
    monkeypatch.setenv("TUNERD_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert aot.cache_key(v, target=SM90) == key
    assert aot.cache_key(v, target=SM80) != key
    other_batch = render(SPEC.with_(n=3), v.schedule)  # n is a launch argument: one binary serves every batch
    assert other_batch.id == v.id and aot.cache_key(other_batch, target=SM90) == key
    misaligned = {**real, "out_ptr": out.view(-1)[1:]}  # a pointer off 16 bytes specializes (and compiles) anew
    assert aot.cache_key(v, misaligned, target=SM90) != key


def test_describe_renders_the_same_kernels_again():
    for v in _kernels():
        assert aot.rendered(json.loads(json.dumps(aot.describe(v)))).id == v.id


# ---- binaries kept in the store ------------------------------------------------------------------------
def _import(svc, tmp_path, name: str, data: bytes, keys=()):
    """A fresh store that imported data with keys (public key files) pinned: (store, report)."""
    store = svc.Store(f"sqlite:///{tmp_path / name}.sqlite")
    return store, svc.import_bundle_bytes(store, data, trusted_keys=[svc.load_trusted_key(k) for k in keys])


def _resigned(svc, data: bytes, priv, edit) -> bytes:
    """data with edit(env) applied, checksum and signature made again by the signer (its manifest is what it says)."""
    env = json.loads(gzip.decompress(data))
    edit(env)
    packed = json.loads(gzip.decompress(svc.pack(env)))
    packed["signature"] = svc._sign(svc.load_signing_key(priv), packed["sha256"])
    return svc.pack(packed, reseal=False)


def _flip_cubin(entry: dict) -> None:
    cubin = next(n for n in entry["files"] if n.endswith(".cubin"))
    raw = bytearray(base64.b64decode(entry["files"][cubin]["data"]))
    raw[len(raw) // 2] ^= 0x01
    entry["files"][cubin]["data"] = base64.b64encode(bytes(raw)).decode()


def test_an_import_keeps_binaries_only_from_a_bundle_signed_by_a_pinned_key(svc, exported, tmp_path):
    data, pub, priv = exported
    env = json.loads(gzip.decompress(data))
    del env["signature"]
    for name, bundle, keys in (("unpinned", data, ()), ("unsigned", svc.pack(env), ())):
        store, report = _import(svc, tmp_path, name, bundle, keys)
        assert report.added == 1 and report.blocks_added == 1  # its winners are imported as claims
        assert report.binaries == 0 and "not signed by a pinned key" in report.binaries_note
        assert store.binaries() == []
    path = tmp_path / "ci.bundle"
    path.write_bytes(data)
    url = f"sqlite:///{tmp_path / 'pinned.sqlite'}"
    r = svc.CliRunner().invoke(svc.app, ["import", str(path), "--db", url, "--trusted-key", str(pub)])
    assert r.exit_code == 0 and "2 binaries kept" in r.output, r.output
    with svc.Store(url) as store:
        rows = store.binaries()
        signer = svc.key_id(svc.load_trusted_key(pub))
        assert {(b.origin, b.signed_by, b.arch) for b in rows} == {
            (f"bundle:{svc.read_bundle(data)['sha256']}", signer, 90)
        }
        assert sorted(b.variant_id for b in rows) == sorted(v.id for v in _kernels()) and all(b.binary for b in rows)
    # the pinned signer's bundle disagreeing with itself is refused whole: no winner, no binary
    edits = {
        "does not match its sha256": lambda e: _flip_cubin(e["payload"]["binaries"][0]),
        "not this process's rendering": lambda e: e["payload"]["binaries"][0].update(source_sha256="ab" * 32),
        "not one of the bundle's kernels": lambda e: e["payload"]["binaries"][0].update(variant_id="f" * 24),
    }
    for i, (why, edit) in enumerate(edits.items()):
        store = svc.Store(f"sqlite:///{tmp_path / f'refused{i}'}.sqlite")
        with pytest.raises(svc.BundleError, match=why):
            svc.import_bundle_bytes(store, _resigned(svc, data, priv, edit), trusted_keys=[svc.load_trusted_key(pub)])
        assert store.winners() == [] and store.block_winners() == [] and store.binaries() == []
    # keeping the binaries fails as the import writes: what it wrote before is taken back
    from tunerd.db.binaries import BinaryStore

    def full(*a, **k):
        raise svc.BundleError("disk full")

    store = svc.Store(f"sqlite:///{tmp_path / 'full'}.sqlite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BinaryStore, "_add_binaries", full)
        with pytest.raises(svc.BundleError, match="disk full"):
            svc.import_bundle_bytes(store, data, trusted_keys=[svc.load_trusted_key(pub)])
    assert store.winners() == [] and store.block_winners() == [] and store.binaries() == []


def test_a_reexport_reuses_kept_binaries_and_its_clients_get_cache_hits(
    svc, exported, tmp_path, client_cache, monkeypatch
):
    """A store that imported CI's binaries exports them again without compiling (2 reused, 0 compiled, nothing
    written to the exporter's Triton cache), and a client of the re-export loads them with zero JIT compiles."""
    data, pub, priv = exported
    store, report = _import(svc, tmp_path, "cluster", data, [pub])
    assert report.binaries == 2
    store.close()
    out = tmp_path / "again.tunerd.gz"
    exporter_cache = tmp_path / "exporter2-triton-cache"
    with monkeypatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(exporter_cache))
        r = svc.CliRunner().invoke(
            svc.app,
            ["export", "--out", str(out), "--db", f"sqlite:///{tmp_path / 'cluster'}.sqlite", "--sign", str(priv)]
            + ["--arch", "90"],
            catch_exceptions=False,
        )
    assert r.exit_code == 0 and "2 binaries for sm_90 (2 reused from the store, 0 compiled)" in r.output, r.output
    bad = svc.CliRunner().invoke(svc.app, ["export", "--out", str(tmp_path / "x"), "--db", "sqlite://", "--arch", "9"])
    assert bad.exit_code != 0 and "arch must be a CUDA compute capability" in bad.output, bad.output
    assert not list(exporter_cache.glob("*/*.cubin"))  # no compile ran
    _installs_and_hits(svc, out.read_bytes(), pub, client_cache, monkeypatch)
    # a kept binary serves only under the key this process computes: the others are compiled
    v = render(SPEC)
    b = next(b for b in svc.bundle_binaries(svc.read_bundle(data)) if b.variant_id == v.id)
    compiled = []
    monkeypatch.setattr(aot, "_compile_in_children", lambda items, jobs, timeout: (compiled.extend(items), [], [])[1:])
    built = aot.build_or_reuse([v], [90, 80], {(v.id, 90): [replace(b, key="0" * 64), b], (v.id, 80): [b]})
    assert built.reused == [b] and [(d["id"], d["arch"]) for d in compiled] == [(v.id, 80)]
    assert aot.build_or_reuse([v], [90], {(v.id, 90): [replace(b, key="0" * 64)]}).reused == []
    assert [d["arch"] for d in compiled] == [80, 90]


def test_a_damaged_kept_binary_is_never_shipped(svc, exported, tmp_path):
    data, pub, priv = exported
    store, _ = _import(svc, tmp_path, "cluster", data, [pub])
    key = svc.load_signing_key(priv)
    good = {b.variant_id: b.binary for b in store.binaries()}

    def shipped() -> tuple[list[str], list[str], dict]:
        out = svc.stored_bundle(store, provenance={}, signing_key=key, arches=[90])
        env = svc.read_bundle(out.data, trusted_keys=[svc.load_trusted_key(pub)])
        assert out.binaries == len(env["payload"]["binaries"])
        return [b.variant_id for b in svc.bundle_binaries(env)], [v.id for v, _ in out.missing], env

    conv_id, fused_id = render(SPEC).id, next(v.id for v in _kernels() if v.id != render(SPEC).id)
    assert sorted(shipped()[0]) == sorted(good) and shipped()[1] == []
    with sqlite3.connect(tmp_path / "cluster.sqlite") as raw:  # a blob and a row edited behind the store's back
        cubin = (
            "SELECT f.sha256, c.data FROM binary_files f JOIN binaries r ON r.id = f.binary_id JOIN blob_chunks c "
            "ON c.sha256 = f.sha256 AND c.seq = 0 WHERE r.variant_id = ? AND f.name LIKE '%.cubin'"
        )
        sha, data = raw.execute(cubin, (conv_id,)).fetchone()
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        raw.execute("UPDATE blob_chunks SET data = ? WHERE sha256 = ? AND seq = 0", (bytes(flipped), sha))
        raw.execute("UPDATE binaries SET source_sha256 = ? WHERE variant_id = ?", ("ab" * 32, fused_id))
    problem = {b.variant_id: b.problem for b in store.binaries()}
    assert "does not match its sha256" in problem[conv_id] and problem[fused_id] is None  # a plausible row ...
    ids, missing, env = shipped()
    assert ids == [] and sorted(missing) == sorted(good)  # ... but not this process's rendering: neither ships
    listed = env["payload"]["provenance"]["binaries"]
    assert listed["clients_compile"] == 2 and sorted(listed["clients_compile_kernels"]) == sorted(
        f"{i}@sm_90" for i in good
    )
    assert store.add_binaries(list(good.values())) == 2  # what checks out replaces a damaged row under its key
    assert sorted(shipped()[0]) == sorted(good) and len(store.binaries()) == 2


def test_the_bundle_endpoint_ships_kept_binaries_signed_and_never_compiles(svc, exported, tmp_path, monkeypatch):
    """GET /v1/bundle?arch=: 422 without a signing key or for a bad arch; else the kept binaries, signed, and the
    kernels without one named and handed to the idle worker, which compiles (here: a stand-in for aot's compile
    that records its thread) and keeps them for the next request."""
    from daemon import live, wait_for

    from tunerd.worker import JobWorker

    data, pub, priv = exported
    store, _ = _import(svc, tmp_path, "daemon", data, [pub])
    good = {b.variant_id: b.binary for b in store.binaries()}
    conv_id = render(SPEC).id
    store.add_binaries([replace(good[conv_id], source_sha256="ab" * 32)])  # not the rendering: never shipped
    calls = []

    def compile_stand_in(variants, arches, stored=None, *, jobs=None, timeout=3600.0):
        calls.append((threading.current_thread().name, sorted(v.id for v in variants), list(arches), timeout))
        return aot.Built([], [good[v.id] for v in variants], [])

    monkeypatch.setattr(aot, "build_or_reuse", compile_stand_in)
    with live(store) as (_, http):
        r = http.get("/v1/bundle", params={"arch": 90})
        assert r.status_code == 422 and "no signing key" in r.json()["detail"] and "unsigned" in r.json()["detail"]
        assert http.get("/v1/bundle").status_code == 200  # without arch: as before
    worker = JobWorker(store, verify_claims=False, revalidate=False, tune_misses=False, poll_s=0.05, aot_timeout_s=30)
    with live(store, worker, signing_key=str(priv)) as (_, http):
        for bad in ({"arch": 9000}, {"arch": "sm90"}, {"arch": -1}, {"arch": list(range(80, 89))}):
            assert http.get("/v1/bundle", params=bad).status_code == 422, bad
        r = http.get("/v1/bundle", params={"arch": [90, 90]})
        assert r.status_code == 200, r.text
        h = r.headers
        assert (h["x-tunerd-binaries"], h["x-tunerd-clients-compile"], h["x-tunerd-binaries-queued"]) == ("1", "1", "1")
        env = svc.read_bundle(r.content, trusted_keys=[svc.load_trusted_key(pub)])  # signed by the daemon's key
        assert [b.variant_id for b in svc.bundle_binaries(env)] == [i for i in good if i != conv_id]
        assert env["payload"]["provenance"]["binaries"]["clients_compile_kernels"] == [f"{conv_id}@sm_90"]
        wait_for(lambda: all(b.problem is None for b in store.binaries()) and calls, what="the worker's compile")
        wait_for(lambda: http.get("/v1/bundle", params={"arch": 90}).headers["x-tunerd-binaries"] == "2", what="2")
        assert http.get("/v1/bundle", params={"arch": 90}).headers["x-tunerd-clients-compile"] == "0"
    assert [(c[1], c[2]) for c in calls] == [([conv_id], [90])] and calls[0][3] <= 30
    assert all(c[0].startswith("tunerd-worker") for c in calls)  # compiled in the worker, never in a request


def test_migration_0005_adds_the_binaries_table_to_an_existing_store(svc, exported, tmp_path):
    from alembic import command

    from tunerd.db import engine as db_engine

    url = f"sqlite:///{tmp_path / 'v4.sqlite'}"
    engine = db_engine.create(url)
    with engine.connect().execution_options(**{db_engine.WRITE: True}) as conn, conn.begin():
        command.upgrade(db_engine._alembic_config(conn), "0004")  # a store written by the previous tunerd
    engine.dispose()
    v = render(SPEC)
    with sqlite3.connect(tmp_path / "v4.sqlite") as raw:
        assert raw.execute("SELECT version_num FROM alembic_version").fetchone() == ("0004",)
    with svc.Store(url) as store:
        assert store.revision == db_engine.head_revision()
        svc.record(store, v, 2.0, device=svc.GPU)
        binaries = svc.bundle_binaries(svc.read_bundle(exported[0]))
        assert store.add_binaries(binaries) == 2 and len(store.binaries([v.id], [90])) == 1
    with svc.Store(url) as store:  # reopened at head: rows intact
        assert store.winner(svc.GPU, SPEC).median_ms == 2.0 and store.binaries([v.id])[0].binary == next(
            b for b in binaries if b.variant_id == v.id
        )


def test_binaries_are_kept_and_shipped_on_postgresql(svc, exported, pg_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tunerd.db import engine as db_engine
    from tunerd.db.tables import Base

    data, pub, priv = exported
    with svc.Store(pg_url) as store:
        with db_engine.create(pg_url).connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert svc.import_bundle_bytes(store, data, trusted_keys=[svc.load_trusted_key(pub)]).binaries == 2
        good = [b.binary for b in store.binaries()]
        assert svc.import_bundle_bytes(store, data, trusted_keys=[svc.load_trusted_key(pub)]).binaries == 2
        assert len(store.binaries()) == 2  # kept once per (variant, arch, key)
        store.add_binaries([replace(good[0], source_sha256="ab" * 32)])  # a damaged row under the same key ...
        out = svc.stored_bundle(store, provenance={}, signing_key=svc.load_signing_key(priv), arches=[90])
        assert out.binaries == 1 and [v.id for v, _ in out.missing] == [good[0].variant_id]  # ... is not shipped
        store.add_binaries(good)
        out = svc.stored_bundle(store, provenance={}, signing_key=svc.load_signing_key(priv), arches=[90])
        assert out.binaries == 2 and out.missing == ()


@pytest.mark.gpu
def test_an_installed_binary_launches_without_compiling(tmp_path, monkeypatch):
    """On CUDA: build a binary in a child (as CI does), install it into a fresh Triton cache, then the first
    launch of a kernel this process never ran compiles nothing and matches the float64 reference."""
    rnd = random.Random(os.getpid())
    c, k, size = rnd.choice((24, 40)), rnd.choice((48, 56)), rnd.choice((9, 11))
    x = torch.randn(2, c, size, size, device="cuda")
    w = torch.randn(k, c, 3, 3, device="cuda") / (9 * c) ** 0.5
    ep = conv.EpilogueArgs()
    spec = conv.make_spec(x, w, 2, 1, 1, 1, 1, ep)
    v = conv.choose_variant(spec, x.device, None)
    major, minor = torch.cuda.get_device_capability()
    (binary,), errors = aot.build_all([v], [major * 10 + minor], jobs=1)
    assert not errors
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert aot.install(binary, v)
    out = torch.full((2, size, size, k), float("nan"), device="cuda")
    before = runtime.compiles()
    y = conv.run_forward(spec, x, w, ep, out=out).y
    torch.cuda.synchronize()
    after = runtime.compiles()
    assert (after["jit_compiles"] - before["jit_compiles"], after["jit_cache_hits"] - before["jit_cache_hits"]) == (
        0,
        1,
    )
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-4, err  # precision "ieee": fp32 products
