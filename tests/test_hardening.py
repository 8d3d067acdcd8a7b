"""The daemon under attack and under faults: every request has a bounded cost, the defaults are secure,
health tells the truth and the store heals without a restart (issue 10, items 3-6)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

for _extra in ("fastapi", "sqlalchemy", "httpx"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")
import httpx  # noqa: E402
from daemon import TOKEN, live, seed, spec_of, wait_for  # noqa: E402

from tunerd.api import InsecureExposure, ServerThread  # noqa: E402
from tunerd.api.middleware import RECEIVED, Admission  # noqa: E402
from tunerd.api.server import check_exposure  # noqa: E402
from tunerd.db.fingerprint import current  # noqa: E402
from tunerd.db.store import Store  # noqa: E402
from tunerd.kernels import conv_spec  # noqa: E402
from tunerd.settings import Settings  # noqa: E402
from tunerd.worker import JobWorker  # noqa: E402

ADMIN, READER = TOKEN, "read-t0ken"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
AS_READER = {"Authorization": f"Bearer {READER}"}
BUNDLE = {**AS_ADMIN, "Content-Type": "application/octet-stream"}


# ---- bounded cost per request --------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/tunerd.sqlite")
    yield s
    s.close()


def test_huge_and_slow_specs_are_422_before_anything_is_recorded(store):
    dgrad = conv_spec(n=1, c=1, k=1, in_size=(10**6,), kernel=1, stride=10**6).with_(op="dgrad")
    huge_n = conv_spec(n=10**9, c=16, k=16, in_size=(8, 8), kernel=3, padding=1)
    taps = conv_spec(n=1, c=4, k=4, in_size=(200, 200), kernel=101)
    with live(store) as (srv, http):
        t0 = time.monotonic()
        for spec, why in ((dgrad, "max_stride"), (huge_n, "max_tensor_elements"), (taps, "max_taps")):
            r = http.post("/v1/lookup", json={"specs": [spec_of().to_dict(), spec.to_dict()]})
            assert r.status_code == 422 and why in r.json()["detail"], r.text
            assert r.json()["errors"][0]["index"] == 1
            r = http.post("/v1/jobs", json={"specs": [spec.to_dict()]}, headers=AS_ADMIN)
            assert r.status_code == 422 and why in r.json()["detail"]
        assert time.monotonic() - t0 < 5.0  # refused without rendering anything
        limits = http.get("/v1/limits").json()
        assert limits["spec"]["max_stride"] == 64 and limits["max_specs_per_lookup"] > 0
        srv.server.config.app.state.service.misses.flush()
    assert store.top_misses(5) == [] and store.jobs(5) == [] and store.devices() == []


def test_misses_are_batched_and_the_table_is_capped(store):
    with live(store, max_misses=100) as (srv, http):
        for i in range(6):  # 6 x 50 distinct misses
            specs = [spec_of(n=1 + i * 50 + j).to_dict() for j in range(50)]
            assert http.post("/v1/lookup", json={"specs": specs}).json()["misses"] == 50
        again = http.post("/v1/lookup", json={"specs": [spec_of(n=300).to_dict()]}).json()["results"][0]
        assert again["misses"] == 2  # counted here and in the store, exactly once each
        srv.server.config.app.state.service.misses.flush()
        srv.server.config.app.state.service.misses.flush()
    rows = store.top_misses(1000)
    assert 100 <= len(rows) <= 110 and max(r.spec.n for r in rows) == 300  # the newest are kept


def gzip_bomb(expanded: int) -> bytes:
    """A gzip stream of `expanded` zero bytes (about 1 MB per GiB), built without holding it."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(c.compress(zeros) for _ in range(expanded >> 20)) + c.flush()


def test_gzip_bomb_and_deep_json_bundles_are_refused_with_bounded_memory(store):
    import resource

    bomb = gzip_bomb(1 << 30)
    assert len(bomb) < 2 << 20
    deep = gzip.compress(b"[" * 200_000 + b"]" * 200_000)
    with live(store, max_bundle_expanded_bytes=64 << 20) as (_, http):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.monotonic()
        r = http.post("/v1/bundle", content=bomb, headers=BUNDLE)
        assert r.status_code == 413 and "expands to more than" in r.json()["detail"]
        assert time.monotonic() - t0 < 10.0
        grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grew_mib < 200, f"peak memory grew {grew_mib:.0f} MiB for a 1 GiB bomb"
        r = http.post("/v1/bundle", content=deep, headers=BUNDLE)
        assert r.status_code == 422 and "bundle" in r.json()["detail"], r.text
        r = http.post("/v1/bundle", content=deep, headers={**AS_ADMIN, "Content-Type": "text/plain"})
        assert r.status_code == 415  # a browser's simple request cannot post a bundle
        assert http.get("/healthz").status_code == 200


def bundle_of(tmp_path: Path, n: int, median_ms: float = 2.0) -> bytes:
    """A bundle of n winners (distinct specs) measured on another store."""
    from tunerd.db.bundle import bundle_bytes

    with Store(f"sqlite:///{tmp_path}/ci-{n}-{median_ms}.sqlite") as ci:
        for i in range(n):
            seed(ci, spec_of(n=1 + i, c=16, k=16), median_ms)
        return bundle_bytes(ci, provenance={"ci": n})


def dump(path: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(path) as raw:
        return list(raw.iterdump())


def test_a_bundle_import_that_fails_halfway_leaves_the_store_exactly_as_it_was(store, tmp_path, monkeypatch):
    """Batches commit as they go; a failure in a later batch takes back the earlier ones: the trials, the
    devices/specs/variants they created, and the winners they replaced (restored column for column)."""
    from tunerd.db.bundle import BundleError, import_bundle_bytes
    from tunerd.db.errors import StoreUnavailable
    from tunerd.db.rows import WinnerRow

    seed(store, spec_of(n=1), 5.0)  # measured here: a claim never displaces it
    import_bundle_bytes(store, bundle_of(tmp_path, 3, median_ms=9.0))  # older, slower claims for n=1..3
    store.record_miss(current(), spec_of(n=40))
    path = tmp_path / "tunerd.sqlite"
    before = dump(path)
    faster = bundle_of(tmp_path, 12, median_ms=1.0)  # replaces the claims for n=2,3, adds n=4..12
    real, calls = Store._ingest_one, []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 10:
            raise StoreUnavailable("disk I/O error (planted)")
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "_ingest_one", failing)
    with pytest.raises(StoreUnavailable, match="planted"):
        store.ingest([WinnerRow.from_portable(w) for w in _winners(faster)], origin="bundle:test", batch_rows=3)
    assert dump(path) == before
    monkeypatch.setattr(Store, "_ingest_one", real)
    report = import_bundle_bytes(store, faster)  # the same bundle, nothing failing: all of it lands
    assert (report.added, report.replaced, report.kept) == (9, 2, 1)
    assert dump(path) != before
    with pytest.raises(BundleError):
        import_bundle_bytes(store, faster[:-9])  # and a damaged file still changes nothing
    assert len(store.winners()) == 12


def _winners(bundle: bytes) -> list[dict]:
    return json.loads(gzip.decompress(bundle))["payload"]["winners"]


def test_other_writers_proceed_while_a_long_bundle_import_runs(store, tmp_path, monkeypatch):
    """A long import holds the write lock one short batch at a time, so a concurrent writer (the daemon's
    miss flush, a tuning trial) waits about one batch, not the whole import."""
    from tunerd.db.bundle import import_bundle_bytes

    data = bundle_of(tmp_path, 24)
    real = Store._ingest_one

    def slow(self, *a, **kw):  # a slow disk: each row holds the write transaction for 40 ms
        time.sleep(0.04)
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "_ingest_one", slow)
    other = Store(f"sqlite:///{tmp_path}/tunerd.sqlite")
    result: dict[str, Any] = {}
    importer = threading.Thread(target=lambda: result.setdefault("report", import_bundle_bytes(store, data)))
    waits: list[float] = []
    t0 = time.monotonic()
    importer.start()
    while importer.is_alive():
        t = time.monotonic()
        other.record_miss(current(), spec_of(n=99))
        waits.append(time.monotonic() - t)
        time.sleep(0.02)
    took = time.monotonic() - t0
    importer.join()
    other.close()
    assert result["report"].added == 24 and took > 24 * 0.04
    assert len(waits) >= 5, f"only {len(waits)} writes during a {took:.2f} s import"
    assert max(waits) < took / 2, f"a concurrent write waited {max(waits):.2f} s of a {took:.2f} s import"
    assert store.miss_counts(current(), [spec_of(n=99)])[spec_of(n=99).to_json()] == len(waits)


def test_deep_and_broken_json_requests_are_422(store):
    with live(store) as (_, http):
        for body in (b'{"specs": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", b"\xff\xfe", b'{"specs": [1e999999]}'):
            r = http.post("/v1/lookup", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and r.json()["detail"], body[:20]
        deep_spec = spec_of().to_dict()
        deep_spec["epilogue"] = {"bias": json.loads("[" * 500 + "]" * 500)}
        r = http.post("/v1/lookup", json={"specs": [deep_spec]})
        assert r.status_code == 422


def test_load_is_shed_fast_with_retry_after(store):
    """Past max_concurrent_requests in flight, requests get an immediate 503 with Retry-After."""
    seed(store, spec_of())

    class SlowStore:
        def __init__(self, inner: Store) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def winner(self, *a: Any, **kw: Any) -> Any:
            time.sleep(1.0)
            return self.inner.winner(*a, **kw)

    with live(SlowStore(store), max_concurrent_requests=2, live_cache_s=0) as (srv, _):
        results: list[tuple[int, float, str | None]] = []

        def one() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                t0 = time.monotonic()
                r = c.post("/v1/lookup", json={"specs": [spec_of().to_dict()]})
                results.append((r.status_code, time.monotonic() - t0, r.headers.get("retry-after")))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        ok = [r for r in results if r[0] == 200]
        shed = [r for r in results if r[0] == 503]
        assert len(ok) == 2 and len(shed) == 4, results
        assert all(r[1] < 0.5 and r[2] == "1" for r in shed), shed  # fast refusals, not queueing
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200


class SimClock:
    """Simulated time for the shedding tests: the fake server advances it by what each answer costs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(adm: Admission, clock: SimClock, rate: float, seconds: float, shed_cost_s: float) -> list[tuple]:
    """A one-threaded server in front of `adm`: requests arrive every 1/rate s (stamped on arrival, as the
    daemon's protocol does), wait in FIFO order, and cost what the app or a 503 costs on the clock.
    Returns (arrival, status, response time) for each."""
    out = []
    start = free = clock.now
    for i in range(int(rate * seconds)):
        arrived = start + i / rate
        clock.now = max(arrived, free)
        status: list[int] = []

        async def send(message: dict, status: list[int] = status) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                if message["status"] == 503:
                    clock.now += shed_cost_s

        coro = adm({"type": "http", "path": "/v1/lookup", RECEIVED: arrived}, None, send)
        with pytest.raises(StopIteration):  # the fake app never suspends: run the request to its end
            coro.send(None)
        free = clock.now
        out.append((arrived, status[0], free - arrived))
    return out


def test_a_standing_queue_is_shed_fast_and_requests_are_admitted_again_after_it():
    """3x the saturation rate on a simulated clock: the in-flight bound alone never trips (hits finish in one
    step), so the queue grows without end; the queueing-delay signal refuses the excess cheaply and keeps the
    admitted requests' latency bounded, lets a short burst through, and stops shedding once the load drops."""
    lookup_s, shed_s = 0.001, 0.0001  # saturation: 1000 lookups/s

    async def lookup(scope: dict, receive: Any, send: Any) -> None:
        clock.now += lookup_s
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    clock = SimClock()
    unshed = simulate(Admission(lookup, limit=32, clock=clock), clock, 3000, 0.0, shed_s)
    assert unshed == []
    bound_only = Admission(lookup, limit=32, target_s=1e9, clock=clock)  # the old behaviour: in-flight bound only
    late = simulate(bound_only, clock, 3000, 2.0, shed_s)
    assert all(s == 200 for _, s, _ in late) and late[-1][2] > 1.0  # seconds of queueing, nothing refused

    clock = SimClock()
    adm = Admission(lookup, limit=32, target_s=0.005, interval_s=0.05, clock=clock)
    calm = simulate(adm, clock, 500, 1.0, shed_s)
    assert all(s == 200 for _, s, _ in calm) and max(t for *_, t in calm) < 0.002
    burst = simulate(adm, clock, 1e6, 1e-5, shed_s)  # 10 requests at once: a burst, not a standing queue
    assert all(s == 200 for _, s, _ in burst) and not adm.shedding
    clock.now += 0.1

    flood = simulate(adm, clock, 3000, 3.0, shed_s)
    t0 = flood[0][0]
    steady = [r for r in flood if r[0] - t0 > 0.2]  # after the window that detects the overload
    ok = [t for _, s, t in steady if s == 200]
    refused = [t for _, s, t in steady if s == 503]
    assert adm.shedding and len(refused) > len(steady) / 2
    assert len(ok) > 0.6 * 1000 * 2.8  # most of the capacity still answers lookups
    assert max(ok) < 0.02 and max(refused) < 0.05  # vs seconds without shedding
    assert max(t for *_, t in flood) < 0.3  # the detection window itself is short

    clock.now += 0.01
    after = simulate(adm, clock, 500, 1.0, shed_s)
    assert all(s == 200 for _, s, _ in after[5:]) and not adm.shedding
    assert max(t for *_, t in after[5:]) < 0.002
    assert adm.shed == len([r for r in flood + after if r[1] == 503])


def test_the_daemon_sheds_when_requests_wait_for_its_event_loop():
    """Through uvicorn: the protocol stamps each request's arrival; an app that blocks the event loop 20 ms
    per request (a saturating synthetic load) gets most of a 40-request flood refused at once."""
    calls = []

    async def blocking(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            calls.append(scope.get(RECEIVED))
            time.sleep(0.02)  # holds the event loop like a CPU-bound answer would
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    adm = Admission(blocking, limit=1000, target_s=0.005, interval_s=0.05)
    with ServerThread(adm, settings=Settings()) as srv:
        socks = [socket.create_connection((srv.host, srv.port)) for _ in range(40)]

        def flood(path: bytes) -> list[tuple[bytes, bytes]]:
            for s in socks:
                s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            heads = []
            for s in socks:
                s.settimeout(30)
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):  # both bodies are JSON objects
                    chunk = s.recv(4096)
                    assert chunk, f"connection closed mid-response: {data[:200]!r}"
                    data += chunk
                heads.append((data.split(b" ", 2)[1], data.lower()))
            return heads

        try:
            assert {code for code, _ in flood(b"/fast")} == {b"200"}  # connections open (uvicorn accepts one a turn)
            t0 = time.monotonic()
            heads = flood(b"/slow")
        finally:
            for s in socks:
                s.close()
        refused = [h for code, h in heads if code == b"503"]
        assert len(refused) >= 10 and len(heads) - len(refused) >= 1, [c for c, _ in heads]
        assert all(b"retry-after: 1" in h for h in refused)
        assert time.monotonic() - t0 < 0.02 * (40 - len(refused)) + 2.0  # refusals cost no loop time
        assert all(isinstance(c, float) for c in calls)  # every admitted request carried its arrival stamp
        time.sleep(0.2)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert [c.get("/slow").status_code for _ in range(3)] == [200, 200, 200]  # admitted again


def test_while_shedding_the_protocol_refuses_new_requests_before_building_them():
    """With the protocol wired to the Admission (EarlyShed), a flood of POSTs to a loop-blocking app is
    mostly refused as headers are parsed: same 503 body and Retry-After, the unread bodies discarded, and
    every keep-alive connection still serves its next request."""
    from tunerd.api.middleware import EarlyShed

    async def blocking(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/slow":
            time.sleep(0.02)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    early = EarlyShed()
    adm = Admission(blocking, limit=1000, target_s=0.005, interval_s=0.05, early=early)
    at_arrival = []
    real = adm.refuse_on_arrival
    adm.refuse_on_arrival = lambda now: at_arrival.append(real(now)) or at_arrival[-1]  # type: ignore[method-assign]

    def ask(socks: list[socket.socket], path: bytes, body: bytes = b"") -> list[bytes]:
        for s in socks:
            s.sendall(
                b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
        out = []
        for s in socks:
            s.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                chunk = s.recv(4096)
                assert chunk, f"connection closed mid-response: {data[:200]!r}"
                data += chunk
            out.append(data)
        return out

    with ServerThread(adm, settings=Settings(), early=early) as srv:
        socks = [socket.create_connection((srv.host, srv.port)) for _ in range(40)]
        try:
            assert all(r.startswith(b"HTTP/1.1 200") for r in ask(socks, b"/fast"))
            answers = []
            for _ in range(3):  # three floods back to back: the later ones arrive while shedding
                answers += ask(socks, b"/slow", b'{"specs": []}')
            refused = [r for r in answers if r.startswith(b"HTTP/1.1 503")]
            assert any(at_arrival) and len(refused) >= sum(at_arrival) >= 10, (len(refused), sum(at_arrival))
            assert all(b"retry-after: 1" in r.lower() and b"server overloaded" in r for r in refused)
            time.sleep(0.2)
            assert all(r.startswith(b"HTTP/1.1 200") for r in ask(socks, b"/fast"))  # keep-alive intact
        finally:
            for s in socks:
                s.close()
    assert not adm.shedding


def test_slow_headers_are_cut_off(store):
    with live(store, header_timeout_s=1.0) as (srv, http):
        with socket.create_connection((srv.host, srv.port)) as sock:
            sock.sendall(b"POST /v1/lookup HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
            sock.settimeout(5.0)
            t0 = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server
            assert time.monotonic() - t0 < 3.0
        assert http.get("/healthz").status_code == 200


# ---- secure defaults -------------------------------------------------------------------------------------------
def test_read_and_admin_tokens(store):
    seed(store, spec_of())
    ask = {"specs": [spec_of().to_dict()]}
    job = {"specs": [spec_of().to_dict()], "budget_trials": 2}
    with live(store, read_token=READER) as (_, http):
        assert http.post("/v1/lookup", json=ask).status_code == 401  # a read token protects reads
        assert http.post("/v1/lookup", json=ask, headers=AS_READER).json()["hits"] == 1
        assert http.post("/v1/lookup", json=ask, headers=AS_ADMIN).json()["hits"] == 1  # admin reads too
        r = http.post("/v1/jobs", json=job, headers=AS_READER)
        assert r.status_code == 403 and "admin token" in r.json()["detail"]
        assert http.post("/v1/jobs", json=job, headers=AS_ADMIN).status_code == 201
        assert (
            http.post(
                "/v1/bundle", content=b"x", headers={**AS_READER, "Content-Type": "application/octet-stream"}
            ).status_code
            == 403
        )
        health = http.get("/healthz")  # open, and minimal without a token
        assert health.status_code == 200 and set(health.json()) == {"status", "db"}
        assert "worker" in http.get("/healthz", headers=AS_READER).json()
    with live(store, token=None, read_token=READER) as (_, http):
        assert http.post("/v1/jobs", json=job, headers=AS_READER).status_code == 403  # no admin: writes off


def test_host_and_origin_are_checked(store):
    with live(store) as (_, http):
        assert http.get("/healthz").status_code == 200
        r = http.get("/healthz", headers={"Host": "evil.example:8521"})  # DNS rebinding names another host
        assert r.status_code == 403 and "Host" in r.json()["detail"]
        r = http.post("/v1/lookup", json={"specs": [spec_of().to_dict()]}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "origin" in r.json()["detail"]
        assert http.get("/healthz", headers={"Origin": "http://localhost:8521"}).status_code == 200
    with live(store, allowed_hosts=["tuner.internal"], allowed_origins=["https://dash.internal"]) as (_, http):
        assert http.get("/healthz").status_code == 403  # 127.0.0.1 is not in the list now
        ok = {"Host": "tuner.internal:8521", "Origin": "https://dash.internal"}
        assert http.get("/healthz", headers=ok).status_code == 200


def test_serve_refuses_an_exposed_host_without_a_token(caplog):
    with pytest.raises(InsecureExposure, match="--insecure"):
        check_exposure(Settings(host="0.0.0.0"))
    check_exposure(Settings(host="0.0.0.0", token="x"))
    check_exposure(Settings(host="0.0.0.0", insecure=True))
    with caplog.at_level("WARNING"):
        check_exposure(Settings(host="127.0.0.1"))
    assert "no admin token" in caplog.text


def test_tunerd_serve_cli_refuses_0000_without_token(tmp_path):
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERD_")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunerd",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "1",
            "--db",
            f"sqlite:///{tmp_path}/x.sqlite",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--insecure" in r.stderr and "Traceback" not in r.stderr


def test_exported_bundles_name_no_host_unless_asked(store):
    import platform

    seed(store, spec_of())
    with live(store) as (_, http):
        plain = gzip.decompress(http.get("/v1/bundle").content)
        named = gzip.decompress(http.get("/v1/bundle", params={"name_host": True}).content)
    assert platform.node().encode() not in plain
    assert json.loads(named)["payload"]["provenance"]["host"] == platform.node()


# ---- cancel and budget stop the running trial -------------------------------------------------------------------
def test_cancel_kills_the_running_trial_and_frees_the_worker(store):
    from tunerd.schedules.harness import Harness
    from tunerd.tuning import run_job

    slow = {}

    def plant(variant):  # every candidate takes ten minutes before its kernel is even defined
        return "import time\ntime.sleep(600)\n" + variant.source

    def tuner(store_, job, device, on_progress):
        with Harness(source_hook=plant, timeout_s=900) as h:
            slow["harness"] = h
            return run_job(store_, job, device, on_progress, harness=h)

    worker = JobWorker(
        store, current(), run_job=tuner, poll_s=0.05, heartbeat_s=5.0, stale_after_s=60.0, tune_misses=False
    )
    with live(store, worker=worker) as (_, http):
        job = http.post("/v1/jobs", json={"specs": [spec_of().to_dict()]}, headers=AS_ADMIN).json()
        wait_for(lambda: "harness" in slow and slow["harness"]._timing.alive, 120, "the trial to start")
        child = slow["harness"]._timing.process
        time.sleep(1.0)
        t0 = time.monotonic()
        r = http.delete(f"/v1/jobs/{job['id']}", headers=AS_ADMIN).json()
        assert r["cancelled"] and r["stopped_running_trial"]
        wait_for(lambda: worker.status()["current_job"] is None, 5, "the worker to be free")
        assert time.monotonic() - t0 < 5.0 and not child.is_alive()
        assert http.get(f"/v1/jobs/{job['id']}").json()["error"] == "cancelled"
        assert worker.alive and store.trial_counts()["timeout"] == 0  # nothing recorded for the killed trial


# ---- honest health, self-healing store --------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path) -> Iterator[Path | None]:
    """A 16 MiB tmpfs (root only: faults like a full or read-only disk need one); None when unavailable."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or shutil.which("mount") is None
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode
    ):
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _health(http: httpx.Client) -> tuple[int, str]:
    r = http.get("/healthz")
    return r.status_code, r.json()["db"]


def test_deleted_store_file_is_an_alarm_then_recovers(store, tmp_path):
    seed(store, spec_of())
    path = tmp_path / "tunerd.sqlite"
    with live(store) as (_, http):
        assert _health(http) == (200, "ok")
        path.rename(tmp_path / "moved.sqlite")
        code, why = _health(http)
        assert code == 503 and "gone" in why
        assert not path.exists()  # no silent fresh database in its place
        (tmp_path / "moved.sqlite").rename(path)
        assert _health(http) == (200, "ok")
        assert http.post("/v1/lookup", json={"specs": [spec_of().to_dict()]}).json()["hits"] == 1


def test_damaged_store_is_503_then_recovers(store, tmp_path):
    seed(store, spec_of())
    path = tmp_path / "tunerd.sqlite"
    with live(store, live_cache_s=0) as (_, http):
        assert _health(http) == (200, "ok")
        store._engine.dispose()
        import sqlite3

        with sqlite3.connect(path) as con:  # everything into the main file, so its bytes are the store
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        good = path.read_bytes()
        path.write_bytes(b"this is not SQLite" + b"\0" * 4096 + good[4114:])
        code, why = _health(http)
        assert code == 503 and ("damaged" in why or "not a database" in why), why
        assert http.post("/v1/lookup", json={"specs": [spec_of().to_dict()]}).status_code == 503
        path.write_bytes(good)
        assert _health(http) == (200, "ok")
        assert http.post("/v1/lookup", json={"specs": [spec_of().to_dict()]}).json()["hits"] == 1


def test_read_only_store_is_503_then_recovers(small_fs, tmp_path):
    if small_fs is None:
        if os.geteuid() == 0:
            pytest.skip("root ignores file modes and cannot mount a tmpfs here")
        small_fs = tmp_path
    store = Store(f"sqlite:///{small_fs}/ro.sqlite")
    seed(store, spec_of())

    def read_only(on: bool) -> None:
        if small_fs != tmp_path:
            subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(small_fs)], check=True)
        else:
            os.chmod(small_fs, 0o555 if on else 0o755)
            for f in small_fs.glob("ro.sqlite*"):
                os.chmod(f, 0o444 if on else 0o644)

    try:
        with live(store) as (_, http):
            assert _health(http) == (200, "ok")
            store._engine.dispose()  # connections opened from now on see a read-only file
            read_only(True)
            code, why = _health(http)
            assert code == 503 and ("readonly" in why or "read-only" in why or "unable to open" in why), why
            assert http.post("/v1/lookup", json={"specs": [spec_of().to_dict()]}).status_code in (200, 503)
            read_only(False)
            assert _health(http) == (200, "ok")
            assert http.post("/v1/lookup", json={"specs": [spec_of(n=2).to_dict()]}).status_code == 200
    finally:
        read_only(False)
        store.close()


def test_full_store_is_503_then_recovers(small_fs):
    if small_fs is None:
        pytest.skip("filling a disk needs a small tmpfs (root)")
    store = Store(f"sqlite:///{small_fs}/full.sqlite")
    seed(store, spec_of())
    junk = small_fs / "junk"
    try:
        with live(store) as (_, http):
            assert _health(http) == (200, "ok")
            with open(junk, "wb") as f:
                try:
                    while True:
                        f.write(bytes(1 << 20))
                        f.flush()
                except OSError:
                    pass
            code, why = _health(http)
            assert code == 503 and "full" in why, why
            junk.unlink()
            assert _health(http) == (200, "ok")
            for n in range(2, 6):  # writes work again without a restart
                seed(store, spec_of(n=n))
    finally:
        junk.unlink(missing_ok=True)
        store.close()


def test_pool_timeouts_are_store_unavailable():
    from sqlalchemy import exc

    from tunerd.db import engine
    from tunerd.db.errors import StoreUnavailable

    eng = engine.create("sqlite://")
    with pytest.raises(StoreUnavailable, match="no connection free"):
        with engine.guard(eng):
            raise exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached")
