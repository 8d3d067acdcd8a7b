"""Shapes near a tuned one: a lookup miss for another batch or spatial size of a tuned layer answers with the
nearest winner's schedule rendered for the asked spec, marked borrowed, and still counts the miss so the
exact shape is tuned."""

from __future__ import annotations

import pytest

for _extra in ("fastapi", "sqlalchemy", "httpx"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")
from daemon import live, seed, spec_of  # noqa: E402

from tunerd.db.fingerprint import current  # noqa: E402
from tunerd.db.store import Store  # noqa: E402
from tunerd.kernels import render, trust  # noqa: E402
from tunerd.schedules.space import space  # noqa: E402


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/tunerd.sqlite")
    yield s
    s.close()


def test_nearest_winners_differ_only_in_batch_and_spatial_size(store):
    near, far, other_channels = spec_of(n=8, size=8), spec_of(n=2, size=16), spec_of(n=4, c=32, size=8)
    for sp in (far, near, other_channels):
        seed(store, sp)
    asked = spec_of(n=4, size=8)
    assert [w.spec for w in store.nearest_winners(current(), asked)] == [near, far]
    assert store.nearest_winners(current(), spec_of(n=4, size=8, kernel=1)) == []  # another kernel size
    assert [w.spec for w in store.nearest_winners(current(), near)] == [far]  # never itself


def test_a_miss_near_a_tuned_shape_borrows_its_schedule_and_queues_the_exact_shape(store):
    tuned, asked = spec_of(n=8, size=8), spec_of(n=3, size=6)
    picked = next(s for s in space(tuned) if s != render(tuned).schedule)  # a tuned, non-default schedule
    vid = seed(store, tuned, 0.5, schedule=picked)
    with live(store) as (_, http):
        body = http.post("/v1/lookup", json={"specs": [asked.to_dict(), asked.to_dict()]}).json()
        assert (body["hits"], body["misses"]) == (0, 2)  # still a miss: counted, and the exact shape gets tuned
        r = body["results"][0]
        assert not r["hit"] and r["borrowed"] is True and r["spec"] == asked.to_dict()
        assert r["schedule"] == picked.to_dict() and "timings" not in r
        assert (r["variant_id"], r["source"]) == (render(asked, picked).id, render(asked, picked).source)
        assert r["borrowed_from"]["spec"] == tuned.to_dict() and r["borrowed_from"]["variant_id"] == vid
        assert r["borrowed_from"]["timings"]["median_ms"] == 0.5 and r["misses"] == 1
        assert r["borrowed_from"]["provenance"]["strategy"] == "test"
        assert r["launch"]["grid"] == list(render(asked, picked).grid)
        # verified like every answer: the client's own rendering of (spec, schedule) is byte-identical
        trust.verify(asked, picked, r["source"], variant_id=r["variant_id"])
        snap = http.post("/v1/lookup", json={"specs": [asked.to_dict()], "snapshot": None}).json()["results"][0]
        assert snap["misses"] == 2  # every borrowed answer counts toward tuning the exact shape
    (miss,) = store.top_misses(5)
    assert miss.spec == asked and miss.count == 2


def test_a_ragged_last_batch_runs_the_layers_kernel_and_queues_nothing(store):
    """A smaller batch of a tuned layer (an epoch's ragged last batch) borrows the winner's own kernel (the batch
    is a launch argument: same source, no compile) and is not queued for tuning; a larger batch still is."""
    tuned = spec_of(n=32, size=8)
    picked = next(s for s in space(tuned) if s != render(tuned).schedule)
    vid = seed(store, tuned, 0.5, schedule=picked)
    ragged, larger = spec_of(n=17, size=8), spec_of(n=64, size=8)
    with live(store) as (_, http):
        body = http.post("/v1/lookup", json={"specs": [ragged.to_dict(), larger.to_dict()]}).json()
    r, big = body["results"]
    assert r["borrowed"] and r["same_kernel"] and r["variant_id"] == vid and r["misses"] is None
    assert not r["tuning"] and r["source"] == render(tuned, picked).source
    assert big["borrowed"] and not big["same_kernel"] and big["misses"] == 1
    assert [m.spec for m in store.top_misses(5)] == [larger]  # the ragged batch queued nothing
