"""Bundles: round trip between stores, conflict resolution (imported timings are claims), signatures, and
every rejection path leaving the store exactly as it was."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import replace

import pytest

pytest.importorskip("sqlalchemy", reason="the store needs the service extras (sqlalchemy, alembic)")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from test_store import DEV, DW, GPU, SPEC, record, state, variants  # noqa: E402

from tunerd.db import BundleError, Store, variant_id  # noqa: E402
from tunerd.db.bundle import (  # noqa: E402
    FORMAT,
    VERSION,
    _canonical,
    bundle_bytes,
    export_bundle,
    import_bundle,
    import_bundle_bytes,
    key_id,
    load_signing_key,
    load_trusted_key,
    read_bundle,
)
from tunerd.kernels import GENERATOR_VERSION, generator  # noqa: E402

PROV = {"tunerd": "0.1.0", "strategy": "halving", "budget": {"trials": 8}, "ci_run": 42}


def sqlite_store(tmp_path, name: str) -> Store:
    return Store(f"sqlite:///{tmp_path / name}.sqlite")


@pytest.fixture
def source(tmp_path):
    """A store with winners for two specs on the interpreter and one on a GPU, with ratios set."""
    s = sqlite_store(tmp_path, "ci")
    v, d = variants(), variants(DW, 2)
    record(s, v[0], 3.0)
    record(s, v[1], 2.0, strategy="exhaustive")
    s.set_winner_stats(DEV, SPEC, speedup_vs_default=1.5, fraction_of_roofline=0.1)
    record(s, d[0], 1.0)
    record(s, v[2], 0.02, device=GPU)
    yield s
    s.close()


def envelope(data: bytes) -> dict:
    return json.loads(gzip.decompress(data))


def pack(env: dict, *, reseal: bool = True) -> bytes:
    """Re-encode an edited envelope; reseal recomputes the checksum (a well-formed but wrong bundle)."""
    if reseal:
        env["sha256"] = hashlib.sha256(_canonical(env["payload"])).hexdigest()
    return gzip.compress(_canonical(env))


def test_round_trip_carries_exact_source_numbers_and_provenance(source, tmp_path):
    path = tmp_path / "out" / "winners.tunerd.gz"
    summary = export_bundle(source, path, provenance=PROV)
    assert (summary.winners, summary.devices, summary.skipped_stale) == (3, 2, 0)
    assert summary.bytes == path.stat().st_size and path.read_bytes()[:2] == b"\x1f\x8b"
    assert [p.name for p in path.parent.iterdir()] == ["winners.tunerd.gz"]  # no temp file left behind
    env = read_bundle(path.read_bytes())
    assert (env["format"], env["version"], env["sha256"]) == (FORMAT, VERSION, summary.sha256)
    dest = sqlite_store(tmp_path, "cluster")
    report = import_bundle(dest, path)
    assert (report.winners, report.added, report.replaced, report.kept, report.unchanged) == (3, 3, 0, 0, 0)
    assert report.provenance == PROV and report.generator_version == GENERATOR_VERSION
    assert report.devices == tuple(sorted({DEV.digest, GPU.digest}))
    json.dumps(report.to_dict()), json.dumps(summary.to_dict())
    local = {(w.device_key, w.spec.key): w for w in source.winners()}
    for w in dest.winners():
        x = local[(w.device_key, w.spec.key)]
        assert (
            w.source,
            w.schedule,
            w.variant_id,
            w.median_ms,
            w.spread_ms,
            w.reps,
            w.max_error,
            w.strategy,
            w.created_at,
            w.speedup_vs_default,
            w.fraction_of_roofline,
        ) == (
            x.source,
            x.schedule,
            x.variant_id,
            x.median_ms,
            x.spread_ms,
            x.reps,
            x.max_error,
            x.strategy,
            x.created_at,
            x.speedup_vs_default,
            x.fraction_of_roofline,
        )
        assert w.origin == f"bundle:{summary.sha256}" and w.claimed and not x.claimed
    again = import_bundle(dest, path)  # idempotent
    assert (again.unchanged, again.added) == (3, 0) and dest.trial_counts()["ok"] == 3


def test_export_filters_by_device_and_snapshot(source):
    only_gpu = read_bundle(bundle_bytes(source, device=GPU, provenance=PROV))["payload"]["winners"]
    assert [w["median_ms"] for w in only_gpu] == [0.02]
    pinned = source.create_snapshot("release")
    record(source, variants()[3], 0.5)  # tuning moves on after the snapshot
    snap = read_bundle(bundle_bytes(source, snapshot=pinned, provenance=PROV))["payload"]
    assert snap["snapshot"] == "release" and sorted(w["median_ms"] for w in snap["winners"]) == [0.02, 1.0, 2.0]
    live = read_bundle(bundle_bytes(source, provenance=PROV))["payload"]["winners"]
    assert sorted(w["median_ms"] for w in live) == [0.02, 0.5, 1.0]


def test_a_local_measurement_beats_any_claim_and_claims_compete_by_time(source, tmp_path):
    data = bundle_bytes(source, provenance=PROV)
    dest = sqlite_store(tmp_path, "cluster")
    v, d = variants(), variants(DW, 2)
    record(dest, v[4], 1.0)  # SPEC on DEV: local 1.0, the bundle claims 2.0
    record(dest, d[1], 5.0)  # DW on DEV: local 5.0, the bundle claims 1.0: still only a claim
    record(dest, v[5], 0.01, device=GPU)  # SPEC on GPU: local 0.01, claimed 0.02
    report = import_bundle_bytes(dest, data)
    assert (report.added, report.replaced, report.kept) == (0, 0, 3)
    best = {(w.device_key, w.spec.key): (w.variant_id, w.median_ms, w.claimed) for w in dest.winners()}
    assert best == {
        (DEV.key, SPEC.key): (v[4].id, 1.0, False),
        (DEV.key, DW.key): (d[1].id, 5.0, False),
        (GPU.key, SPEC.key): (v[5].id, 0.01, False),
    }
    # Among claims, the faster claimed time wins; the first claim on an empty store is added.
    fresh = sqlite_store(tmp_path, "fresh")
    assert import_bundle_bytes(fresh, data).added == 3
    faster = sqlite_store(tmp_path, "ci2")
    record(faster, v[3], 1.5)  # another CI run claims SPEC faster (1.5 < 2.0) ...
    record(faster, d[1], 4.0)  # ... and DW slower (4.0 > 1.0)
    report = import_bundle_bytes(fresh, bundle_bytes(faster, provenance=PROV))
    assert (report.added, report.replaced, report.kept) == (0, 1, 1)
    w = fresh.winner(DEV, SPEC)
    assert (w.variant_id, w.median_ms, w.claimed) == (v[3].id, 1.5, True)
    assert fresh.winner(DEV, DW).variant_id == d[0].id
    # A local measurement replaces a claim whatever the claimed time (here 1.5 ms claimed, 7 ms real).
    record(fresh, v[6], 7.0)
    w = fresh.winner(DEV, SPEC)
    assert (w.variant_id, w.median_ms, w.claimed, w.origin) == (v[6].id, 7.0, False, None)
    assert {c.variant_id for c in fresh.claims(DEV, SPEC)} == {v[1].id, v[3].id}  # still to be verified


def test_a_variant_found_wrong_here_is_not_revived_by_a_bundle(source, tmp_path):
    dest = sqlite_store(tmp_path, "cluster")
    v1 = variants()[1]
    dest.record_trial(
        DEV, SPEC, v1.schedule, v1.source, status="wrong-result", median_ms=None, spread_ms=None, reps=0, max_error=3.0
    )
    report = import_bundle_bytes(dest, bundle_bytes(source, provenance=PROV))
    assert report.kept == 1 and dest.winner(DEV, SPEC) is None


def _edit(fn):
    def make(data: bytes) -> bytes:
        env = envelope(data)
        return fn(env)

    return make


def _winner0(edit):
    def fn(env):
        edit(env["payload"]["winners"][0])
        return pack(env)

    return _edit(fn)


def _flip_middle(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


def _faster_without_reseal(env):
    env["payload"]["winners"][0]["median_ms"] = 0.0001  # someone edits a time by hand
    return pack(env, reseal=False)


def _other_generator(env):
    env["payload"]["generator_version"] = "0.0.1"
    return pack(env)


def _swap_spec(w):
    w["spec"] = DW.to_dict()  # a well-formed entry whose source belongs to another spec


def _payload(w):
    """Code appended to a genuine source, with the variant id recomputed to match (the checksum is resealed)."""
    w["source"] += "\nimport os\nos.system('touch /tmp/pwned')\n"
    w["variant_id"] = variant_id(w["source"])
    w["median_ms"] = 1e-6


def _headless_other_spec(w):
    """Another spec's kernel with its header stripped, claimed for this winner's spec under a fresh id."""
    other = variants(DW, 1)[0].source
    w["source"] = "\n".join(other.split("\n")[3:])
    w["variant_id"] = variant_id(w["source"])


REJECTS = {
    "not gzip": (lambda d: b"PK\x03\x04 a zip file", "not gzip data"),
    "corrupt bytes": (_flip_middle, "corrupt bundle|truncated bundle"),
    "bad CRC": (lambda d: d[:-8] + bytes([d[-8] ^ 1]) + d[-7:], "corrupt bundle.*incorrect data check"),
    "truncated gzip": (lambda d: d[: len(d) // 2], "truncated bundle"),
    "trailing garbage": (lambda d: d + b"junk", "unexpected bytes after"),
    "not JSON": (lambda d: gzip.compress(b"hello, world"), "not JSON"),
    "JSON but not an object": (lambda d: gzip.compress(b"[1, 2]"), "JSON is a list"),
    "wrong format name": (_edit(lambda e: pack({**e, "format": "other-tool-cache"})), "format is 'other-tool-cache'"),
    "newer version": (_edit(lambda e: pack({**e, "version": VERSION + 1})), "newer than this tunerd"),
    "no version": (_edit(lambda e: pack({**e, "version": "1"})), "no valid format version"),
    "checksum mismatch": (_edit(_faster_without_reseal), "checksum mismatch"),
    "generator mismatch": (_edit(_other_generator), "generator '0.0.1'"),
    "entry from another generator": (
        _winner0(lambda w: w["device"].update(generator_version="0.0.1")),
        "measured with generator '0.0.1'",
    ),
    "malformed winner": (_winner0(lambda w: w.pop("source")), "winner 0 is malformed: winner is missing"),
    "negative time": (_winner0(lambda w: w.update(median_ms=-1.0)), "median_ms"),
    "altered source": (
        _winner0(lambda w: w.update(source=w["source"] + "\n# edited\n")),
        "winner 0 .*not this tunerd's rendering",
    ),
    "payload with a recomputed id": (_winner0(_payload), "not this tunerd's rendering"),
    "headless source of another spec": (_winner0(_headless_other_spec), "not this tunerd's rendering"),
    "id that is not the source's hash": (_winner0(lambda w: w.update(variant_id="0" * 24)), "claimed variant id"),
    "source of another spec": (_winner0(_swap_spec), "not this tunerd's rendering of depthwise2d"),
    "illegal schedule": (_winner0(lambda w: w["schedule"].update(block_m=24)), "not legal"),
    "a spec too costly to render": (
        _winner0(lambda w: w["spec"].update(op="dgrad", stride=[10**6, 10**6])),
        "exceeds the limit",
    ),
}


@pytest.mark.parametrize("case", REJECTS, ids=list(REJECTS))
def test_bad_bundles_are_rejected_and_change_nothing(source, tmp_path, case):
    damage, message = REJECTS[case]
    data = damage(bundle_bytes(source, provenance=PROV))
    dest = sqlite_store(tmp_path, "cluster")
    record(dest, variants()[6], 9.0)
    dest.create_snapshot("before")
    before = state(dest)
    with pytest.raises(BundleError, match=message):
        import_bundle_bytes(dest, data)
    assert state(dest) == before


def test_a_failure_late_in_the_merge_rolls_back_the_earlier_winners(source, tmp_path):
    env = envelope(bundle_bytes(source, provenance=PROV))
    _swap_spec(env["payload"]["winners"][-1])  # entries 0..n-2 are fine and merge first
    dest = sqlite_store(tmp_path, "cluster")
    before = state(dest)
    with pytest.raises(BundleError, match="winner 2"):
        import_bundle_bytes(dest, pack(env))
    assert state(dest) == before and dest.trial_counts()["ok"] == 0


def test_export_is_atomic_and_reports_bad_input(source, tmp_path):
    path = tmp_path / "b.gz"
    first = export_bundle(source, path, provenance=PROV)
    old = path.read_bytes()
    with pytest.raises(BundleError, match="JSON-serialisable"):
        export_bundle(source, path, provenance={"when": object()})
    with pytest.raises(BundleError, match="must be a dict"):
        export_bundle(source, path, provenance="ci")
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert export_bundle(source, path, provenance=PROV).sha256 != first.sha256  # a new export time
    with pytest.raises(BundleError, match="cannot read bundle"):
        import_bundle(source, tmp_path / "missing.gz")


def test_winners_of_an_older_generator_are_not_exported(source, monkeypatch):
    v = variants()[7]
    old = replace(DEV, generator_version="0.0.1-old")
    with monkeypatch.context() as m:  # what an older tunerd sharing this database recorded
        m.setattr(generator, "GENERATOR_VERSION", "0.0.1-old")
        generator.clear_render_cache()
        src = generator.render(SPEC, v.schedule).source
        assert src.startswith("# Generated by tunerd 0.0.1-old")
        source.record_trial(
            old, SPEC, v.schedule, src, status="ok", median_ms=0.5, spread_ms=0.0, reps=3, max_error=0.0
        )
    generator.clear_render_cache()
    data = bundle_bytes(source, provenance=PROV)
    assert {w["device"]["generator_version"] for w in read_bundle(data)["payload"]["winners"]} == {GENERATOR_VERSION}
    assert len(read_bundle(data)["payload"]["winners"]) == 3


# ---- signatures ------------------------------------------------------------------------------------------
def keypair(tmp_path, name: str) -> tuple:
    """(private key path, public key path) of a fresh ed25519 key, as `openssl genpkey`/`pkey -pubout` write."""
    key = Ed25519PrivateKey.generate()
    priv, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub


def test_signed_bundles_and_a_pinned_key(source, tmp_path):
    priv, pub = keypair(tmp_path, "ci")
    _, other = keypair(tmp_path, "someone-else")
    signed = bundle_bytes(source, provenance=PROV, signing_key=load_signing_key(priv))
    unsigned = bundle_bytes(source, provenance=PROV)
    trusted = [load_trusted_key(pub)]
    assert read_bundle(signed, trusted_keys=trusted)["signed_by"] == key_id(trusted[0])
    assert read_bundle(signed)["signed_by"] == key_id(trusted[0]) and read_bundle(unsigned)["signed_by"] is None
    dest = sqlite_store(tmp_path, "cluster")
    before = state(dest)
    with pytest.raises(BundleError, match="not signed.*trusted key"):
        import_bundle_bytes(dest, unsigned, trusted_keys=trusted)
    with pytest.raises(BundleError, match="not a trusted key"):
        import_bundle_bytes(dest, signed, trusted_keys=[load_trusted_key(other)])
    env = envelope(signed)  # a payload edited after signing, resealed: the checksum fits, the signature not
    env["payload"]["winners"][0]["median_ms"] = 1e-6
    with pytest.raises(BundleError, match="does not verify"):
        import_bundle_bytes(dest, pack(env))
    with pytest.raises(BundleError, match="does not verify"):
        import_bundle_bytes(dest, pack(env), trusted_keys=trusted)
    env = envelope(signed)
    env["signature"]["key"] = "not base64!"
    with pytest.raises(BundleError, match="signature is malformed"):
        import_bundle_bytes(dest, pack(env))
    assert state(dest) == before
    report = import_bundle_bytes(dest, signed, trusted_keys=trusted)
    assert report.signed_by == key_id(trusted[0]) and report.added == 3
    with pytest.raises(BundleError, match="not an ed25519 public key"):
        load_trusted_key(priv)
    with pytest.raises(BundleError, match="cannot read key file"):
        load_signing_key(tmp_path / "missing.pem")
