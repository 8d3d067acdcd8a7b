"""The dashboard in real headless Chromium: rendered content (--dump-dom) and a non-blank screenshot."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from html import unescape
from pathlib import Path

import pytest

for _extra in ("fastapi", "sqlalchemy", "httpx", "typer"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")

from sqlalchemy import text as sql

from tunerd.api import ServerThread, create_app
from tunerd.db.fingerprint import current
from tunerd.db.store import Store
from tunerd.kernels import block as B
from tunerd.kernels import conv_spec, render
from tunerd.kernels import plan as P
from tunerd.settings import Settings

CHROMIUM = next(
    (
        p
        for p in (
            os.environ.get("CHROMIUM"),
            "/usr/bin/chromium",
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
        )
        if p and Path(p).exists()
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)"
)


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG into rows of raw pixel bytes (filters undone)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unexpected PNG format {header}"
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


BLOCKS = (B.convnext(n=1, c=16, in_size=(4, 4)), B.separable(n=1, c=16, k=16, in_size=(4, 4)))


@pytest.fixture
def seeded(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path}/dash.sqlite")
    dev = current()
    for n, ms in ((1, 0.8), (2, 1.6)):
        spec = conv_spec(n=n, c=16, k=32, in_size=(8, 8), kernel=3, padding=1)
        v = render(spec)
        store.record_trial(
            dev,
            spec,
            v.schedule,
            v.source,
            status="ok",
            median_ms=ms,
            spread_ms=0.02,
            reps=5,
            max_error=2e-7,
            strategy="halving",
        )
        store.set_winner_stats(dev, spec, speedup_vs_default=1.37 * n, fraction_of_roofline=0.42)
    running = store.enqueue_job(specs=[conv_spec(n=4, c=16, k=16, in_size=(8, 8), kernel=1)], budget_trials=8)
    store.enqueue_job(suite="resnet50", strategy="random", budget_trials=32)
    store.claim_job("gpu-box-7")
    store.heartbeat(running, "gpu-box-7", {"trials_done": 3, "trials_total": 8})
    for _ in range(4):
        store.record_miss(dev, conv_spec(n=8, c=64, k=64, in_size=(14, 14), kernel=7, padding=3, groups=64))
    for blk in BLOCKS:
        store.record_block_winner(dev, blk, P.best(blk), {}, median_ms=0.25, spread_ms=0.01, reps=5, max_error=3e-7)
    with store._engine.begin() as c:  # a hand-edited row: refused on read, the rest still listed
        edit = sql("UPDATE block_winners SET plan_id = :v WHERE block_digest = :d")
        c.execute(edit, {"v": "0" * 24, "d": BLOCKS[1].digest})
    store.create_snapshot("nightly-42")
    yield store
    store.close()


def test_dashboard_renders_in_headless_chromium(seeded, tmp_path):
    app = create_app(Settings(), store=seeded)
    with ServerThread(app) as srv:
        dom = chromium(tmp_path, srv.url + "/", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = unescape(dom.stdout)
        shot = tmp_path / "dashboard.png"
        r = chromium(tmp_path, srv.url + "/", f"--screenshot={shot}")
        assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    # rendered content: every section with the seeded facts
    for text in (
        "Devices",
        "Winners",
        "Jobs",
        "Miss queue",
        "Snapshots",
        "triton-interpreter (CPU)",
        "conv2d fwd n1 c16->k32 @8x8 k3x3",
        "1.37×",
        "2.74×",
        "42.0%",
        "0.800 ms",
        "gpu-box-7",
        "suite <b>resnet50</b>",
        "38%",
        "depthwise2d fwd n8 c64->k64 @14x14 k7x7 g64",
        "nightly-42",
        BLOCKS[0].describe(),
        P.best(BLOCKS[0]).describe(),
        "0.250 ms",
        "1 stored block winner refused (not shown)",
        "claimed plan id",
    ):
        assert text in html, f"{text!r} missing from the rendered dashboard"
    assert 'id="stat-block-winners">1<' in html and f"<td>{BLOCKS[1].describe()}</td>" not in html
    assert 'id="stat-winners">2<' in html and 'id="stat-queue">1<' in html
    assert 'class="pill running"' in html and 'class="pill queued"' in html
    assert "<script" not in html and "http://" not in html.split("<body", 1)[1]  # no external assets
    # a real, non-blank picture
    data = shot.read_bytes()
    width, height, rows = png_pixels(data)
    assert (width, height) == (1280, 900)
    values = [sum(row[i : i + 3]) for row in rows[::7] for i in range(0, len(row), 4 * 13)]
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    assert len(set(values)) > 20 and variance > 200, f"screenshot looks blank (variance {variance:.0f})"


def test_dashboard_shows_an_empty_store_and_a_down_database(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/empty.sqlite")
    with ServerThread(create_app(Settings(), store=store)) as srv:
        html = unescape(chromium(tmp_path, srv.url + "/", "--dump-dom").stdout)
    assert "No winners yet" in html and "The miss queue is empty" in html and "No jobs" in html
    store.close()
    dead = Settings(db_url="sqlite:////proc/tunerd-no-such-dir/x.sqlite")
    with ServerThread(create_app(dead)) as srv:
        html = chromium(tmp_path, srv.url + "/", "--dump-dom").stdout
    assert "Database unavailable" in html
