"""Bundle: a versioned, checksummed file of winners with their exact source, for CI -> cluster.

File = gzip of canonical JSON {"format": "tunerd-bundle", "version": 1, "sha256": <hex>, "payload": {...}}
where sha256 is taken over the canonical JSON of payload = {generator_version, exported_at, snapshot,
provenance, winners: [WinnerRow.portable(), ...], block_winners: [BlockWinnerRow.portable(), ...]}, plus an
optional "signature" {"alg": "ed25519", "key": <base64 raw public key>, "sig": <base64>} over
SIGNED_CONTEXT + the payload's sha256 digest (so it covers block winners too).
Import verifies everything before touching the store, then merges in short transactions and takes
back what it wrote if one fails (Store.ingest): any failure leaves the store as it was. A bundle is a
set of claims: each winner's source must be this tunerd's own rendering of its (spec, schedule), and
its timing stays a claim until measured here. A block winner carries a plan and one schedule per fused
step, never source: import re-checks and re-renders it (kernels.trust.verify_plan) as a read of the
store does. A reader without block winners (an older tunerd) ignores them. With trusted keys pinned,
only bundles signed by one of them are read: keys given to the importer or the client, else
$TUNERD_TRUSTED_KEYS (pinned_keys).

Exported with arches (`tunerd export --arch 90`), the payload also holds "binaries": every exported kernel (conv
winners and the kernels of block winners' plans) compiled ahead of time per arch (kernels.aot.Binary.to_portable:
Triton's cache files with their sha256, keyed by Triton's cache key, Triton version, arch and the source sha256).
They are covered by the payload's checksum and signature; a reader without them ignores the key. Binaries are
executable GPU code no re-rendering can check: a client installs them only from a bundle signed by a pinned key,
and only where its own rendering and Triton cache key match (tunerd.client.BundleAnswers).

The store keeps binaries (db.binaries): an import keeps those of a bundle signed by a pinned key, each of them of
one of the bundle's kernels as rendered here (never an unsigned or unpinned bundle's); an export with arches takes
a kept binary where its Triton cache key is the one compiling now would give, compiles and keeps the rest; and
stored_bundle (GET /v1/bundle?arch=) ships kept binaries only, compiling nothing, and names the kernels it has none
of (their clients compile them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tunerd.kernels import GENERATOR_VERSION, aot, generator, trust
from tunerd.kernels.runtime import atomic_write_bytes

from .binaries import COMPILED
from .errors import BundleError, InvalidRecord
from .rows import BlockWinnerRow, WinnerRow, jsonable
from .store import DeviceLike, Store
from .tables import utcnow

FORMAT = "tunerd-bundle"
VERSION = 1
MAX_BYTES = 1 << 30  # decompressed size limit: refuse gzip bombs
SIGNED_CONTEXT = b"tunerd-bundle-v1\x00"  # what a signature covers: this, then the 32-byte payload digest
_GZIP_MAGIC = b"\x1f\x8b"
_ENVELOPE = {"format", "version", "sha256", "payload"}
MAX_BINARIES = 8192  # ahead-of-time binaries a bundle may hold (kernels x arches)
MAX_BINARY_BYTES = 512 << 20  # their decoded files together
TRUSTED_KEYS_ENV = "TUNERD_TRUSTED_KEYS"  # a JSON list of public key files, as the daemon's setting reads it
MAX_LISTED = 256  # kernels a provenance names as compiled by clients (the count is always there)
_RowT = TypeVar("_RowT", WinnerRow, BlockWinnerRow)
log = logging.getLogger("tunerd.db.bundle")


@dataclass(frozen=True)
class BundleSummary:
    """What an export wrote."""

    sha256: str
    winners: int
    devices: int
    bytes: int
    skipped_stale: int = 0  # winners measured with another generator version (their keys are dead)
    path: str | None = None
    block_winners: int = 0
    binaries: int = 0  # ahead-of-time binaries (kernels x arches)
    binary_errors: tuple[str, ...] = ()  # kernels that did not compile for an arch: their clients JIT them
    binaries_reused: int = 0  # of binaries: kept in the store, their Triton cache key still the one compiling gives
    binaries_compiled: int = 0  # of binaries: compiled by this export (and kept)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


@dataclass(frozen=True)
class ImportReport:
    """What an import did: per-winner outcomes summed, plus the bundle's own provenance."""

    sha256: str
    version: int
    generator_version: str
    exported_at: str
    provenance: dict
    winners: int
    added: int
    replaced: int
    kept: int
    unchanged: int
    devices: tuple[str, ...] = field(default=())  # digests of the devices the bundle covers
    signed_by: str | None = None  # key_id of the verified ed25519 signature, None for an unsigned bundle
    block_winners: int = 0  # fused block winners in the bundle, and what became of them
    blocks_added: int = 0
    blocks_replaced: int = 0
    blocks_kept: int = 0
    blocks_unchanged: int = 0
    binaries: int = 0  # ahead-of-time binaries kept in the store (new or already kept)
    binaries_note: str | None = None  # why a bundle's binaries were not kept, when it has some

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


# ---- ed25519 keys (PEM, or OpenSSH's formats) ------------------------------------------------------
def _key_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read key file {path}: {e.strerror or e}") from None


def load_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An unencrypted ed25519 private key (`openssl genpkey -algorithm ed25519`, or `ssh-keygen -t ed25519`)."""
    data = _key_bytes(path)
    try:
        key = (
            serialization.load_ssh_private_key(data, None)
            if b"OPENSSH PRIVATE KEY" in data
            else serialization.load_pem_private_key(data, None)
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BundleError(f"{path} is not an unencrypted ed25519 private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} holds a {type(key).__name__}; bundles are signed with ed25519 keys")
    return key


def load_trusted_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """An ed25519 public key (PEM `openssl pkey -pubout`, or an OpenSSH `ssh-ed25519 ...` line)."""
    data = _key_bytes(path)
    try:
        key = (
            serialization.load_ssh_public_key(data.strip())
            if data.lstrip().startswith(b"ssh-")
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, UnsupportedAlgorithm) as e:
        raise BundleError(f"{path} is not an ed25519 public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} holds a {type(key).__name__}; bundles are signed with ed25519 keys")
    return key


def pinned_keys(
    keys: Sequence[str | os.PathLike | Ed25519PublicKey] | None = None,
) -> list[Ed25519PublicKey]:
    """The keys a bundle must be signed by: keys (key files or loaded keys) when given, else those named by
    $TUNERD_TRUSTED_KEYS (a JSON list of files, '["/etc/tunerd/ci.pub"]', or one path); [] pins nothing.
    BundleError when a pinned key cannot be read: a pin never silently becomes no pin."""
    if keys is None:
        raw = os.environ.get(TRUSTED_KEYS_ENV, "").strip()
        if not raw:
            return []
        try:
            keys = json.loads(raw) if raw.startswith("[") else [raw]
        except ValueError as e:
            raise BundleError(f"${TRUSTED_KEYS_ENV} is not a JSON list of public key files: {e}") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise BundleError(f"${TRUSTED_KEYS_ENV} must be a JSON list of public key files, got {raw[:200]!r}")
    return [k if isinstance(k, Ed25519PublicKey) else load_trusted_key(k) for k in keys]


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of sha256 of its raw bytes."""
    return hashlib.sha256(_raw(key)).hexdigest()[:16]


def _sign(key: Ed25519PrivateKey, sha: str) -> dict[str, str]:
    sig = key.sign(SIGNED_CONTEXT + bytes.fromhex(sha))
    return {
        "alg": "ed25519",
        "key": base64.b64encode(_raw(key.public_key())).decode(),
        "sig": base64.b64encode(sig).decode(),
    }


def _check_signature(env: dict[str, Any], trusted: Sequence[Ed25519PublicKey]) -> str | None:
    """The signer's key_id (None when unsigned and nothing is pinned); BundleError for a bad signature, an
    unsigned bundle while keys are pinned, or a signer that is not pinned."""
    sig = env.get("signature")
    if sig is None:
        if trusted:
            raise BundleError(
                "bundle is not signed, and this import only accepts bundles signed by a trusted key "
                f"({', '.join(key_id(k) for k in trusted)})"
            )
        return None
    if not isinstance(sig, dict) or set(sig) != {"alg", "key", "sig"} or sig["alg"] != "ed25519":
        raise BundleError(f"bundle signature is malformed (expected ed25519 with key and sig): {str(sig)[:200]}")
    try:
        raw, signature = base64.b64decode(sig["key"], validate=True), base64.b64decode(sig["sig"], validate=True)
        signer = Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, TypeError, ValueError) as e:
        raise BundleError(f"bundle signature is malformed: {e}") from None
    if trusted and raw not in {_raw(k) for k in trusted}:
        raise BundleError(
            f"bundle is signed by key {key_id(signer)}, which is not a trusted key "
            f"({', '.join(key_id(k) for k in trusted)})"
        )
    try:
        signer.verify(signature, SIGNED_CONTEXT + bytes.fromhex(env["sha256"]))
    except (InvalidSignature, ValueError):
        raise BundleError(
            f"bundle signature by key {key_id(signer)} does not verify: the bundle was modified after it was signed"
        ) from None
    return key_id(signer)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def bundle_bytes(
    store: Store,
    *,
    device: DeviceLike | None = None,
    snapshot: str | None = None,
    provenance: dict,
    signing_key: Ed25519PrivateKey | None = None,
    arches: Sequence[int] = (),
) -> bytes:
    """The bundle of the store's winners (one device's, or all; live or as pinned in snapshot), signed with
    signing_key when given, with their kernels compiled for each of arches (kept binaries reused)."""
    return _build(store, device, snapshot, provenance, signing_key, arches, compile=True).data


def export_bundle(
    store: Store,
    path: str | os.PathLike,
    *,
    device: DeviceLike | None = None,
    snapshot: str | None = None,
    provenance: dict,
    signing_key: Ed25519PrivateKey | None = None,
    arches: Sequence[int] = (),
) -> BundleSummary:
    """Write the bundle atomically (temp file + os.replace): path holds the old file or the whole new one.
    arches: also ship every exported kernel compiled for these CUDA archs (kernels.aot; no GPU needed): a binary
    kept in the store whose Triton cache key still matches is reused, the rest are compiled and kept."""
    b = _build(store, device, snapshot, provenance, signing_key, arches, compile=True)
    atomic_write_bytes(Path(path), b.data)
    return BundleSummary(
        sha256=b.sha,
        winners=len(b.rows),
        devices=len({r.device_key for r in b.rows} | {x.device_key for x in b.blocks}),
        bytes=len(b.data),
        skipped_stale=b.stale,
        path=str(path),
        block_winners=len(b.blocks),
        binaries=b.reused + b.compiled,
        binary_errors=tuple(b.errors),
        binaries_reused=b.reused,
        binaries_compiled=b.compiled,
    )


@dataclass(frozen=True)
class StoredBundle:
    """What stored_bundle made: the signed bundle, and the (kernel, arch) pairs it has no binary for."""

    data: bytes
    sha256: str
    binaries: int
    missing: tuple[tuple[generator.Variant, int], ...]  # no kept binary: clients compile these


def stored_bundle(
    store: Store,
    *,
    device: DeviceLike | None = None,
    snapshot: str | None = None,
    provenance: dict,
    signing_key: Ed25519PrivateKey,
    arches: Sequence[int],
) -> StoredBundle:
    """The bundle of the store's winners with the binaries it keeps for arches: compiles nothing (its cost is
    rendering the winners' kernels and reading kept binaries). Its provenance names the kernels without one."""
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise BundleError("a bundle with binaries is signed: clients use no binary of an unsigned bundle")
    b = _build(store, device, snapshot, provenance, signing_key, arches, compile=False)
    return StoredBundle(b.data, b.sha, b.reused, tuple(b.missing))


@dataclass
class _Built:
    data: bytes
    sha: str
    rows: list[WinnerRow]
    blocks: list[BlockWinnerRow]
    stale: int  # winners and block winners skipped for an older generator
    reused: int = 0  # kept binaries in the bundle (all of its binaries, when nothing is compiled)
    compiled: int = 0
    errors: list[str] = field(default_factory=list)
    missing: list[tuple[generator.Variant, int]] = field(default_factory=list)


def _build(
    store: Store,
    device: DeviceLike | None,
    snapshot: str | None,
    provenance: dict,
    signing_key: Ed25519PrivateKey | None,
    arches: Sequence[int],
    *,
    compile: bool,
) -> _Built:
    """Every block winner is re-checked as it is read (Store.block_winners). compile: compile (and keep) binaries
    no kept one serves, else ship kept ones only and note the rest as missing."""
    if not isinstance(provenance, dict):
        raise BundleError(f"provenance must be a dict, got {type(provenance).__name__}")
    try:
        arches = sorted({aot.check_arch(a) for a in arches})
    except ValueError as e:
        raise BundleError(str(e)) from None
    every = store.winners(device=device, snapshot=snapshot)
    rows = [w for w in every if w.device.generator_version == GENERATOR_VERSION]
    every_block = store.block_winners(device=device, snapshot=snapshot)
    blocks = [b for b in every_block if b.device.generator_version == GENERATOR_VERSION]
    stale = len(every) - len(rows) + len(every_block) - len(blocks)
    out = _Built(b"", "", rows, blocks, stale)
    binaries: list[aot.Binary] = []
    if arches:
        kernels = _kernels(rows, blocks)
        kept = _kept(store, kernels, arches)
        if compile:
            built = aot.build_or_reuse(kernels, arches, kept)
            if built.compiled:
                store.add_binaries(built.compiled, origin=COMPILED)
            binaries, out.errors = built.binaries, built.errors
            out.reused, out.compiled = len(built.reused), len(built.compiled)
        else:
            binaries, out.missing = _shippable(kernels, arches, kept)
            out.reused = len(binaries)
            listed = [f"{v.id}@sm_{a}" for v, a in out.missing]
            provenance = {
                **provenance,
                "binaries": {
                    "arches": arches,
                    "shipped": len(binaries),
                    "clients_compile": len(listed),
                    "clients_compile_kernels": listed[:MAX_LISTED],
                },
            }
        binaries.sort(key=lambda b: (b.variant_id, b.arch))
    payload = {
        "generator_version": GENERATOR_VERSION,
        "exported_at": utcnow().isoformat(),
        "snapshot": snapshot,
        "provenance": provenance,
        "winners": [w.portable() for w in rows],
        "block_winners": [b.portable() for b in blocks],
    }
    if arches:
        payload["binaries"] = [b.to_portable() for b in binaries]
    try:
        body = _canonical(payload)
    except (TypeError, ValueError) as e:
        raise BundleError(f"provenance is not JSON-serialisable: {e}") from None
    out.sha = hashlib.sha256(body).hexdigest()
    envelope = {"format": FORMAT, "version": VERSION, "sha256": out.sha, "payload": payload}
    if signing_key is not None:
        envelope["signature"] = _sign(signing_key, out.sha)
    out.data = _gzip(_canonical(envelope))
    return out


def _kept(
    store: Store, kernels: list[generator.Variant], arches: Sequence[int]
) -> dict[tuple[str, int], list[aot.Binary]]:
    """The store's binaries of kernels for arches, newest first per (variant, arch), each checked against this
    process's rendering (files, source sha256, metadata); a row that does not check out is logged and skipped."""
    by_id = {v.id: v for v in kernels}
    out: dict[tuple[str, int], list[aot.Binary]] = {}
    for row in store.binaries(by_id, arches):
        try:
            if row.binary is None:
                raise aot.AotError(row.problem or "unreadable")
            aot.check(row.binary, by_id[row.variant_id])
        except aot.AotError as e:
            log.error("kept binary %d (variant %s, sm_%d) not used: %s", row.id, row.variant_id, row.arch, e)
            continue
        out.setdefault((row.variant_id, row.arch), []).append(row.binary)
    return out


def _shippable(
    kernels: list[generator.Variant], arches: Sequence[int], kept: dict[tuple[str, int], list[aot.Binary]]
) -> tuple[list[aot.Binary], list[tuple[generator.Variant, int]]]:
    """The newest kept binary of each (kernel, arch) within the bundle limits, and the pairs without one."""
    shipped: list[aot.Binary] = []
    missing: list[tuple[generator.Variant, int]] = []
    total = 0
    for v in kernels:
        for a in arches:
            b = next(iter(kept.get((v.id, a), ())), None)
            if b is None or len(shipped) >= MAX_BINARIES or total + b.size > MAX_BINARY_BYTES:
                missing.append((v, a))
                continue
            shipped.append(b)
            total += b.size
    return shipped, missing


def _kernels(rows: list[WinnerRow], blocks: list[BlockWinnerRow]) -> list[generator.Variant]:
    """Every kernel the winners launch, as this tunerd renders them (the winners' claims checked again)."""
    out: dict[str, generator.Variant] = {}
    try:
        for r in rows:
            v = trust.verify(r.spec, r.schedule, r.source, variant_id=r.variant_id)
            out[v.id] = v
        for b in blocks:
            for v in trust.verify_plan(b.block, b.plan, b.schedules, claimed_id=b.plan_id).variants:
                out[v.id] = v
    except trust.UntrustedSource as e:
        raise BundleError(f"a winner does not check out, no binary of it is used: {e}") from None
    return list(out.values())


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip container, no file name or mtime (reproducible)
    return c.compress(data) + c.flush()


def read_bundle(
    data: bytes, *, max_bytes: int = MAX_BYTES, trusted_keys: Sequence[Ed25519PublicKey] = ()
) -> dict[str, Any]:
    """Decode and verify a bundle (format, version, checksum, signature, generator); returns the envelope,
    with "signed_by" set to the signer's key_id (or None).

    trusted_keys: when any are given, only a bundle signed by one of them is accepted. Raises
    BundleError saying exactly what is wrong; touches no store."""
    if not isinstance(data, (bytes, bytearray)):
        raise BundleError(f"bundle data must be bytes, got {type(data).__name__}")
    if len(data) < 2 or data[:2] != _GZIP_MAGIC:
        raise BundleError(f"not a tunerd bundle: not gzip data (starts with {bytes(data[:8])!r})")
    d = zlib.decompressobj(31)
    try:
        raw = d.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise BundleError(f"corrupt bundle: the gzip stream is damaged ({e})") from None
    if len(raw) > max_bytes:
        raise BundleError(f"bundle expands to more than {max_bytes} bytes; refusing it")
    if not d.eof:
        raise BundleError("truncated bundle: the gzip stream ends early (incomplete download or copy?)")
    if d.unused_data:
        raise BundleError(f"corrupt bundle: {len(d.unused_data)} unexpected bytes after the gzip stream")
    try:
        env = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise BundleError(f"not a tunerd bundle: the content is not JSON ({e})") from None
    if not isinstance(env, dict):
        raise BundleError(f"not a tunerd bundle: the JSON is a {type(env).__name__}, not an object")
    if env.get("format") != FORMAT:
        raise BundleError(f"not a tunerd bundle: format is {env.get('format')!r}, expected {FORMAT!r}")
    version = env.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"bundle has no valid format version (got {version!r})")
    if version != VERSION:
        newer = "newer than" if version > VERSION else "older than and not readable by"
        raise BundleError(f"bundle format version {version} is {newer} this tunerd (reads version {VERSION})")
    if not _ENVELOPE <= set(env) <= _ENVELOPE | {"signature"}:
        raise BundleError(f"bundle envelope has unexpected fields {sorted(set(env))}")
    payload = env["payload"]
    try:
        digest = hashlib.sha256(_canonical(payload)).hexdigest()
    except ValueError as e:  # NaN/Infinity smuggled into the JSON
        raise BundleError(f"corrupt bundle: payload is not canonical JSON ({e})") from None
    if digest != env["sha256"]:
        raise BundleError(
            f"bundle checksum mismatch: payload hashes to {digest[:16]}..., the bundle records "
            f"{str(env['sha256'])[:16]}...: the file was modified or corrupted"
        )
    signed_by = _check_signature(env, trusted_keys)
    if not isinstance(payload, dict) or not isinstance(payload.get("winners"), list):
        raise BundleError("bundle payload has no winners list")
    if not isinstance(payload.get("block_winners", []), list):
        raise BundleError("bundle payload's block_winners is not a list")
    if not isinstance(payload.get("binaries", []), list):
        raise BundleError("bundle payload's binaries is not a list")
    gen = payload.get("generator_version")
    if gen != GENERATOR_VERSION:
        raise BundleError(
            f"incompatible bundle: made by kernel generator {gen!r}, this tunerd's generator is "
            f"{GENERATOR_VERSION!r}; its sources and device keys would not match (re-tune or "
            f"export with the same tunerd version)"
        )
    return {**env, "signed_by": signed_by}


def bundle_winners(env: dict[str, Any]) -> list[WinnerRow]:
    """The winners of an envelope read_bundle accepted, as rows (BundleError for a malformed one). Their
    sources are still claims: re-render (kernels.trust) before using one."""
    return _rows(WinnerRow, env["payload"]["winners"], "winner")


def bundle_block_winners(env: dict[str, Any]) -> list[BlockWinnerRow]:
    """The fused block winners of an envelope read_bundle accepted (BundleError for a malformed one; a bundle
    without any has none). Still claims: kernels.trust.verify_plan checks each before it is stored or run."""
    return _rows(BlockWinnerRow, env["payload"].get("block_winners", []), "block winner")


def _rows(cls: type[_RowT], items: list[Any], what: str) -> list[_RowT]:
    """Parse a payload list of portable rows: BundleError naming the malformed one or one measured by another
    generator version."""
    rows = []
    for i, d in enumerate(items):
        try:
            row = cls.from_portable(d)
        except InvalidRecord as e:
            raise BundleError(f"bundle {what} {i} is malformed: {e}") from None
        if row.device.generator_version != GENERATOR_VERSION:
            raise BundleError(
                f"incompatible bundle: {what} {i} was measured with generator "
                f"{row.device.generator_version!r}, this tunerd's is {GENERATOR_VERSION!r}"
            )
        rows.append(row)
    return rows


def bundle_binaries(
    env: dict[str, Any], *, max_count: int = MAX_BINARIES, max_bytes: int = MAX_BINARY_BYTES
) -> list[aot.Binary]:
    """The ahead-of-time binaries of an envelope read_bundle accepted ([] for a bundle without any), every file
    checked against its sha256 in the manifest; BundleError for too many, too large, malformed or tampered ones.
    Install one only from a bundle signed by a pinned key (kernels.aot.install checks the rest)."""
    entries = env["payload"].get("binaries", [])
    if len(entries) > max_count:
        raise BundleError(f"bundle holds {len(entries)} binaries, more than the limit of {max_count}; refusing them")
    out, total = [], 0
    for i, d in enumerate(entries):
        try:
            b = aot.Binary.from_portable(d)
        except aot.AotError as e:
            raise BundleError(f"bundle binary {i} refused, no binary of this bundle is used: {e}") from None
        total += b.size
        if total > max_bytes:
            raise BundleError(f"bundle binaries exceed {max_bytes} bytes; refusing them")
        out.append(b)
    return out


def import_bundle_bytes(store: Store, data: bytes, *, trusted_keys: Sequence[Ed25519PublicKey] = ()) -> ImportReport:
    """Verify then merge a bundle; on any problem raise BundleError and change nothing (Store.ingest: all or
    nothing, in short write transactions). Its winners are stored as claims whose origin names the bundle
    ("bundle:<sha256>"), checked by a verify job."""
    env = read_bundle(data, trusted_keys=trusted_keys)
    payload = env["payload"]
    rows = bundle_winners(env)
    blocks = bundle_block_winners(env)
    binaries, note = _importable_binaries(env, rows, blocks, pinned=bool(trusted_keys))
    try:
        every = store.ingest(
            rows, origin=f"bundle:{env['sha256']}", blocks=blocks, binaries=binaries, signed_by=env["signed_by"]
        )
    except InvalidRecord as e:
        raise BundleError(f"bundle rejected, nothing imported: {e}") from None
    outcomes, block_outcomes = every[: len(rows)], every[len(rows) :]
    return ImportReport(
        sha256=env["sha256"],
        version=env["version"],
        generator_version=payload["generator_version"],
        exported_at=str(payload.get("exported_at")),
        provenance=dict(payload.get("provenance") or {}),
        winners=len(rows),
        added=outcomes.count("added"),
        replaced=outcomes.count("replaced"),
        kept=outcomes.count("kept"),
        unchanged=outcomes.count("unchanged"),
        devices=tuple(sorted({r.device.digest for r in rows} | {b.device.digest for b in blocks})),
        signed_by=env["signed_by"],
        block_winners=len(blocks),
        blocks_added=block_outcomes.count("added"),
        blocks_replaced=block_outcomes.count("replaced"),
        blocks_kept=block_outcomes.count("kept"),
        blocks_unchanged=block_outcomes.count("unchanged"),
        binaries=len(binaries),
        binaries_note=note,
    )


def _importable_binaries(
    env: dict[str, Any], rows: list[WinnerRow], blocks: list[BlockWinnerRow], *, pinned: bool
) -> tuple[list[aot.Binary], str | None]:
    """The binaries an import keeps, and why none are kept when the bundle has some. Only a bundle signed by a
    pinned key gives any; then every one must pass bundle_binaries and be of one of the bundle's kernels as rendered
    here (else BundleError: the signer's own bundle is inconsistent, nothing is imported)."""
    if not env["payload"].get("binaries"):
        return [], None
    if not pinned or env["signed_by"] is None:
        return [], "binaries not kept: the bundle is not signed by a pinned key (--trusted-key, $TUNERD_TRUSTED_KEYS)"
    binaries = bundle_binaries(env)
    by_id = {v.id: v for v in _kernels(rows, blocks)}
    for i, b in enumerate(binaries):
        v = by_id.get(b.variant_id)
        try:
            if v is None:
                raise aot.AotError(f"variant {b.variant_id} is not one of the bundle's kernels")
            aot.check(b, v)
        except aot.AotError as e:
            raise BundleError(f"bundle binary {i} refused, nothing imported: {e}") from None
    return binaries, None


def import_bundle(
    store: Store, path: str | os.PathLike, *, trusted_keys: Sequence[Ed25519PublicKey] = ()
) -> ImportReport:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read bundle {path}: {e.strerror or e}") from None
    return import_bundle_bytes(store, data, trusted_keys=trusted_keys)
