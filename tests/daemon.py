"""What the daemon tests share: a live daemon on loopback, seeded winners, polling.

Import only after the service extras are known to be installed (test modules importorskip them first).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tunerd.api import ServerThread, create_app
from tunerd.db.fingerprint import current
from tunerd.db.store import Store
from tunerd.kernels import conv_spec, render
from tunerd.kernels.schedule import Schedule
from tunerd.settings import Settings
from tunerd.worker import JobWorker

TOKEN = "t0ken-for-tests"  # the admin token of every daemon `live` starts


def spec_of(n: int = 1, c: int = 16, k: int = 16, size: int = 8, kernel: int = 3):
    return conv_spec(n=n, c=c, k=k, in_size=(size, size), kernel=kernel, padding=kernel // 2)


def seed(store: Store, spec, median_ms: float = 1.0, schedule: Schedule | None = None, device=None, **kw: Any) -> str:
    """Record one ok trial of spec (rendered under schedule) and return its variant id."""
    v = render(spec, schedule)
    store.record_trial(
        device or current(),
        spec,
        v.schedule,
        v.source,
        status="ok",
        median_ms=median_ms,
        spread_ms=0.01,
        reps=5,
        max_error=1e-6,
        strategy="test",
        **kw,
    )
    return v.id


@contextmanager
def live(store: Any, worker: JobWorker | None = None, **settings: Any) -> Iterator[tuple[ServerThread, httpx.Client]]:
    app = create_app(Settings(**{"token": TOKEN, **settings}), store=store, worker=worker)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        yield srv, http


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
