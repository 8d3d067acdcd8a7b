"""The tunerd HTTP client: batch lookups with an on-disk answer cache, bounded retries, fallbacks.

A training step must never wait on the server for longer than the client's timeout: every
lookup has one deadline covering all retries, and after a failure the client stops asking the
server for a cool-down period (doubling while it stays down), answering from its disk cache, the
local store (when one exists) or the default schedule instead.

`install(client)` makes every tunerd convolution ask the server once per (device, spec). An answer
is a claim: the client re-renders its (spec, schedule) with its own generator and launches only that
rendering (kernels.trust), so a server, a disk cache or a local store can choose a schedule but can
never make this process run code it did not render.

Fused blocks are looked up the same way (`Client.lookup_blocks`, and `install` answers patched blocks too):
an answer names a plan and one schedule per fused step, never source; the client checks the plan against
the block and re-renders every kernel (kernels.trust.verify_plan), and refuses an answer that carries
source. Block answers are not kept in the disk cache: they fall back to the bundle, the local store, then
the planner's default.

A bundle file (`tunerd export`) can answer too, without a server (BundleAnswers, `bundle=`): it is read
as `tunerd import` reads it, and with ed25519 keys pinned (`trusted_keys=`, else $TUNERD_TRUSTED_KEYS)
only a bundle signed by one of them is used; a refused bundle answers nothing and says why. Its ahead-of-time
binaries (`tunerd export --arch`) are used only from a bundle signed by a pinned key: a winner's binary is
installed into Triton's cache when the winner is answered on a GPU (or at once: install_binaries), after this
process re-rendered the kernel and computed the same Triton cache key (kernels.aot.install), so its first
launch loads the binary instead of compiling; a binary that does not match is skipped and the JIT compiles.
A Client with a bundle also installs the bundle's binary of a kernel its server chose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch

from tunerd.db.errors import StoreError
from tunerd.db.fingerprint import DeviceFingerprint
from tunerd.db.fingerprint import current as current_device
from tunerd.kernels import aot, generator, runtime, trust
from tunerd.kernels import conv as _conv
from tunerd.kernels.block import Block
from tunerd.kernels.runtime import atomic_write_text
from tunerd.kernels.runtime import cache_dir as kernel_cache_dir
from tunerd.kernels.schedule import Schedule, ScheduleError
from tunerd.kernels.spec import BlockSpec, SpecError
from tunerd.schedules.strategies import DEFAULT as DEFAULT_STRATEGY

from .blocks import set_block_lookup

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from tunerd.db.rows import BlockWinnerRow, WinnerRow
    from tunerd.kernels.aot import Binary

log = logging.getLogger("tunerd.client")

DeviceArg = DeviceFingerprint | str | None
_RETRY_STATUS = (502, 503, 504)
_CACHE_VERSION = 1


class ClientError(Exception):
    """The server answered with an error; status and detail say what it was."""

    def __init__(self, status: int, detail: Any, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.body = body


class ServerUnavailable(ClientError):
    """The server could not be reached (or kept answering 5xx) within the deadline."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.status = 0
        self.detail = message
        self.body = None


class BadAnswer(Exception):
    """An answer that does not match the question (wrong spec, a source this client would not render): never
    launched."""


@dataclass(frozen=True)
class Answer:
    """What a lookup found for one spec, and where the answer came from.

    origin: 'server', 'cache' (this client's disk cache), 'bundle' (a bundle file), 'local-store' (the local
    database) or 'default' (no tuned kernel: the default schedule runs).
    """

    spec: BlockSpec
    hit: bool
    origin: str
    schedule: Schedule | None = None
    source: str | None = None
    variant_id: str | None = None
    launch: dict | None = None
    median_ms: float | None = None
    max_error: float | None = None
    speedup_vs_default: float | None = None
    fraction_of_roofline: float | None = None
    provenance: dict = field(default_factory=dict)
    borrowed: bool = False  # a miss answered with a nearby shape's winner (schedule set; never cached)

    def variant(self) -> generator.Variant | None:
        """The kernel to launch (None for a miss without a borrowed schedule): this process's rendering of
        (spec, schedule), which the answer's source must equal (raises kernels.trust.UntrustedSource otherwise)."""
        if not self.hit and not self.borrowed:
            return None
        if self.schedule is None:
            raise BadAnswer(f"a {'borrowed answer' if self.borrowed else 'hit'} without a schedule")
        return trust.verify(self.spec, self.schedule, self.source, variant_id=self.variant_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "hit": self.hit,
            "spec": self.spec.to_dict(),
            "schedule": None if self.schedule is None else self.schedule.to_dict(),
            "source": self.source,
            "variant_id": self.variant_id,
            "launch": self.launch,
            "timings": {"median_ms": self.median_ms},
            "numerics": {"max_error": self.max_error},
            "speedup_vs_default": self.speedup_vs_default,
            "fraction_of_roofline": self.fraction_of_roofline,
            "provenance": self.provenance,
            "borrowed": self.borrowed,
        }


def _launch(v: generator.Variant) -> dict[str, Any]:
    """A variant's launch metadata as a lookup answer carries it."""
    return {"kernel_name": v.kernel_name, "grid": list(v.grid), "num_warps": v.num_warps, "num_stages": v.num_stages}


def _parse_answer(data: Any, expected: BlockSpec, origin: str) -> Answer:
    """A lookup result -> Answer, verified: same spec, and a source byte-identical to this client's rendering
    of (spec, schedule) (kernels.trust.verify; another generator version's answer is re-rendered here)."""
    if not isinstance(data, dict) or not isinstance(data.get("hit"), bool):
        raise BadAnswer(f"malformed lookup result: {str(data)[:200]}")
    try:
        spec = BlockSpec.from_dict(data.get("spec"))
    except SpecError as e:
        raise BadAnswer(f"the answer's spec is malformed: {e}") from None
    if spec != expected:
        raise BadAnswer(f"the answer is for another spec ({spec.describe()}), not {expected.describe()}")
    borrowed = not data["hit"] and data.get("borrowed") is True
    if not data["hit"] and not borrowed:
        return Answer(spec=expected, hit=False, origin=origin)
    source, vid = data.get("source"), data.get("variant_id")
    if not isinstance(source, str) or not isinstance(vid, str):
        raise BadAnswer(f"a {'borrowed answer' if borrowed else 'hit'} without source or variant_id")
    try:
        variant = trust.verify(expected, Schedule.from_dict(data.get("schedule")), source, variant_id=vid)
    except (ScheduleError, trust.UntrustedSource) as e:
        raise BadAnswer(str(e)) from None
    mine = _launch(variant)
    if variant.source == source:  # same generator: its launch metadata must be this client's too
        launch = data.get("launch") or {}
        if {k: launch.get(k) for k in mine} != mine:
            raise BadAnswer(
                f"the answer's launch metadata {launch} differs from this client's {mine} (different tunerd versions?)"
            )
    else:
        log.info(
            "re-rendered %s from the schedule of an answer made by generator %s",
            expected.describe(),
            trust.claimed_generator(source),
        )
    if borrowed:  # the nearby shape's timings are not this shape's: keep them in provenance only
        return Answer(
            spec=expected,
            hit=False,
            borrowed=True,
            origin=origin,
            schedule=variant.schedule,
            source=variant.source,
            variant_id=variant.id,
            launch=mine,
            provenance={"borrowed_from": data.get("borrowed_from")},
        )
    timings, numerics = data.get("timings") or {}, data.get("numerics") or {}
    return Answer(
        spec=expected,
        hit=True,
        origin=origin,
        schedule=variant.schedule,
        source=variant.source,
        variant_id=variant.id,
        launch=mine,
        median_ms=timings.get("median_ms"),
        max_error=numerics.get("max_error"),
        speedup_vs_default=data.get("speedup_vs_default"),
        fraction_of_roofline=data.get("fraction_of_roofline"),
        provenance=data.get("provenance") or {},
    )


@dataclass(frozen=True)
class BlockAnswer:
    """What a lookup found for one fused block. plan: the winning plan and its fused steps' schedules as this
    process checked and rendered them (None: a miss; the planner's plan on default schedules runs). origin as
    Answer's ('server', 'bundle', 'local-store' or 'default')."""

    block: Block
    hit: bool
    origin: str
    plan: trust.TrustedPlan | None = None
    median_ms: float | None = None
    max_error: float | None = None
    stale: bool = False
    provenance: dict = field(default_factory=dict)


_NO_SOURCE = ("source", "sources")  # a block answer names schedules; one that carries code is refused


def _parse_block_answer(data: Any, expected: Block, origin: str) -> BlockAnswer:
    """A block lookup result -> BlockAnswer: same block, no source, a plan legal for the block and schedules
    legal for its fused steps, rendered here to the plan id the answer claims (kernels.trust.verify_plan)."""
    if not isinstance(data, dict) or not isinstance(data.get("hit"), bool):
        raise BadAnswer(f"malformed block lookup result: {str(data)[:200]}")
    carried = [k for k in _NO_SOURCE if k in data]
    if carried:
        raise BadAnswer(f"a block answer carrying {carried}: this client renders block kernels itself")
    try:
        blk = Block.from_dict(data.get("block"))
    except SpecError as e:
        raise BadAnswer(f"the answer's block is malformed: {e}") from None
    if blk != expected:
        raise BadAnswer(f"the answer is for another block ({blk.describe()}), not {expected.describe()}")
    if not data["hit"]:
        return BlockAnswer(block=expected, hit=False, origin=origin, stale=data.get("stale") is True)
    prov = data.get("provenance")
    prov = prov if isinstance(prov, dict) else {}
    same = prov.get("generator_version") == generator.GENERATOR_VERSION
    try:
        tp = trust.verify_plan(
            expected, data.get("plan"), data.get("schedules"), claimed_id=data.get("plan_id") if same else None
        )
    except trust.UntrustedSource as e:
        raise BadAnswer(str(e)) from None
    timings, numerics = data.get("timings") or {}, data.get("numerics") or {}
    return BlockAnswer(
        block=expected,
        hit=True,
        origin=origin,
        plan=tp,
        median_ms=timings.get("median_ms"),
        max_error=numerics.get("max_error"),
        stale=data.get("stale") is True,
        provenance=prov,
    )


def _row_block_answer(row: BlockWinnerRow, origin: str, provenance: dict) -> BlockAnswer:
    """A block winner row (from a bundle or the local store) as an answer, checked and rendered here."""
    same = row.device.generator_version == generator.GENERATOR_VERSION
    tp = trust.verify_plan(row.block, row.plan, row.schedules, claimed_id=row.plan_id if same else None)
    return BlockAnswer(
        block=row.block,
        hit=True,
        origin=origin,
        plan=tp,
        median_ms=row.median_ms,
        max_error=row.max_error,
        provenance=provenance,
    )


class AnswerCache:
    """Answers on disk, one JSON file per (server, device, snapshot, spec), written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._written: dict[Path, str] = {}  # path -> variant id this process last wrote there

    def _path(self, key: tuple[str, str, str, str]) -> Path:
        digest = hashlib.sha256("\x00".join(key).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, server: str, device: DeviceFingerprint, snapshot: str | None, spec: BlockSpec) -> Answer | None:
        key = (server, device.key, snapshot or "", spec.to_json())
        path = self._path(key)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cache entry %s: %s", path, e)
            return None
        if not isinstance(doc, dict) or doc.get("version") != _CACHE_VERSION or doc.get("key") != list(key):
            return None
        try:
            return _parse_answer(doc.get("answer"), spec, "cache")
        except BadAnswer as e:
            log.warning("ignoring corrupt cache entry %s: %s", path, e)
            return None

    def put(self, server: str, device: DeviceFingerprint, snapshot: str | None, answer: Answer) -> None:
        key = (server, device.key, snapshot or "", answer.spec.to_json())
        path = self._path(key)
        stamp = answer.variant_id or "miss"
        if self._written.get(path) == stamp:
            return  # the same answer is already on disk: no rewrite (and fsync) per lookup
        doc = {"version": _CACHE_VERSION, "key": list(key), "answer": answer.to_json()}
        try:
            atomic_write_text(path, json.dumps(doc, sort_keys=True))
            self._written[path] = stamp
        except OSError as e:  # a full or read-only disk must not fail a lookup
            log.warning("could not write the lookup cache under %s: %s", self.root, e)


def default_cache_dir() -> Path:
    """$TUNERD_CACHE_DIR/client (or ~/.cache/tunerd/client), beside the kernel source cache."""
    return kernel_cache_dir().parent / "client"


KeyArg = Sequence["str | os.PathLike[str] | Ed25519PublicKey"] | None


class BundleAnswers:
    """The winners of a bundle file as answers. The file is read once and checked as `tunerd import` checks
    it (format, checksum, generator, and with keys pinned an ed25519 signature by one of them); each
    winner's (spec, schedule) is re-rendered here when it is asked for. A refused bundle (unsigned or
    wrongly signed while keys are pinned, damaged, foreign, or a pinned key that cannot be read) answers
    nothing: `error` says why, it is logged, and the caller falls back to its defaults. Its binaries are used
    only when the bundle is signed by a pinned key (else `binaries_note` says why they are ignored).

    trusted_keys: public key files (PEM or OpenSSH) or loaded keys; None: $TUNERD_TRUSTED_KEYS; []: none."""

    def __init__(self, bundle: str | os.PathLike[str] | bytes, trusted_keys: KeyArg = None) -> None:
        from tunerd.db.bundle import bundle_binaries, bundle_block_winners, bundle_winners, pinned_keys, read_bundle

        self.name = "<bytes>" if isinstance(bundle, (bytes, bytearray)) else os.fspath(bundle)
        self.error: str | None = None
        self.signed_by: str | None = None
        self.sha256: str | None = None
        self._rows: dict[tuple[str, str], WinnerRow] = {}
        self._blocks: dict[tuple[str, str], BlockWinnerRow] = {}
        self._binaries: dict[tuple[str, int], Binary] = {}  # (variant id, arch) -> binary, from a pinned signer
        self._tried: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self.binaries_note: str | None = None  # why the bundle's binaries are not used, when they are not
        try:
            keys = pinned_keys(trusted_keys)
            data = bytes(bundle) if isinstance(bundle, (bytes, bytearray)) else _read_bundle_file(self.name)
            env = read_bundle(data, trusted_keys=keys)
            rows = bundle_winners(env)
            blocks = bundle_block_winners(env)
        except StoreError as e:  # BundleError
            self.error = f"bundle {self.name} refused, default schedules run: {e}"
            log.error("%s", self.error)
            return
        self.signed_by, self.sha256 = env["signed_by"], env["sha256"]
        for r in rows:
            self._rows[(r.device.key, r.spec.to_json())] = r
        for b in blocks:
            self._blocks[(b.device.key, b.block.to_json())] = b
        if not env["payload"].get("binaries"):
            return
        if not keys or env["signed_by"] is None:
            self.binaries_note = (
                f"bundle {self.name}'s binaries ignored: it is not signed by a pinned key (trusted_keys or "
                "$TUNERD_TRUSTED_KEYS); its kernels are compiled here"
            )
            log.info("%s", self.binaries_note)
            return
        try:
            for binary in bundle_binaries(env):
                self._binaries[(binary.variant_id, binary.arch)] = binary
        except StoreError as e:  # BundleError: a tampered or malformed binary; the winners still answer
            self.binaries_note = f"bundle {self.name}'s binaries refused, none installed: {e}"
            log.error("%s", self.binaries_note)

    @property
    def binaries(self) -> int:
        """Binaries this bundle may install (signed by a pinned key, every file matching the manifest)."""
        return len(self._binaries)

    def install(self, v: generator.Variant, target: Any = None) -> bool | None:
        """Install the bundle's binary of v, a kernel this process rendered (whoever chose its schedule), for
        target (None: this process's GPU, if it has one); True installed (or already there), False skipped (no
        match: the JIT compiles), None nothing to do. Logs, never raises."""
        if not self._binaries:
            return None
        if target is None:
            if runtime.interpreting() or not torch.cuda.is_available():
                return None
            major, minor = torch.cuda.get_device_capability()
            arch = major * 10 + minor
        else:
            arch = int(target.arch)
        binary = self._binaries.get((v.id, arch))
        if binary is None:
            return None
        with self._lock:
            if (v.id, arch) in self._tried:
                return None
            self._tried.add((v.id, arch))
        try:
            return aot.install(binary, v, target=target)
        except (aot.AotError, OSError, RuntimeError, ValueError) as e:
            log.error("binary of variant %s from bundle %s not installed: %s", v.id, self.name, e)
            return False

    def install_binaries(self, target: Any = None) -> dict[str, int]:
        """Install now the binaries of every winner and block winner of the bundle (each re-rendered here) for
        target (a triton GPUTarget; None: this GPU): counts of `installed` and `skipped` (no match)."""
        variants: dict[str, generator.Variant] = {}
        for row in self._rows.values():
            try:
                v = trust.verify(row.spec, row.schedule, row.source, variant_id=row.variant_id)
            except trust.UntrustedSource as e:
                log.error("not using bundle %s's winner for %s: %s", self.name, row.spec.describe(), e)
                continue
            variants[v.id] = v
        for b in self._blocks.values():
            try:
                tp = trust.verify_plan(b.block, b.plan, b.schedules, claimed_id=b.plan_id)
            except trust.UntrustedSource as e:
                log.error("not using bundle %s's block winner for %s: %s", self.name, b.block.describe(), e)
                continue
            variants.update((v.id, v) for v in tp.variants)
        done = [self.install(v, target) for v in variants.values()]
        return {"installed": done.count(True), "skipped": done.count(False)}

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        state = self.error or f"{len(self)} winners" + (f", signed by {self.signed_by}" if self.signed_by else "")
        return f"BundleAnswers({self.name!r}: {state})"

    def answer(self, spec: BlockSpec, device: DeviceFingerprint) -> Answer | None:
        """The bundle's winner for exactly (device, spec), rendered here; None when it has none (or its schedule
        is not legal here, or its source is not this generator's rendering: logged)."""
        row = self._rows.get((device.key, spec.to_json()))
        if row is None:
            return None
        try:
            v = trust.verify(
                spec,
                row.schedule,
                row.source,
                variant_id=row.variant_id,
                generator_version=row.device.generator_version,
            )
        except trust.UntrustedSource as e:
            log.error("not using bundle %s's winner for %s: %s", self.name, spec.describe(), e)
            return None
        self.install(v)
        return Answer(
            spec=spec,
            hit=True,
            origin="bundle",
            schedule=v.schedule,
            source=v.source,
            variant_id=v.id,
            launch=_launch(v),
            median_ms=row.median_ms,
            max_error=row.max_error,
            speedup_vs_default=row.speedup_vs_default,
            fraction_of_roofline=row.fraction_of_roofline,
            provenance={"bundle": self.sha256, "signed_by": self.signed_by, "device": row.device.describe()},
        )

    def block_answer(self, block: Block, device: DeviceFingerprint) -> BlockAnswer | None:
        """The bundle's block winner for exactly (device, block), checked and rendered here; None when it has
        none (or its plan or schedules are not legal here: logged)."""
        row = self._blocks.get((device.key, block.to_json()))
        if row is None:
            return None
        try:
            a = _row_block_answer(row, "bundle", {"bundle": self.sha256, "signed_by": self.signed_by})
        except trust.UntrustedSource as e:
            log.error("not using bundle %s's block winner for %s: %s", self.name, block.describe(), e)
            return None
        for v in a.plan.variants if a.plan is not None else ():
            self.install(v)
        return a


def _read_bundle_file(path: str) -> bytes:
    from tunerd.db.errors import BundleError

    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read it: {e.strerror or e}") from None


class Client:
    """Talks to a tunerd daemon. Lookups never raise for an unreachable server: they fall back."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 2.0,
        retries: int = 2,
        cache_dir: str | Path | None = None,
        *,
        admin_timeout: float = 60.0,
        backoff_s: float = 0.05,
        cooldown_s: float = 5.0,
        max_cooldown_s: float = 300.0,
        local_store: Any = "auto",
        transport: httpx.BaseTransport | None = None,
        bundle: str | os.PathLike[str] | bytes | BundleAnswers | None = None,
        trusted_keys: KeyArg = None,
    ) -> None:
        """bundle: a bundle file (or BundleAnswers) that answers live lookups the server cannot, after this
        client's disk cache and before the local store; read with trusted_keys pinned (None:
        $TUNERD_TRUSTED_KEYS), so with a key pinned an unsigned or wrongly signed bundle answers nothing."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"server url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.admin_timeout = float(admin_timeout)
        self.backoff_s = backoff_s
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.cache = AnswerCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        headers = {"User-Agent": "tunerd-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            transport=transport,
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
        )
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._failures = 0
        self._unknown_devices: dict[str, float] = {}  # device key -> until when the server said 404
        self._local_arg = local_store
        self._local: Any = None
        self._local_checked = False
        self.last_error: str | None = None
        self.bundle = (
            bundle if isinstance(bundle, BundleAnswers) or bundle is None else BundleAnswers(bundle, trusted_keys)
        )
        if self.bundle is not None and self.bundle.error:
            self.last_error = self.bundle.error

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # ---- transport ----------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while cooling down after a failure (lookups do not contact the server then)."""
        return time.monotonic() >= self._down_until

    def _mark(self, ok: bool, error: str | None = None) -> None:
        with self._lock:
            if ok:
                self._failures, self._down_until = 0, 0.0
                return
            self._failures += 1
            wait = min(self.max_cooldown_s, self.cooldown_s * 2 ** (self._failures - 1))
            self._down_until = time.monotonic() + wait
            self.last_error = error
        log.warning("tunerd server %s unavailable (%s); not asking again for %.0f s", self.url, error, wait)

    def request(
        self, method: str, path: str, *, timeout: float | None = None, idempotent: bool = True, **kw: Any
    ) -> httpx.Response:
        """One call with a single deadline over all retries; raises ServerUnavailable or ClientError.

        Retries connection failures and 502/503/504 with exponential backoff and jitter; requests
        that are not idempotent are retried only when they provably never reached the server."""
        deadline = time.monotonic() + (timeout or self.timeout)
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                r = self._http.request(method, path, timeout=httpx.Timeout(remaining), **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                last = f"{type(e).__name__}: {e}"
            except httpx.TransportError as e:  # sent (or partly sent): retry only what is safe to repeat
                last = f"{type(e).__name__}: {e}"
                if not idempotent:
                    raise ServerUnavailable(f"{method} {path} to {self.url} failed after sending: {last}") from None
            else:
                if r.status_code not in _RETRY_STATUS:
                    return r
                last = f"HTTP {r.status_code}: {_detail(r)}"
                if not idempotent and r.status_code != 503:
                    break
            if attempt < self.retries:
                pause = self.backoff_s * 2**attempt * (0.5 + random.random())
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        raise ServerUnavailable(f"{method} {path} to {self.url} failed: {last}")

    def _call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kw: Any) -> httpx.Response:
        kw.setdefault("timeout", self.admin_timeout)
        r = self.request(method, path, **kw)
        if r.status_code not in ok:
            body = _body(r)
            raise ClientError(r.status_code, body.get("detail", r.text[:500]) if isinstance(body, dict) else body, body)
        return r

    # ---- lookups ------------------------------------------------------------------------------------
    def lookup(
        self, specs: BlockSpec | Sequence[BlockSpec], device: DeviceArg = None, snapshot: str | None = None
    ) -> list[Answer]:
        """One answer per spec, in order. Never raises for an unreachable server; returns within
        about `timeout` seconds (immediately while cooling down after a failure)."""
        specs = [specs] if isinstance(specs, BlockSpec) else list(specs)
        for s in specs:
            if not isinstance(s, BlockSpec):
                raise TypeError(f"lookup takes BlockSpecs, got {type(s).__name__}")
        fp = _fingerprint(device)
        answers: dict[int, Answer] = {}
        if snapshot is not None:  # snapshot answers never change: the disk cache is authoritative
            for i, s in enumerate(specs):
                cached = self.cache.get(self.url, fp, snapshot, s)
                if cached is not None:
                    answers[i] = cached
        todo = [i for i in range(len(specs)) if i not in answers]
        if todo:
            answers.update(self._ask_server(specs, todo, fp, snapshot))
        return [answers[i] if i in answers else self._fallback(specs[i], fp, snapshot) for i in range(len(specs))]

    def _ask_server(
        self, specs: list[BlockSpec], todo: list[int], fp: DeviceFingerprint, snapshot: str | None
    ) -> dict[int, Answer]:
        """Answers the server gave for specs[todo] (hits, and misses it confirmed); {} when it could not."""
        results = self._ask(fp, [specs[i].to_dict() for i in todo], snapshot)
        if results is None:
            return {}
        out: dict[int, Answer] = {}
        for i, data in zip(todo, results):
            try:
                answer = _parse_answer(data, specs[i], "server")
            except BadAnswer as e:  # never launch what does not match: that spec runs the fallback
                self.last_error = f"rejected the server's answer for {specs[i].describe()}: {e}"
                log.error(self.last_error)
                continue
            if answer.hit:
                out[i] = answer
                self.cache.put(self.url, fp, snapshot, answer)
            elif answer.borrowed:
                out[i] = answer  # launched for now, not cached: the server tunes the exact shape meanwhile
            elif snapshot is not None:
                out[i] = answer  # a pinned miss stays a miss, and must not pick up a local winner
                self.cache.put(self.url, fp, snapshot, answer)
        return out

    def _fallback(self, spec: BlockSpec, fp: DeviceFingerprint, snapshot: str | None) -> Answer:
        """Server down or missing: this client's cache, then its bundle and the local store (live lookups
        only), then the default schedule."""
        cached = self.cache.get(self.url, fp, snapshot, spec)
        if cached is not None:
            return cached
        from_bundle = self.bundle.answer(spec, fp) if self.bundle is not None and snapshot is None else None
        if from_bundle is not None:
            return from_bundle
        store = self._local_store() if snapshot is None else None  # a pinned answer is the server's or none
        if store is not None:
            try:
                row = store.winner(fp, spec)
            except StoreError as e:
                log.warning("local store lookup failed: %s", e)
                row = None
            try:
                v = (
                    None
                    if row is None
                    else trust.verify(
                        spec,
                        row.schedule,
                        row.source,
                        variant_id=row.variant_id,
                        generator_version=row.device.generator_version,
                    )
                )
            except trust.UntrustedSource as e:
                self.last_error = f"rejected the local store's winner for {spec.describe()}: {e}"
                log.error(self.last_error)
                v = None
            if v is not None:
                return Answer(
                    spec=spec,
                    hit=True,
                    origin="local-store",
                    schedule=v.schedule,
                    source=v.source,
                    variant_id=v.id,
                    median_ms=row.median_ms,
                    max_error=row.max_error,
                    speedup_vs_default=row.speedup_vs_default,
                    fraction_of_roofline=row.fraction_of_roofline,
                    provenance={"device": row.device.describe(), "origin": row.origin, "claimed": row.claimed},
                )
        return Answer(spec=spec, hit=False, origin="default")

    def lookup_blocks(
        self, blocks: Block | Sequence[Block], device: DeviceArg = None, snapshot: str | None = None
    ) -> list[BlockAnswer]:
        """One answer per fused block, in order: the server's winner (checked and rendered here), else (live
        lookups only) the bundle's, then the local store's, else a default miss. Never raises for an
        unreachable server; an answer this client refuses (BadAnswer) is logged and falls back."""
        blocks = [blocks] if isinstance(blocks, Block) else list(blocks)
        for b in blocks:
            if not isinstance(b, Block):
                raise TypeError(f"lookup_blocks takes Blocks, got {type(b).__name__}")
        fp = _fingerprint(device)
        answers: dict[int, BlockAnswer] = {}
        results = self._ask(fp, [b.to_dict() for b in blocks], snapshot) if blocks else None
        for i, data in enumerate(results or []):
            try:
                a = _parse_block_answer(data, blocks[i], "server")
            except BadAnswer as e:  # never run what does not check out: that block falls back
                self.last_error = f"rejected the server's answer for {blocks[i].describe()}: {e}"
                log.error(self.last_error)
                continue
            if a.hit or snapshot is not None:  # a pinned miss stays a miss
                answers[i] = a
        return [answers.get(i) or self._block_fallback(b, fp, snapshot) for i, b in enumerate(blocks)]

    def _block_fallback(self, block: Block, fp: DeviceFingerprint, snapshot: str | None) -> BlockAnswer:
        if snapshot is None and self.bundle is not None:
            found = self.bundle.block_answer(block, fp)
            if found is not None:
                return found
        store = self._local_store() if snapshot is None else None
        if store is not None:
            try:
                row = store.block_winner(fp, block)
                if row is not None:
                    prov = {"device": row.device.describe(), "origin": row.origin, "claimed": row.claimed}
                    return _row_block_answer(row, "local-store", prov)
            except (StoreError, trust.UntrustedSource) as e:  # UntrustedRecord: a row the store refused
                self.last_error = f"rejected the local store's block winner for {block.describe()}: {e}"
                log.error(self.last_error)
        return BlockAnswer(block=block, hit=False, origin="default")

    def _ask(self, fp: DeviceFingerprint, items: list[dict], snapshot: str | None) -> list[Any] | None:
        """The server's lookup results for items (specs or blocks, one result each), or None when it could not
        answer (down, cooling down, refused, or it has nothing for this device)."""
        if not self.available or self._unknown_devices.get(fp.key, 0) > time.monotonic():
            return None
        try:
            r = self.request("POST", "/v1/lookup", json={"device": fp.to_dict(), "specs": items, "snapshot": snapshot})
        except ServerUnavailable as e:
            self._mark(False, str(e))
            return None
        self._mark(True)
        if r.status_code == 404 and snapshot is None:  # the server has nothing for this device
            with self._lock:
                self._unknown_devices[fp.key] = time.monotonic() + self.max_cooldown_s
            hint = _body(r)
            log.warning(
                "tunerd server %s has no kernels for this device: %s",
                self.url,
                hint.get("hint") if isinstance(hint, dict) else hint,
            )
            return None
        if r.status_code != 200:
            self.last_error = f"lookup: HTTP {r.status_code}: {_detail(r)}"
            log.warning("tunerd lookup refused by %s: %s", self.url, self.last_error)
            return None
        body = _body(r)
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != len(items):
            self.last_error = "lookup: the server's answer has the wrong number of results"
            log.error(self.last_error)
            return None
        return results

    def _local_store(self) -> Any:
        """The local tuning database if there is one (never created here); None otherwise."""
        if self._local_checked:
            return self._local
        with self._lock:
            if self._local_checked:
                return self._local
            arg, store = self._local_arg, None
            if arg not in (None, "auto"):
                store = arg
            elif arg == "auto":
                try:
                    from tunerd.db.engine import default_url, parse_url
                    from tunerd.db.store import Store

                    url = parse_url(default_url())
                    if url.get_backend_name() != "sqlite" or (url.database and Path(url.database).exists()):
                        store = Store(url, busy_timeout_s=1.0)
                except (ImportError, StoreError, OSError) as e:
                    log.info("no local store to fall back on: %s", e)
            self._local, self._local_checked = store, True
            return store

    # ---- jobs, snapshots, bundles, reads --------------------------------------------------------
    def submit_job(
        self,
        specs: Sequence[BlockSpec] | None = None,
        suite: str | None = None,
        *,
        strategy: str = DEFAULT_STRATEGY,
        budget_trials: int | None = None,
        budget_seconds: float | None = None,
        device: DeviceArg = None,
    ) -> dict:
        """Queue a tuning job (exactly one of specs or suite); returns the job as the server shows it."""
        body: dict[str, Any] = {"strategy": strategy, "budget_trials": budget_trials, "budget_seconds": budget_seconds}
        if specs is not None:
            body["specs"] = [s.to_dict() for s in specs]
        if suite is not None:
            body["suite"] = suite
        if device is not None:
            body["device"] = device.to_dict() if isinstance(device, DeviceFingerprint) else device
        return self._call("POST", "/v1/jobs", json=body, ok=(201,), idempotent=False).json()

    def job(self, job_id: int) -> dict:
        return self._call("GET", f"/v1/jobs/{int(job_id)}").json()

    def jobs(self, limit: int = 50, status: str | None = None) -> list[dict]:
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = status
        return self._call("GET", "/v1/jobs", params=params).json()["jobs"]

    def wait_job(self, job_id: int, timeout: float = 600.0, poll_s: float = 0.5) -> dict:
        """Poll until the job is done or failed; raises TimeoutError after timeout seconds."""
        end = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in ("done", "failed"):
                return job
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(poll_s)

    def cancel_job(self, job_id: int) -> dict:
        return self._call("DELETE", f"/v1/jobs/{int(job_id)}", idempotent=False).json()

    def create_snapshot(self, name: str | None = None) -> str:
        """Pin the server's current winners; returns the snapshot's name."""
        body = {} if name is None else {"name": name}
        return self._call("POST", "/v1/snapshots", json=body, ok=(201,), idempotent=False).json()["name"]

    def snapshots(self) -> list[dict]:
        return self._call("GET", "/v1/snapshots").json()["snapshots"]

    def export_bundle(self, device: DeviceArg = None, snapshot: str | None = None) -> bytes:
        params: dict[str, Any] = {}
        if device is not None:
            params["device"] = device.key if isinstance(device, DeviceFingerprint) else device
        if snapshot is not None:
            params["snapshot"] = snapshot
        return self._call("GET", "/v1/bundle", params=params).content

    def import_bundle(self, data: bytes) -> dict:
        """Send a bundle (bytes of `tunerd export`); returns the server's import report."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"bundle data must be bytes, got {type(data).__name__}")
        return self._call(
            "POST",
            "/v1/bundle",
            content=bytes(data),
            idempotent=False,
            headers={"Content-Type": "application/octet-stream"},
        ).json()

    def devices(self) -> list[dict]:
        return self._call("GET", "/v1/devices").json()["devices"]

    def winners(self, device: DeviceArg = None, snapshot: str | None = None) -> list[dict]:
        params: dict[str, Any] = {}
        if device is not None:
            params["device"] = device.key if isinstance(device, DeviceFingerprint) else device
        if snapshot is not None:
            params["snapshot"] = snapshot
        return self._call("GET", "/v1/winners", params=params).json()["winners"]

    def health(self) -> dict:
        r = self.request("GET", "/healthz", timeout=self.timeout)
        return _body(r)


def _fingerprint(device: DeviceArg) -> DeviceFingerprint:
    if device is None:
        return current_device()
    if isinstance(device, DeviceFingerprint):
        return device
    if isinstance(device, str) and device.lstrip().startswith("{"):
        return DeviceFingerprint.from_key(device)
    return current_device(device)  # "cuda:0", "cpu", a torch.device or an index


def _body(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text[:500]


def _detail(r: httpx.Response) -> str:
    b = _body(r)
    return str(b.get("detail", b)) if isinstance(b, dict) else str(b)


# ---- wiring a client into every tunerd convolution -------------------------------------------------
class RemoteLookup:
    """kernels.conv's schedule lookup backed by a Client: one server question per (device, spec),
    then memory. Hits are kept for the life of the process; misses are asked again after miss_ttl_s."""

    def __init__(self, client: Client, snapshot: str | None = None, miss_ttl_s: float = 60.0) -> None:
        self.client = client
        self.snapshot = snapshot
        self.miss_ttl_s = miss_ttl_s
        self._memo: dict[tuple[str, str], tuple[generator.Variant | None, float]] = {}
        self._lock = threading.Lock()
        self.recording: list[tuple[BlockSpec, Any]] | None = None  # set by remote.model_specs
        self.stats = {"hits": 0, "misses": 0, "borrowed": 0, "server_lookups": 0}

    def __call__(self, spec: BlockSpec, device: Any) -> generator.Variant | None:
        if self.recording is not None:
            self.recording.append((spec, device))
            return None
        fp = _fingerprint(device)
        key = (fp.key, spec.to_json())
        memo = self._memo.get(key)
        if memo is None or memo[1] < time.monotonic():
            self.prefetch([spec], device)
            memo = self._memo[key]
        return memo[0]

    def prefetch(self, specs: Iterable[BlockSpec], device: Any) -> dict[str, int]:
        """Ask the server about many specs in one request and remember the answers."""
        fp = _fingerprint(device)
        unique = list({s.to_json(): s for s in specs}.values())
        answers = self.client.lookup(unique, device=fp, snapshot=self.snapshot) if unique else []
        counts = {"hits": 0, "misses": 0, "borrowed": 0}
        chosen: list[generator.Variant | None] = []
        with self._lock:
            self.stats["server_lookups"] += 1
            for a in answers:
                variant = a.variant()
                chosen.append(variant)
                final = variant is not None and not a.borrowed  # a borrowed schedule is asked about again later
                expires = float("inf") if final else time.monotonic() + self.miss_ttl_s
                self._memo[(fp.key, a.spec.to_json())] = (variant, expires)
                counts["borrowed" if a.borrowed else "hits" if variant is not None else "misses"] += 1
            for k in counts:
                self.stats[k] += counts[k]
        bundle = self.client.bundle
        if bundle is not None:  # the bundle's binary of a kernel the server chose, when it ships one
            for v in chosen:
                if v is not None:
                    bundle.install(v)
        return counts

    def uninstall(self) -> None:
        """Stop answering convolutions and blocks (they use default schedules again) if this lookup is installed."""
        if _installed.get("lookup") is self:
            _conv.set_schedule_lookup(None)
            set_block_lookup(None)
            _installed.clear()


class RemoteBlockLookup:
    """tunerd.blocks' block lookup backed by a Client (Client.lookup_blocks): one question per (device, block),
    then memory; hits are kept for the life of the process, misses asked again after miss_ttl_s."""

    def __init__(self, client: Client, snapshot: str | None = None, miss_ttl_s: float = 60.0) -> None:
        self.client = client
        self.snapshot = snapshot
        self.miss_ttl_s = miss_ttl_s
        self._memo: dict[tuple[str, str], tuple[BlockAnswer, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, block: Block, device: Any) -> trust.TrustedPlan | None:
        a = self.answer(block, device)
        return a.plan if a.hit else None

    def answer(self, block: Block, device: Any) -> BlockAnswer:
        fp = _fingerprint(device)
        key = (fp.key, block.to_json())
        with self._lock:
            memo = self._memo.get(key)
        if memo is not None and memo[1] >= time.monotonic():
            return memo[0]
        (a,) = self.client.lookup_blocks([block], device=fp, snapshot=self.snapshot)
        with self._lock:
            self._memo[key] = (a, float("inf") if a.hit else time.monotonic() + self.miss_ttl_s)
        return a


_installed: dict[str, RemoteLookup] = {}


def install(client: Client, snapshot: str | None = None, *, miss_ttl_s: float = 60.0) -> RemoteLookup:
    """Route every tunerd convolution's schedule choice, and every patched block's plan (tunerd.blocks), through
    client (replacing any earlier install)."""
    hook = RemoteLookup(client, snapshot=snapshot, miss_ttl_s=miss_ttl_s)
    _conv.set_schedule_lookup(hook)
    set_block_lookup(RemoteBlockLookup(client, snapshot=snapshot, miss_ttl_s=miss_ttl_s))
    _installed["lookup"] = hook
    return hook


def installed() -> RemoteLookup | None:
    return _installed.get("lookup")


class BundleLookup:
    """kernels.conv's schedule lookup backed by a bundle file alone (no server): the bundle's winner for
    (device, spec), rendered here, else None (the default schedule). Answers are kept per (device, spec)."""

    def __init__(self, answers: BundleAnswers) -> None:
        self.answers = answers
        self._memo: dict[tuple[str, str], generator.Variant | None] = {}
        self._lock = threading.Lock()

    def __call__(self, spec: BlockSpec, device: Any) -> generator.Variant | None:
        fp = _fingerprint(device)
        key = (fp.key, spec.to_json())
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        answer = self.answers.answer(spec, fp)
        variant = None if answer is None else answer.variant()
        with self._lock:
            self._memo[key] = variant
        return variant


class BundleBlockLookup:
    """tunerd.blocks' block lookup backed by a bundle file alone: its block winner for (device, block), checked
    and rendered here, else None (the planner's plan on default schedules). Kept per (device, block)."""

    def __init__(self, answers: BundleAnswers) -> None:
        self.answers = answers
        self._memo: dict[tuple[str, str], trust.TrustedPlan | None] = {}
        self._lock = threading.Lock()

    def __call__(self, block: Block, device: Any) -> trust.TrustedPlan | None:
        fp = _fingerprint(device)
        key = (fp.key, block.to_json())
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        a = self.answers.block_answer(block, fp)
        plan = None if a is None else a.plan
        with self._lock:
            self._memo[key] = plan
        return plan


def install_bundle(bundle: str | os.PathLike[str] | bytes | BundleAnswers, trusted_keys: KeyArg = None) -> BundleLookup:
    """Route every tunerd convolution's schedule choice and every patched block's plan through a bundle file
    (replacing any earlier install); a refused bundle is logged and installs lookups that answer nothing
    (default schedules)."""
    answers = bundle if isinstance(bundle, BundleAnswers) else BundleAnswers(bundle, trusted_keys)
    hook = BundleLookup(answers)
    _conv.set_schedule_lookup(hook)
    set_block_lookup(BundleBlockLookup(answers))
    _installed.clear()
    return hook
