"""Re-validation after upgrades: winners measured on this hardware under an older driver, CUDA, Triton, torch
or generator answer marked stale (or as the default, by a setting) until the idle worker has re-checked
and re-measured them here (the real tuner, on Triton's interpreter)."""

from __future__ import annotations

import dataclasses

import pytest

for _extra in ("fastapi", "sqlalchemy", "httpx"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")
from daemon import live, seed  # noqa: E402
from sqlalchemy import text  # noqa: E402

from tunerd.db.fingerprint import current  # noqa: E402
from tunerd.db.store import Store  # noqa: E402
from tunerd.kernels import conv_spec, render  # noqa: E402
from tunerd.schedules.space import space  # noqa: E402
from tunerd.tuning import REVALIDATE  # noqa: E402
from tunerd.worker import JobWorker  # noqa: E402

SPEC = conv_spec(n=1, c=16, k=16, in_size=(8, 8), kernel=1)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/tunerd.sqlite")
    yield s
    s.close()


def recorded_under(store: Store, device, older):
    """Rewrite the store as if device's rows had been recorded under the fingerprint `older`."""
    with store._engine.begin() as conn:
        conn.execute(
            text("UPDATE devices SET key = :new, digest = :digest WHERE key = :old"),
            {"new": older.key, "digest": older.digest, "old": device.key},
        )


def test_predecessors_are_the_same_hardware_under_another_software_stack(store):
    here = current()
    olds = [dataclasses.replace(here, **{f: "0.0.1"}) for f in ("triton", "torch")]
    olds.append(dataclasses.replace(here, driver="535.1", cuda="12.1"))
    olds.append(dataclasses.replace(here, generator_version="0.0.1"))  # recorded by an older tunerd (below)
    elsewhere = dataclasses.replace(olds[0], name="NVIDIA H100 80GB HBM3", compute_capability="9.0", interpreter=False)
    for i, dev in enumerate([*olds, elsewhere]):
        if dev.generator_version != here.generator_version:  # the store takes only sources it renders itself
            seed(store, conv_spec(n=1 + i, c=16, k=16, in_size=(4, 4), kernel=1), device=here)
            recorded_under(store, here, dev)
        else:
            seed(store, conv_spec(n=1 + i, c=16, k=16, in_size=(4, 4), kernel=1), device=dev)
    assert store.predecessors(here) == olds[::-1]  # newest first; another GPU is no predecessor
    assert store.stale_specs(here) == [conv_spec(n=1 + i, c=16, k=16, in_size=(4, 4), kernel=1) for i in range(4)]
    first = conv_spec(n=1, c=16, k=16, in_size=(4, 4), kernel=1)
    assert store.stale_winner(here, first).device == olds[0] and store.stale_winner(elsewhere, first) is None
    seed(store, first, device=here)
    assert first not in store.stale_specs(here)  # measured since the upgrade


def test_a_triton_upgrade_revalidates_old_winners_and_lookups_say_stale_until_then(store):
    here = current()
    before = dataclasses.replace(here, triton="3.8.0")
    fast, slow = [s for s in space(SPEC, max_candidates=None) if s != render(SPEC).schedule][:2]
    seed(store, SPEC, 1.0, schedule=fast)
    seed(store, SPEC, 2.0, schedule=slow)
    recorded_under(store, here, before)  # the store was filled under the previous Triton: upgrade it
    assert store.stale_candidates(here, SPEC) == [fast, slow]
    worker = JobWorker(store, here, heartbeat_s=1.0, stale_after_s=120.0, tune_misses=False, verify_claims=False)
    body = {"specs": [SPEC.to_dict()], "device": here.to_dict()}

    with live(store) as (_, http):  # not re-validated yet: the old winner, marked stale, and no miss counted
        (r,) = http.post("/v1/lookup", json=body).json()["results"]
        assert r["hit"] and r["stale"] is True and r["schedule"] == fast.to_dict()
        assert r["provenance"]["device_digest"] == before.digest and r["source"] == render(SPEC, fast).source
    with live(store, stale_answers="default") as (_, http):
        (r,) = http.post("/v1/lookup", json=body).json()["results"]
        assert (r["hit"], r["stale"]) == (False, True) and "source" not in r
    assert store.top_misses(5) == []

    assert worker.run_once() is not None  # idle: queues the re-validation job for this device and runs it
    (job,) = store.jobs(5)
    assert (job.strategy, job.status, job.specs, job.device_key) == (REVALIDATE, "done", (SPEC,), here.key), job.error
    measured = {t.schedule for t in store.measured(here, SPEC).values()}
    assert {fast, slow, render(SPEC).schedule} <= measured  # the old top candidates and the default, re-checked
    assert all(t.max_error is not None for t in store.measured(here, SPEC).values())

    with live(store) as (_, http):
        (r,) = http.post("/v1/lookup", json=body).json()["results"]
        assert r["hit"] and "stale" not in r and r["provenance"]["device_digest"] == here.digest
        assert r["provenance"]["job_id"] == job.id and r["provenance"]["strategy"] == REVALIDATE
    assert store.stale_specs(here) == [] and worker.run_once() is None  # nothing left to re-validate
