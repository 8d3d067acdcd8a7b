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
    from tunerd.db.bundle import _sign, bundle_binaries, load_signing_key, read_bundle

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
    assert "2 binaries for sm_90" in r.output, r.output
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
