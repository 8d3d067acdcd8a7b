"""tunerd.Client against a live daemon: batch lookups, disk cache, fallbacks, retries, install, patch_remote."""

from __future__ import annotations

import copy
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

for _extra in ("fastapi", "sqlalchemy", "httpx", "typer"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")
import httpx  # noqa: E402
import torch
from test_service import TOKEN, fake_tuner, live, seed, spec_of, worker_for

from tunerd import functional as TF
from tunerd.client import Client, ClientError, ServerUnavailable, install, installed
from tunerd.db import variant_id
from tunerd.db.fingerprint import current
from tunerd.db.store import Store
from tunerd.kernels import conv as kconv
from tunerd.kernels import render, runtime
from tunerd.kernels.schedule import Schedule
from tunerd.remote import model_specs, patch_remote

ODD = Schedule(block_m=32, block_n=16, block_k=16, group_m=4, num_warps=2, num_stages=2)  # not the default


@pytest.fixture
def store(tmp_path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/server.sqlite")
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _no_lookup_hook():
    yield
    kconv.set_schedule_lookup(None)


@contextmanager
def black_hole() -> Iterator[str]:
    """A loopback port that accepts connections and never answers: the worst kind of down."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def client(url: str, tmp_path, **kw) -> Client:
    kw.setdefault("local_store", None)
    return Client(url, token=TOKEN, cache_dir=tmp_path / "client-cache", **kw)


# ---- lookups, cache, fallback ---------------------------------------------------------------------------
def test_batch_lookup_then_cached_answers_when_the_server_is_gone(store, tmp_path):
    hit_spec, miss_spec = spec_of(), spec_of(n=2, kernel=1)  # no tuned shape of that layer
    vid = seed(store, hit_spec, 1.2, ODD)
    with live(store) as (srv, _):
        url = srv.url
        c = client(url, tmp_path)
        hit, miss = c.lookup([hit_spec, miss_spec])
        assert (hit.hit, hit.origin, hit.variant_id) == (True, "server", vid)
        assert hit.schedule == render(hit_spec, ODD).schedule and hit.median_ms == 1.2 and hit.max_error == 1e-6
        v = hit.variant()
        assert v.source == render(hit_spec, ODD).source and v.id == vid and v.spec == hit_spec
        assert (miss.hit, miss.origin) == (False, "default") and miss.variant() is None
        c.close()
    files = list((tmp_path / "client-cache").rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["answer"]["variant_id"] == vid
    c = client(url, tmp_path, timeout=0.5)  # a new process: the server is gone, the disk cache answers
    t0 = time.monotonic()
    hit, miss = c.lookup([hit_spec, miss_spec])
    assert time.monotonic() - t0 < 1.5
    assert (hit.origin, hit.variant_id, hit.variant().source) == ("cache", vid, render(hit_spec, ODD).source)
    assert (miss.origin, miss.hit) == ("default", False)
    files[0].write_text("{corrupt")  # a damaged entry is ignored, never trusted
    assert c.lookup([hit_spec])[0].origin == "default"


def test_a_borrowed_schedule_runs_until_the_exact_shape_is_tuned_and_is_never_cached(store, tmp_path):
    tuned, asked = spec_of(n=4), spec_of(n=2)
    seed(store, tuned, 0.7, ODD)
    with live(store) as (srv, _):
        c = client(srv.url, tmp_path)
        (a,) = c.lookup([asked])
        assert (a.hit, a.borrowed, a.origin) == (False, True, "server")
        assert a.schedule == render(asked, ODD).schedule and a.median_ms is None  # the other shape's time is not ours
        assert a.provenance["borrowed_from"]["spec"] == tuned.to_dict()
        assert a.variant().source == render(asked, ODD).source  # re-rendered here and launched
        assert not list((tmp_path / "client-cache").rglob("*.json"))  # never cached as this shape's answer
        hook = install(c, miss_ttl_s=0.0)
        counts = hook.prefetch([asked], "cpu")
        assert counts == {"hits": 0, "misses": 0, "borrowed": 1}
        assert hook(asked, "cpu").source == render(asked, ODD).source
        seed(store, asked, 0.5)  # the exact shape gets tuned: the next question finds its own winner
        assert hook(asked, "cpu").source == render(asked).source and hook.stats["hits"] == 1
        hook.uninstall()
        c.close()


def test_a_hanging_server_never_stalls_a_lookup_past_its_timeout(tmp_path):
    spec = spec_of()
    with black_hole() as url:
        c = client(url, tmp_path, timeout=0.4, retries=2, cooldown_s=30)
        t0 = time.monotonic()
        (a,) = c.lookup([spec])
        first = time.monotonic() - t0
        assert a.origin == "default" and 0.3 < first < 1.0, first
        assert not c.available and "ReadTimeout" in c.last_error
        t0 = time.monotonic()
        for _ in range(20):  # backed off: later conv calls do not touch the server
            assert c.lookup([spec])[0].origin == "default"
        assert time.monotonic() - t0 < 0.2
    c = client(closed_port(), tmp_path, timeout=2.0, retries=2, backoff_s=0.01)
    t0 = time.monotonic()
    assert c.lookup([spec])[0].origin == "default"
    assert time.monotonic() - t0 < 1.0 and "ConnectError" in c.last_error


def test_snapshot_answers_are_served_from_disk_forever(store, tmp_path):
    pinned, missing = spec_of(), spec_of(n=2)
    vid = seed(store, pinned, 2.0)
    with live(store) as (srv, _):
        url = srv.url
        c = client(url, tmp_path)
        snap = c.create_snapshot("v1")
        assert snap == "v1"
        first = c.lookup([pinned, missing], snapshot="v1")
        assert [a.origin for a in first] == ["server", "server"] and first[0].variant_id == vid
        seed(store, missing, 0.5)  # tuned after the snapshot: must not appear in it
    c = client(url, tmp_path)
    again = c.lookup([pinned, missing], snapshot="v1")
    assert [(a.origin, a.hit) for a in again] == [("cache", True), ("cache", False)]
    assert again[0].variant_id == vid and c.available  # the server was never contacted


def test_answers_that_do_not_match_the_question_are_never_launched(store, tmp_path):
    spec = spec_of()
    seed(store, spec, 1.0, ODD)
    with live(store) as (srv, http):
        real = http.post("/v1/lookup", json={"specs": [spec.to_dict()]}).json()

    def payload(r):  # the hash check alone would pass: the server supplies source and id together
        r["source"] += "\nimport os\n"
        r["variant_id"] = variant_id(r["source"])

    tampered = {
        "altered source": lambda r: r.update(source=r["source"] + "\n# evil\n"),
        "payload with a recomputed id": payload,
        "header stripped": lambda r: r.update(source="\n".join(r["source"].split("\n")[3:])),
        "another spec": lambda r: r.update(spec=spec_of(n=7).to_dict()),
        "launch metadata": lambda r: r["launch"].update(grid=[999, 1]),
        "schedule": lambda r: r.update(schedule={"block_m": 3}),
    }
    for what, change in tampered.items():
        body = copy.deepcopy(real)
        change(body["results"][0])
        c = client(
            "http://tunerd.invalid",
            tmp_path / what.replace(" ", "_"),
            transport=httpx.MockTransport(lambda req, b=body: httpx.Response(200, json=b)),
        )
        (a,) = c.lookup([spec])
        assert (a.hit, a.origin) == (False, "default"), what
        assert "rejected" in c.last_error, what


def test_retries_with_backoff_and_no_blind_retries_of_writes(store, tmp_path):
    spec = spec_of()
    seed(store, spec, 1.0)
    with live(store) as (_, http):
        real = http.post("/v1/lookup", json={"specs": [spec.to_dict()]}).json()
    calls: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            return httpx.Response(503, json={"detail": "database is locked"})
        return httpx.Response(200, json=real)

    c = client("http://tunerd.invalid", tmp_path, retries=2, backoff_s=0.01, transport=httpx.MockTransport(flaky))
    assert c.lookup([spec])[0].origin == "server" and len(calls) == 3
    calls.clear()
    c = client("http://tunerd.invalid", tmp_path / "b", retries=1, backoff_s=0.01, transport=httpx.MockTransport(flaky))
    assert c.lookup([spec])[0].origin == "default" and len(calls) == 2

    def timeout(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ReadTimeout("timed out", request=request)

    calls.clear()
    c = client("http://tunerd.invalid", tmp_path, retries=3, backoff_s=0.01, transport=httpx.MockTransport(timeout))
    with pytest.raises(ServerUnavailable, match="after sending"):
        c.submit_job([spec])  # it may have been enqueued: never sent twice
    assert calls == ["/v1/jobs"]
    c.lookup([spec])
    assert calls.count("/v1/lookup") == 4  # reads are retried


def test_local_store_is_the_fallback_when_the_server_is_down(tmp_path, monkeypatch):
    spec = spec_of()
    local_path = tmp_path / "local.sqlite"
    local = Store(f"sqlite:///{local_path}")
    vid = seed(local, spec, 1.0, ODD)
    local.close()
    monkeypatch.setenv("TUNERD_DB", f"sqlite:///{local_path}")
    c = Client(closed_port(), cache_dir=tmp_path / "cc")  # local_store="auto" finds $TUNERD_DB
    (a,) = c.lookup([spec])
    assert (a.origin, a.variant_id, a.variant().schedule) == ("local-store", vid, render(spec, ODD).schedule)
    assert c.lookup([spec], snapshot="pinned")[0].origin == "default"  # snapshots come from the server only
    missing = tmp_path / "none.sqlite"
    monkeypatch.setenv("TUNERD_DB", f"sqlite:///{missing}")
    c = Client(closed_port(), cache_dir=tmp_path / "cc2")
    assert c.lookup([spec])[0].origin == "default" and not missing.exists()  # never creates one


# ---- admin calls -----------------------------------------------------------------------------------
def test_jobs_snapshots_and_bundles_through_the_client(store, tmp_path):
    target = Store(f"sqlite:///{tmp_path}/target.sqlite")
    worker = worker_for(store, fake_tuner())
    with live(store, worker=worker) as (a, _), live(target) as (b, _):
        c = client(a.url, tmp_path)
        job = c.submit_job([spec_of(), spec_of(n=2)], strategy="halving", budget_trials=2)
        done = c.wait_job(job["id"], timeout=20, poll_s=0.05)
        assert done["status"] == "done" and done["result"]["tuned"] == 2
        assert [j["id"] for j in c.jobs()] == [job["id"]]
        assert c.lookup([spec_of()])[0].hit
        snap = c.create_snapshot()
        assert snap in [s["name"] for s in c.snapshots()]
        data = c.export_bundle(snapshot=snap)
        report = client(b.url, tmp_path).import_bundle(data)
        assert report["added"] == 2 and report["winners"] == 2
        assert len(client(b.url, tmp_path).winners(device=current())) == 2
        assert client(b.url, tmp_path).devices()[0]["digest"] == current().digest
        with pytest.raises(ClientError) as e:
            Client(a.url, token="wrong", local_store=None).submit_job([spec_of()])
        assert e.value.status == 401 and "invalid bearer token" in e.value.detail
        with pytest.raises(ClientError) as e:
            c.job(424242)
        assert e.value.status == 404
        with pytest.raises(ClientError) as e:
            c.submit_job(suite="no-such-suite")
        assert e.value.status == 422 and "unknown suite" in e.value.detail
        with pytest.raises(ClientError) as e:
            c.import_bundle(b"\x1f\x8bgarbage")
        assert e.value.status == 422
        assert c.health()["db"] == "ok"
    target.close()


# ---- install: every conv launches the server's source --------------------------------------------------
def test_install_launches_exactly_the_servers_source(store, tmp_path):
    spec = spec_of(c=16, k=16, size=8)
    vid = seed(store, spec, 1.0, ODD)
    x = torch.randn(1, 16, 8, 8)
    w = torch.randn(16, 16, 3, 3)
    with live(store) as (srv, http):
        hook = install(client(srv.url, tmp_path), miss_ttl_s=0.2)
        v = hook(spec, torch.device("cpu"))
        assert v.id == vid and v.schedule == render(spec, ODD).schedule and v.source == render(spec, ODD).source
        y = TF.conv2d(x, w, padding=1)
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
        assert vid in runtime._loaded  # the server's variant was compiled and launched
        miss = spec_of(n=2, kernel=1)  # no tuned shape of that layer to borrow from
        assert hook(miss, torch.device("cpu")) is None and hook(miss, torch.device("cpu")) is None
        assert hook.stats["server_lookups"] == 2  # one per spec; memory after that
        time.sleep(0.25)  # a miss is asked again after its ttl: it may have been tuned meanwhile
        seed(store, miss, 1.0)
        assert hook(miss, torch.device("cpu")) is not None and hook.stats["server_lookups"] == 3
        lookups = [
            line
            for line in http.get("/metrics").text.splitlines()
            if line.startswith('tunerd_http_requests_total{method="POST",route="/v1/lookup"')
        ]
        assert lookups == ['tunerd_http_requests_total{method="POST",route="/v1/lookup",status="200"} 3.0']
        hook.uninstall()
        assert installed() is None and kconv.choose_variant(spec, torch.device("cpu"), None).id == render(spec).id


def test_patch_remote_prefetches_a_whole_training_step_in_one_request(store, tmp_path):
    from toy_blocks import InvertedResidual

    from tunerd.patching import patch

    torch.manual_seed(0)
    model = InvertedResidual(c=8, t=2)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 8, 8, 8)
    # the server has tuned every kernel of the patched model's training step (found by the same dry run)
    probe = copy.deepcopy(model)
    patch(probe)
    hook = install(client("http://unused.invalid", tmp_path))
    specs = {s for s, _ in model_specs(probe, x, hook)}
    assert {s.op for s in specs} >= {"fwd", "wgrad"} and {s.kind for s in specs} == {"conv", "depthwise"}
    for s in specs:
        seed(store, s, 1.0)
    kconv.set_schedule_lookup(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with live(store) as (srv, http):
        report = patch_remote(model, srv.url, token=TOKEN, example_input=x)
        n = len(specs)
        assert (report.prefetched, report.hits, report.misses) == (n, n, 0), str(report)
        assert len(report.swapped) == 3 and f"{n} tuned" in str(report)
        for k, v in model.state_dict().items():  # the dry run left BatchNorm statistics alone
            assert torch.equal(v, before[k]), k
        assert all(p.grad is None for p in model.parameters())
        y = model(x)
        y.square().sum().backward()
        ref = reference(x)
        ref.square().sum().backward()
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3, msg=name)
        metrics = http.get("/metrics").text
        assert 'tunerd_http_requests_total{method="POST",route="/v1/lookup",status="200"} 1.0' in metrics
        assert report.lookup.stats["server_lookups"] == 1  # the training step asked nothing more
