"""Planted attacks on the trust boundary: no kernel source from outside this process ever runs.

Every attack carries a payload, Python that writes a marker file when its module is executed (the
first test proves it would). Each test then drives the real client, store, CLI or daemon path and
asserts the marker never appears, the kernels still compute the right thing, and a claimed timing
never beats a measurement made here."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest

for _extra in ("fastapi", "sqlalchemy", "httpx", "typer", "cryptography"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")
import httpx  # noqa: E402
import torch  # noqa: E402
from test_service import BUNDLE, TOKEN, live, seed, spec_of  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tunerd import functional as TF  # noqa: E402
from tunerd.cli import app as cli  # noqa: E402
from tunerd.client import Client, install  # noqa: E402
from tunerd.db import Store, variant_id  # noqa: E402
from tunerd.db.bundle import _canonical, bundle_bytes  # noqa: E402
from tunerd.db.fingerprint import current  # noqa: E402
from tunerd.kernels import conv as kconv  # noqa: E402
from tunerd.kernels import generator, render, runtime, trust  # noqa: E402
from tunerd.kernels.schedule import Schedule  # noqa: E402
from tunerd.kernels.spec import BlockSpec  # noqa: E402
from tunerd.remote import patch_remote  # noqa: E402
from tunerd.tuning import use_local_store  # noqa: E402

ODD = Schedule(block_m=32, block_n=16, block_k=16, group_m=4, num_warps=2, num_stages=2)  # not the default
SPEC = spec_of(c=16, k=16, size=8)
OTHER = spec_of(c=16, k=16, size=8, kernel=1)  # another spec, for sources that belong elsewhere


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a planted payload ran"


@pytest.fixture(autouse=True)
def _no_lookup_hook():
    yield
    kconv.set_schedule_lookup(None)


def payload(marker: Path) -> str:
    return f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n"


def poisoned(source: str, marker: Path) -> str:
    """A genuine kernel that still computes the right thing, plus a payload run when its module loads."""
    return source + payload(marker)


def headless(source: str) -> str:
    """A kernel with its generated header (generator, spec, schedule) stripped."""
    return "\n".join(source.split("\n")[3:])


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def conv_is_correct() -> None:
    """Run the tunerd conv for SPEC against torch (fresh inputs, float64 reference)."""
    x, w = torch.randn(1, 16, 8, 8), torch.randn(16, 16, 3, 3)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    torch.testing.assert_close(TF.conv2d(x, w, padding=1).double(), ref, rtol=1e-4, atol=1e-4)


def genuine_answer(tmp_path, schedule: Schedule = ODD) -> dict:
    """What a real daemon answers for SPEC (tuned under schedule)."""
    with Store(f"sqlite:///{tmp_path}/genuine.sqlite") as store:
        seed(store, SPEC, 1.0, schedule)
        with live(store) as (_, http):
            return http.post("/v1/lookup", json={"specs": [SPEC.to_dict()]}).json()


def fake_server(body: dict, cache: Path, **kw) -> Client:
    """A client whose server answers body to every request."""
    return Client(
        "http://tunerd.invalid",
        token=TOKEN,
        cache_dir=cache,
        local_store=None,
        transport=httpx.MockTransport(lambda req: httpx.Response(200, json=body)),
        **kw,
    )


def evil_server(marker: Path, cache: Path) -> Client:
    """A client whose server answers every spec it is asked about with a well-formed hit: the genuine
    kernel (correct launch metadata and all) plus a payload, under the hash of that source."""

    def answer(request: httpx.Request) -> httpx.Response:
        results = []
        for i, d in enumerate(json.loads(request.content)["specs"]):
            v = render(BlockSpec.from_dict(d))
            src = poisoned(v.source, marker)
            results.append(
                {
                    "index": i,
                    "hit": True,
                    "spec": d,
                    "schedule": v.schedule.to_dict(),
                    "source": src,
                    "variant_id": variant_id(src),
                    "timings": {"median_ms": 1e-6},
                    "launch": {
                        "kernel_name": v.kernel_name,
                        "grid": list(v.grid),
                        "num_warps": v.num_warps,
                        "num_stages": v.num_stages,
                    },
                    "numerics": {"max_error": 0.0},
                    "provenance": {},
                }
            )
        return httpx.Response(200, json={"results": results, "hits": len(results), "misses": 0})

    return Client(
        "http://tunerd.invalid", token=TOKEN, cache_dir=cache, local_store=None, transport=httpx.MockTransport(answer)
    )


def test_the_payload_runs_if_anything_launches_it(tmp_path):
    """Control: launching a poisoned source does run the payload, so the tests below can fail."""
    mark = tmp_path / "control"
    v = render(SPEC, ODD)
    runtime.load(replace(v, source=poisoned(v.source, mark)))
    assert mark.read_text() == "pwned"


def test_verify_renders_locally_and_refuses_anything_else(marker):
    v = render(SPEC, ODD)
    assert trust.verify(SPEC, ODD, v.source, variant_id=v.id) is v  # the cached local rendering itself
    assert trust.verify(SPEC, ODD.to_dict()).source == v.source  # (spec, schedule) alone is enough
    bad = {
        "payload": poisoned(v.source, marker),
        "headless other spec": headless(render(OTHER).source),
        "headless own source": headless(v.source),
        "another schedule": render(SPEC).source,
        "not a string": 42,
    }
    for what, src in bad.items():
        with pytest.raises(trust.UntrustedSource, match="not this tunerd's rendering"):
            trust.verify(SPEC, ODD, src)
            pytest.fail(f"{what}: accepted")
    with pytest.raises(trust.UntrustedSource, match="claimed variant id"):
        trust.verify(SPEC, ODD, v.source, variant_id=variant_id(poisoned(v.source, marker)))
    with pytest.raises(trust.UntrustedSource, match="not legal"):
        trust.verify(SPEC, replace(ODD, block_m=24))
    # Another generator's claim: its text is never used; the schedule is rendered here.
    old = v.source.replace(f"tunerd {generator.GENERATOR_VERSION} --", "tunerd 0.0.9 --", 1) + payload(marker)
    assert trust.claimed_generator(old) == "0.0.9" and trust.verify(SPEC, ODD, old) is v
    with pytest.raises(trust.UntrustedSource, match=r"made by generator 0\.0\.9.*not legal"):
        trust.verify(SPEC, replace(ODD, block_m=24), old)


def test_fake_server_with_a_payload_and_a_recomputed_hash_runs_nothing(tmp_path, marker):
    real = genuine_answer(tmp_path)
    body = copy.deepcopy(real)
    hit = body["results"][0]
    hit["source"] = poisoned(hit["source"], marker)
    hit["variant_id"] = variant_id(hit["source"])  # the server supplies both: the hash alone proves nothing
    c = fake_server(body, tmp_path / "cache")
    (a,) = c.lookup([SPEC])
    assert (a.hit, a.origin) == (False, "default") and "not this tunerd's rendering" in c.last_error
    assert not list((tmp_path / "cache").rglob("*.json"))  # nothing refused is cached
    hook = install(c)
    conv_is_correct()  # the conv ran, on the default schedule
    assert hook.stats["misses"] == 1 and hook.stats["hits"] == 0
    # The same server answering the genuine body is used: its schedule, rendered here.
    (good,) = fake_server(real, tmp_path / "cache3").lookup([SPEC])
    assert (good.origin, good.variant_id, good.source) == ("server", render(SPEC, ODD).id, render(SPEC, ODD).source)


def test_patch_with_an_evil_server_trains_correctly_and_runs_nothing(tmp_path, marker):
    """tunerd.patch(model, server=...): every kernel of a training step is answered with a payload."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
    )
    reference = copy.deepcopy(model)
    x = torch.randn(2, 16, 8, 8)
    report = patch_remote(model, evil_server(marker, tmp_path / "cache"), example_input=x)
    assert len(report.swapped) == 2 and report.prefetched >= 4 and report.hits == 0, str(report)
    assert "not this tunerd's rendering" in report.lookup.client.last_error
    y = model(x)
    y.square().sum().backward()
    ref = reference(x)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3)


def test_header_stripped_source_of_another_spec_is_refused(tmp_path, marker):
    body = genuine_answer(tmp_path)
    hit = body["results"][0]
    hit["source"] = headless(render(OTHER).source) + payload(marker)
    hit["variant_id"] = variant_id(hit["source"])
    c = fake_server(body, tmp_path / "cache")
    assert c.lookup([SPEC])[0].origin == "default" and "rejected" in c.last_error
    install(c)
    conv_is_correct()


def test_an_answer_from_another_generator_version_is_rendered_here_or_refused(tmp_path, marker):
    body = genuine_answer(tmp_path)
    hit = body["results"][0]
    hit["source"] = hit["source"].replace(f"tunerd {generator.GENERATOR_VERSION} --", "tunerd 0.0.9 --", 1)
    hit["source"] = poisoned(hit["source"], marker)  # another generator's text, never compared nor run
    hit["variant_id"] = variant_id(hit["source"])
    hit["launch"]["grid"] = [1, 1]  # another generator's launch metadata: not ours to use either
    c = fake_server(body, tmp_path / "cache")
    (a,) = c.lookup([SPEC])
    local = render(SPEC, ODD)
    assert (a.hit, a.origin, a.variant_id, a.source, a.schedule) == (True, "server", local.id, local.source, ODD)
    hook = install(c)
    conv_is_correct()
    assert hook.stats["hits"] == 1 and local.id in runtime._loaded
    cached = json.loads(next((tmp_path / "cache").rglob("*.json")).read_text())
    assert cached["answer"]["source"] == local.source  # only the local rendering is persisted
    illegal = copy.deepcopy(body)
    illegal["results"][0]["schedule"]["block_m"] = 24  # not a power of two: not legal here
    c = fake_server(illegal, tmp_path / "cache2")
    assert c.lookup([SPEC])[0].origin == "default"
    assert "made by generator 0.0.9" in c.last_error and "not legal" in c.last_error


def unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def test_a_poisoned_disk_cache_is_refused_with_the_server_down(tmp_path, marker, caplog):
    real = genuine_answer(tmp_path)
    for snapshot in (None, "pinned"):  # a snapshot answer is served from disk forever: verified each time
        cache = tmp_path / f"cache-{snapshot}"
        c = fake_server(real, cache)
        assert c.lookup([SPEC], snapshot=snapshot)[0].origin == "server"
        (path,) = cache.rglob("*.json")
        down = Client(
            "http://tunerd.invalid",
            cache_dir=cache,
            local_store=None,
            timeout=0.5,
            retries=0,
            transport=httpx.MockTransport(unreachable),
        )  # the same server, now down
        assert down.lookup([SPEC], snapshot=snapshot)[0].origin == "cache"
        doc = json.loads(path.read_text())
        doc["answer"]["source"] = poisoned(doc["answer"]["source"], marker)
        doc["answer"]["variant_id"] = variant_id(doc["answer"]["source"])
        path.write_text(json.dumps(doc))
        (a,) = down.lookup([SPEC], snapshot=snapshot)
        assert (a.hit, a.origin) == (False, "default") and "corrupt cache entry" in caplog.text
        install(down, snapshot=snapshot)
        conv_is_correct()


def test_a_poisoned_local_store_is_never_launched(tmp_path, marker):
    path = tmp_path / "local.sqlite"
    with Store(f"sqlite:///{path}") as store:
        vid = seed(store, SPEC, 1.0, ODD)
    import sqlite3

    with sqlite3.connect(path) as raw:  # another program (or an old tunerd's import) wrote the file
        src = raw.execute("SELECT source FROM variants WHERE id = ?", (vid,)).fetchone()[0]
        raw.execute("UPDATE variants SET source = ? WHERE id = ?", (poisoned(src, marker), vid))
    store = Store(f"sqlite:///{path}")
    lookup = use_local_store(store)
    conv_is_correct()
    assert lookup(SPEC, torch.device("cpu")) is None  # refused: the default schedule ran
    c = Client(closed_port(), cache_dir=tmp_path / "cc", local_store=store, timeout=0.5)
    assert c.lookup([SPEC])[0].origin == "default" and "local store" in c.last_error
    with live(store) as (srv, _):  # the daemon serves what the file holds; its clients refuse it
        c = Client(srv.url, cache_dir=tmp_path / "cc2", local_store=None)
        assert c.lookup([SPEC])[0].origin == "default" and "rejected" in c.last_error
    store.close()


# ---- bundles --------------------------------------------------------------------------------------------
def crafted_bundle(tmp_path, marker: Path | None, claimed_ms: float = 1e-6) -> bytes:
    """A real exported bundle, its winner's timing set to claimed_ms and (with marker) a payload appended
    to its source, with variant id and checksum recomputed: well formed in every checkable way."""
    with Store(f"sqlite:///{tmp_path}/ci.sqlite") as ci:
        seed(ci, SPEC, 3.0, ODD)
        env = json.loads(gzip.decompress(bundle_bytes(ci, provenance={"ci": 1})))
    w = env["payload"]["winners"][0]
    w["median_ms"] = claimed_ms
    if marker is not None:
        w["source"] = poisoned(w["source"], marker)
        w["variant_id"] = variant_id(w["source"])
    env["sha256"] = hashlib.sha256(_canonical(env["payload"])).hexdigest()
    return gzip.compress(_canonical(env))


def local_store_with_a_real_measurement(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/cluster.sqlite"
    with Store(url) as store:
        seed(store, SPEC, 5.0)  # measured here (the default schedule), slower than the claim
    return url


def test_crafted_bundle_by_cli_is_refused_and_a_claimed_time_never_wins(tmp_path, marker):
    url = local_store_with_a_real_measurement(tmp_path)
    bad = tmp_path / "crafted.bundle"
    bad.write_bytes(crafted_bundle(tmp_path / "a", marker))
    before = Store(url).winners()
    r = CliRunner().invoke(cli, ["import", str(bad), "--db", url])
    assert r.exit_code == 2 and "not this tunerd's rendering" in r.output, r.output
    claim = tmp_path / "claim.bundle"  # a genuine source with an impossible time: accepted as a claim only
    claim.write_bytes(crafted_bundle(tmp_path / "b", None))
    r = CliRunner().invoke(cli, ["import", str(claim), "--db", url])
    assert r.exit_code == 0 and "0 added, 0 replaced" in r.output and "1 kept" in r.output, r.output
    with Store(url) as store:
        assert [(w.variant_id, w.median_ms, w.claimed) for w in store.winners()] == [
            (b.variant_id, b.median_ms, False) for b in before
        ]
        use_local_store(store)
        conv_is_correct()
        assert [c.median_ms for c in store.claims(current())] == [1e-6]  # kept, to be verified


def test_crafted_bundle_by_http_is_refused_and_a_claimed_time_never_wins(tmp_path, marker):
    url = local_store_with_a_real_measurement(tmp_path)
    with Store(url) as store, live(store) as (srv, http):
        local = http.post("/v1/lookup", json={"specs": [SPEC.to_dict()]}).json()["results"][0]
        r = http.post("/v1/bundle", content=crafted_bundle(tmp_path / "a", marker), headers=BUNDLE)
        assert r.status_code == 422 and "not this tunerd's rendering" in r.json()["detail"], r.text
        r = http.post("/v1/bundle", content=crafted_bundle(tmp_path / "b", None), headers=BUNDLE)
        assert r.status_code == 200 and (r.json()["kept"], r.json()["added"]) == (1, 0), r.text
        hit = http.post("/v1/lookup", json={"specs": [SPEC.to_dict()]}).json()["results"][0]
        assert (hit["variant_id"], hit["timings"]["median_ms"]) == (local["variant_id"], 5.0)
        assert hit["provenance"]["origin"] is None
        install(Client(srv.url, cache_dir=tmp_path / "cc", local_store=None))
        conv_is_correct()


def test_the_verify_job_measures_a_claimed_winner_and_demotes_its_claim(tmp_path, marker):
    """A 1e-6 ms claim wins an empty store; the daemon's worker re-measures it here with the real
    harness (and the default schedule), and the measured time replaces the claim."""
    from tunerd.worker import JobWorker

    with Store(f"sqlite:///{tmp_path}/d.sqlite") as store:
        from tunerd.db.bundle import import_bundle_bytes

        report = import_bundle_bytes(store, crafted_bundle(tmp_path, None))
        assert report.added == 1
        w = store.winner(current(), SPEC)
        assert (w.median_ms, w.claimed, w.origin) == (1e-6, True, f"bundle:{report.sha256}")
        worker = JobWorker(store, current(), tune_misses=False, poll_s=0.05, heartbeat_s=1.0, stale_after_s=120.0)
        job_id = worker.run_once()
        job = store.job(job_id)
        assert (job.status, job.strategy) == ("done", "verify"), job.error
        w = store.winner(current(), SPEC)
        assert not w.claimed and w.origin is None and w.median_ms > 1e-3 and w.strategy == "verify"
        measured = store.measured(current(), SPEC)
        assert {render(SPEC, ODD).id, render(SPEC).id} <= set(measured)  # the claim and the default, measured
        assert store.claims(current()) == [] and worker.run_once() is None  # nothing left to verify


def test_signed_bundles_with_a_pinned_key_by_cli_and_http(tmp_path):
    from test_bundle import keypair

    priv, pub = keypair(tmp_path, "ci")
    _, stranger = keypair(tmp_path, "stranger")
    src = f"sqlite:///{tmp_path}/ci.sqlite"
    with Store(src) as ci:
        seed(ci, SPEC, 3.0, ODD)
    signed, unsigned = tmp_path / "signed.bundle", tmp_path / "unsigned.bundle"
    run = CliRunner().invoke
    assert run(cli, ["export", "--db", src, "--out", str(signed), "--sign", str(priv)]).exit_code == 0
    assert run(cli, ["export", "--db", src, "--out", str(unsigned)]).exit_code == 0
    dst = f"sqlite:///{tmp_path}/dst.sqlite"
    r = run(cli, ["import", str(unsigned), "--db", dst, "--trusted-key", str(pub)])
    assert r.exit_code == 2 and "not signed" in r.output, r.output
    r = run(cli, ["import", str(signed), "--db", dst, "--trusted-key", str(stranger)])
    assert r.exit_code == 2 and "not a trusted key" in r.output, r.output
    r = run(cli, ["import", str(signed), "--db", dst, "--trusted-key", str(stranger), "--trusted-key", str(pub)])
    assert r.exit_code == 0 and "signed by" in r.output and "1 added" in r.output, r.output
    with Store(f"sqlite:///{tmp_path}/daemon.sqlite") as store, live(store, trusted_keys=[str(pub)]) as (_, http):
        r = http.post("/v1/bundle", content=unsigned.read_bytes(), headers=BUNDLE)
        assert r.status_code == 422 and "not signed" in r.json()["detail"], r.text
        r = http.post("/v1/bundle", content=signed.read_bytes(), headers=BUNDLE)
        assert r.status_code == 200 and r.json()["signed_by"] and r.json()["added"] == 1, r.text


# ---- pinned keys on the client side ----------------------------------------------------------------------
def signed_with(data: bytes, priv: Path, marker: Path | None = None) -> bytes:
    """The bundle re-signed by the key at priv (its payload altered first when marker is given)."""
    from tunerd.db.bundle import _sign, load_signing_key

    env = json.loads(gzip.decompress(data))
    if marker is not None:
        w = env["payload"]["winners"][0]
        w["source"] = poisoned(w["source"], marker)
        w["variant_id"] = variant_id(w["source"])
        env["sha256"] = hashlib.sha256(_canonical(env["payload"])).hexdigest()
    env["signature"] = _sign(load_signing_key(priv), env["sha256"])
    return gzip.compress(_canonical(env))


def test_a_client_with_a_pinned_key_uses_only_bundles_signed_by_it(tmp_path, marker, monkeypatch):
    """TUNERD_TRUSTED_KEYS (or trusted_keys=) pins ed25519 keys for tunerd.patch(bundle=...) and
    Client(bundle=...) as for `tunerd import`: an unsigned, foreign-signed or altered-after-signing bundle
    is refused with a clear reason and the convs run default schedules. A key authenticates schedule
    choices only: a signed bundle carrying a payload still runs nothing (its winner is re-rendered)."""
    from test_bundle import keypair

    import tunerd

    priv, pub = keypair(tmp_path, "ci")
    stranger_priv, stranger = keypair(tmp_path, "stranger")
    with Store(f"sqlite:///{tmp_path}/ci.sqlite") as ci:
        seed(ci, SPEC, 3.0, ODD)
        unsigned = bundle_bytes(ci, provenance={"ci": 1})
    signed = signed_with(unsigned, priv)
    env = json.loads(gzip.decompress(signed))
    env["payload"]["winners"][0]["median_ms"] = 1e-6  # altered after signing, checksum recomputed
    env["sha256"] = hashlib.sha256(_canonical(env["payload"])).hexdigest()
    files = {}
    for name, data in (
        ("unsigned", unsigned),
        ("signed", signed),
        ("stranger", signed_with(unsigned, stranger_priv)),
        ("altered", gzip.compress(_canonical(env))),
        ("payload", signed_with(unsigned, priv, marker)),
    ):
        files[name] = tmp_path / f"{name}.bundle"
        files[name].write_bytes(data)
    cpu = torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False))

    monkeypatch.setenv("TUNERD_TRUSTED_KEYS", json.dumps([str(pub)]))
    for name, why in (
        ("unsigned", "not signed"),
        ("stranger", "not a trusted key"),
        ("altered", "does not verify"),
    ):
        report = tunerd.patch(model, bundle=files[name])
        assert why in report.bundle.error and why in str(report), (name, report.bundle.error)
        assert report.lookup(SPEC, cpu) is None  # refused: the default schedule runs
        conv_is_correct()
        tunerd.unpatch(model)
        c = Client(closed_port(), cache_dir=tmp_path / f"cc-{name}", local_store=None, timeout=0.3, bundle=files[name])
        assert c.lookup([SPEC])[0].origin == "default" and why in c.bundle.error
    report = tunerd.patch(model, bundle=files["signed"])
    assert report.bundle.error is None and report.bundle.signed_by and "signed by" in str(report)
    assert report.lookup(SPEC, cpu).schedule == ODD
    conv_is_correct()
    tunerd.unpatch(model)
    c = Client(closed_port(), cache_dir=tmp_path / "cc", local_store=None, timeout=0.3, bundle=files["signed"])
    (a,) = c.lookup([SPEC])
    assert (a.origin, a.schedule, a.variant_id) == ("bundle", ODD, render(SPEC, ODD).id)
    assert a.provenance["signed_by"] == report.bundle.signed_by
    poisoned_but_signed = tunerd.patch(model, bundle=files["payload"])  # the signature verifies; the source is not ours
    assert poisoned_but_signed.bundle.error is None and poisoned_but_signed.lookup(SPEC, cpu) is None
    conv_is_correct()
    tunerd.unpatch(model)

    assert tunerd.patch(model, bundle=files["signed"], trusted_keys=[stranger]).lookup(SPEC, cpu) is None
    tunerd.unpatch(model)
    assert tunerd.patch(model, bundle=files["unsigned"], trusted_keys=[]).lookup(SPEC, cpu).schedule == ODD
    tunerd.unpatch(model)
    monkeypatch.setenv("TUNERD_TRUSTED_KEYS", json.dumps([str(tmp_path / "missing.pub")]))
    report = tunerd.patch(model, bundle=files["signed"])  # a pin that cannot be read is not "no pin"
    assert "cannot read key file" in report.bundle.error and report.lookup(SPEC, cpu) is None
    tunerd.unpatch(model)
    monkeypatch.delenv("TUNERD_TRUSTED_KEYS")
    assert tunerd.patch(model, bundle=files["unsigned"]).lookup(SPEC, cpu).schedule == ODD  # nothing pinned
    tunerd.unpatch(model)
    r = CliRunner().invoke(
        cli,
        ["import", str(files["unsigned"]), "--db", f"sqlite:///{tmp_path}/d.sqlite"],
        env={"TUNERD_TRUSTED_KEYS": json.dumps([str(pub)])},
    )
    assert r.exit_code == 2 and "not signed" in r.output, r.output  # the CLI honours the variable too
