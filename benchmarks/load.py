"""Load benchmark of the tunerd daemon's lookup route: open-loop requests at a fixed rate on loopback.

    python -m benchmarks.load --rate 500 --duration 20 --out load.json
    python -m benchmarks.load --shed --out shed.json     # saturation, then 3x it: fast 503s, bounded p99
    python -m benchmarks.load --import-records 500       # a bundle import beside another writer (SQLite lock)

Starts a daemon (worker off) in a subprocess on a fresh SQLite store seeded with one winner, then
sends single-spec lookups (hits) at exactly --rate requests/s, each at its scheduled time whether
or not earlier ones have answered (open loop: a slow server cannot slow the offered load down).
Latency is measured from the scheduled send time, so client-side queueing counts against the
server (no coordinated omission). Writes percentiles, achieved throughput and errors as JSON.

--shed first finds the daemon's saturation rate (lookups answered per second by a few closed-loop
clients, which keep it busy without a queue to shed), then offers 3x that rate open loop: the excess
must be refused with 503 in under 50 ms and the admitted lookups must keep p99 under 100 ms (targets
of issue 10). Its figures measure the daemon only while the load generator has a core of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def seed_store(db_url: str, batch: int) -> list[dict]:
    """A store with a winner for each of `batch` specs; returns the specs to look up."""
    import tunerd  # noqa: F401  (first: tunerd selects Triton's interpreter on CPU-only machines before triton loads)
    from tunerd.db.fingerprint import current
    from tunerd.db.store import Store
    from tunerd.kernels import conv_spec, render

    store = Store(db_url)
    specs = []
    for i in range(batch):
        spec = conv_spec(n=32, c=64 * (1 + i % 4), k=64, in_size=(56 - i % 8, 56 - i % 8), kernel=3, padding=1)
        v = render(spec)
        store.record_trial(
            current(),
            spec,
            v.schedule,
            v.source,
            status="ok",
            median_ms=1.0,
            spread_ms=0.01,
            reps=10,
            max_error=1e-6,
            strategy="bench",
        )
        specs.append(spec.to_dict())
    store.close()
    return specs


def start_server(db_url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """The daemon in its own process (as `tunerd serve` runs it), worker off; returns (process, url)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from tunerd.api import serve; "
        f"serve(host='127.0.0.1', port={port}, db_url={db_url!r}, worker=False, log_level='warning')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "server.log", "w"),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    end = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"server did not start: {(workdir / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)


class RawPool:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams: a few microseconds per request, so
    the load generator does not compete with the server it measures for the same CPUs."""

    def __init__(self, url: str, size: int) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port, self.size = host, int(port or 80), size
        self.idle: asyncio.Queue = asyncio.Queue()
        self.opened = 0

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.idle.empty() and self.opened < self.size:
            self.opened += 1
            conn = await asyncio.open_connection(self.host, self.port)
        else:
            conn = await self.idle.get()
        reader, writer = conn
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        data = await reader.readexactly(length)
        self.idle.put_nowait(conn)
        return status, data

    async def close(self) -> None:
        while not self.idle.empty():
            _, writer = self.idle.get_nowait()
            writer.close()


class HttpxPool:
    """The same interface over httpx.AsyncClient (heavier: about a millisecond of CPU per request)."""

    def __init__(self, url: str, size: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self.http = httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        r = await self.http.post(path, content=body, headers={"Content-Type": "application/json"})
        return r.status_code, r.content

    async def close(self) -> None:
        await self.http.aclose()


async def open_loop(
    url: str, body: bytes, rate: float, duration: float, connections: int, client: str = "raw"
) -> dict[str, Any]:
    """Send rate*duration requests, request i at start + i/rate; latency from the scheduled time."""
    n = int(rate * duration)
    latencies: list[float] = []
    service: list[float] = []
    shed: list[float] = []
    errors: dict[str, int] = {}
    pool = RawPool(url, connections) if client == "raw" else HttpxPool(url, connections)
    for _ in range(50):  # warm the connections and the server's caches
        await pool.post("/v1/lookup", body)

    async def one(scheduled: float) -> None:
        sent = time.perf_counter()
        try:
            status, data = await asyncio.wait_for(pool.post("/v1/lookup", body), 10.0)
            key = None if status == 200 and json.loads(data)["hits"] >= 1 else f"HTTP {status}"
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            key = type(e).__name__
        done = time.perf_counter()
        if key is None:
            latencies.append(done - scheduled)
            service.append(done - sent)
        elif key == "HTTP 503":
            shed.append(done - scheduled)
        else:
            errors[key] = errors.get(key, 0) + 1

    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(n):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    await pool.close()
    return {
        "requests": n,
        "ok": len(latencies),
        "shed_503": len(shed),
        "errors": errors,
        "elapsed_s": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "latency_ms": _percentiles(latencies),
        "service_latency_ms": _percentiles(service),
        "shed_latency_ms": _percentiles(shed),
    }


async def closed_loop(url: str, body: bytes, duration: float, connections: int) -> dict[str, Any]:
    """Each of `connections` clients sends its next lookup as soon as the last one answers."""
    pool = RawPool(url, connections)
    ok = 0
    statuses: dict[str, int] = {}
    end = time.perf_counter() + duration

    async def client() -> None:
        nonlocal ok
        while time.perf_counter() < end:
            status, _ = await pool.post("/v1/lookup", body)
            if status == 200:
                ok += 1
            else:
                statuses[f"HTTP {status}"] = statuses.get(f"HTTP {status}", 0) + 1

    for _ in range(50):
        await pool.post("/v1/lookup", body)
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    await pool.close()
    return {
        "connections": connections,
        "ok": ok,
        "other": statuses,
        "elapsed_s": elapsed,
        "throughput_rps": ok / elapsed,
    }


async def shed_test(url: str, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """Saturation = lookups answered per second back to back by a few closed-loop clients (the daemon always
    has the next request, never a standing queue, so it sheds nothing); then 3x saturation offered open loop."""
    probe = await closed_loop(url, body, min(args.duration, 5.0), args.probe_connections)
    saturation = probe["throughput_rps"]
    await asyncio.sleep(1.0)
    overloaded = await open_loop(url, body, 3 * saturation, args.duration, args.connections, args.client)
    return {
        "saturation_rps": round(saturation, 1),
        "saturation_probe": probe,
        "offered_3x_rps": 3 * saturation,
        "overloaded": overloaded,
    }


def import_contention(records: int, workdir: Path) -> dict[str, Any]:
    """A bundle of `records` winners imported into a fresh SQLite store while another thread keeps writing
    (record_miss, as the daemon's miss flush does): how long the import held the write lock at most, and how
    long the concurrent writer waited at worst. Renders are cold, as in a daemon that never saw the bundle."""
    import threading

    from sqlalchemy import event

    import tunerd  # noqa: F401
    from tunerd.db import engine as db_engine
    from tunerd.db.bundle import bundle_bytes, import_bundle_bytes
    from tunerd.db.errors import StoreError
    from tunerd.db.fingerprint import current
    from tunerd.db.store import Store
    from tunerd.kernels import conv_spec, generator, render

    device = current()
    source = Store(f"sqlite:///{workdir / 'source.sqlite'}")
    for i in range(records):
        spec = conv_spec(n=1 + i // 4, c=32 * (1 + i % 4), k=64, in_size=(14, 14), kernel=3, padding=1)
        v = render(spec)
        source.record_trial(
            device, spec, v.schedule, v.source, status="ok", median_ms=1.0, spread_ms=0.01, reps=5, max_error=1e-6
        )
    data = bundle_bytes(source, provenance={"benchmark": "import_contention"})
    source.close()
    generator._render.cache_clear()  # the importing daemon renders every winner for the first time

    target = Store(f"sqlite:///{workdir / 'target.sqlite'}")
    holds: list[float] = []

    @event.listens_for(target._engine, "begin")
    def _began(conn: Any) -> None:
        conn.info["tunerd.began"] = time.perf_counter()

    def _ended(conn: Any) -> None:
        began = conn.info.pop("tunerd.began", None)
        if began is not None and conn.get_execution_options().get(db_engine.WRITE):
            holds.append(time.perf_counter() - began)

    event.listen(target._engine, "commit", _ended)
    event.listen(target._engine, "rollback", _ended)
    writer = Store(f"sqlite:///{workdir / 'target.sqlite'}")
    other = conv_spec(n=1, c=8, k=8, in_size=(8, 8), kernel=1)
    waits: list[float] = []
    failed: list[str] = []
    stop = threading.Event()

    def write_misses() -> None:  # about 20 writes/s: more than a daemon's miss flush, trials and heartbeats
        while not stop.is_set():
            t = time.perf_counter()
            try:
                writer.record_miss(device, other)
            except StoreError as e:  # the busy timeout ran out: the write was lost
                failed.append(str(e)[:200])
            waits.append(time.perf_counter() - t)
            time.sleep(0.05)

    thread = threading.Thread(target=write_misses, daemon=True)
    thread.start()
    time.sleep(0.2)
    t = time.perf_counter()
    report = import_bundle_bytes(target, data)
    elapsed = time.perf_counter() - t
    time.sleep(0.2)
    stop.set()
    thread.join()
    target.close()
    writer.close()
    return {
        "records": records,
        "bundle_bytes": len(data),
        "import_s": round(elapsed, 3),
        "added": report.added,
        "write_transactions": len(holds),
        "longest_write_hold_ms": round(max(holds) * 1000, 3),
        "concurrent_writes": len(waits),
        "concurrent_writes_failed": len(failed),
        "first_failure": failed[0] if failed else None,
        "load_average_after": os.getloadavg(),
        "concurrent_write_ms": _percentiles(waits),
    }


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)

    def p(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)

    return {
        "p50": p(0.50),
        "p90": p(0.90),
        "p99": p(0.99),
        "p999": p(0.999),
        "max": round(s[-1] * 1000, 3),
        "mean": round(statistics.fmean(s) * 1000, 3),
    }


def _run(coro: Any) -> Any:
    """asyncio.run on uvloop when it is installed (a cheaper event loop for the load generator)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process pid has used (Linux /proc; None elsewhere): what a request costs
    the server, whatever else shares the machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_stack() -> dict[str, Any]:
    """What uvicorn runs on: httptools and uvloop when installed ('auto'), else h11 and asyncio."""
    import importlib.util

    have = {m: importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop")}
    return {"http": "httptools" if have["httptools"] else "h11", "loop": "uvloop" if have["uvloop"] else "asyncio"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=500.0, help="offered requests per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    ap.add_argument("--specs", type=int, default=1, help="specs per lookup request")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw asyncio HTTP/1.1 (cheap) or httpx.AsyncClient",
    )
    ap.add_argument("--url", help="measure an already running daemon (must hold the seeded specs)")
    ap.add_argument("--shed", action="store_true", help="find the saturation rate, then offer 3x it")
    ap.add_argument(
        "--probe-connections", type=int, default=4, help="--shed: closed-loop clients that find the saturation rate"
    )
    ap.add_argument(
        "--import-records",
        type=int,
        help="instead: import a bundle of this many winners while another writer runs (write-lock contention)",
    )
    ap.add_argument("--out", type=Path, default=Path("load.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.import_records:
        with tempfile.TemporaryDirectory(prefix="tunerd-import-") as tmp:
            result = {"benchmark": "bundle import beside a concurrent writer (SQLite)"}
            result.update(import_contention(args.import_records, Path(tmp)))
        result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return result
    with tempfile.TemporaryDirectory(prefix="tunerd-load-") as tmp:
        workdir = Path(tmp)
        db_url = f"sqlite:///{workdir / 'bench.sqlite'}"
        specs = seed_store(db_url, args.specs)
        proc, url = (None, args.url) if args.url else start_server(db_url, workdir)
        try:
            body = json.dumps({"specs": specs}).encode()
            gc.collect()
            gc.freeze()  # seeding imported torch: keep full collections of that heap out of the timings
            cpu0 = None if proc is None else _cpu_s(proc.pid)
            if args.shed:
                result = _run(shed_test(url, body, args))
            else:
                result = _run(open_loop(url, body, args.rate, args.duration, args.connections, args.client))
            if cpu0 is not None and proc is not None and (cpu1 := _cpu_s(proc.pid)) is not None:
                result["server_cpu_s"] = round(cpu1 - cpu0, 2)
                result["load_average_after"] = os.getloadavg()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(15)
    report = {
        "benchmark": "tunerd lookup, open loop on loopback" + (", 3x saturation" if args.shed else ""),
        "offered_rps": args.rate,
        "duration_s": args.duration,
        "specs_per_request": args.specs,
        "connections": args.connections,
        "client": args.client,
        "server": _server_stack(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **result,
    }
    if args.shed:
        over = result["overloaded"]
        report["target"] = {"shed_p99_ms": 50.0, "admitted_p99_ms": 100.0}
        report["meets_target"] = (
            bool(over["shed_latency_ms"])
            and over["shed_latency_ms"]["p99"] < 50.0
            and bool(over["latency_ms"])
            and over["latency_ms"]["p99"] < 100.0
            and not over["errors"]
        )
    else:
        report["target"] = {"p99_ms": 5.0}
        report["meets_target"] = (
            bool(result["latency_ms"]) and result["latency_ms"]["p99"] <= 5.0 and not result["errors"]
        )
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
