"""Fused block winners: the store (re-checked and re-rendered on every read), tune_block -> store, bundles,
the lookup service and client, and tunerd.patch running a stored winner. Real SQLite stores in tmp dirs;
hostile rows, bundles and answers (an illegal plan, an illegal schedule, a source field) are refused and
never run."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

pytest.importorskip("sqlalchemy", reason="the store needs the service extras (sqlalchemy, alembic)")

import httpx  # noqa: E402
import torch  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from sqlalchemy import text  # noqa: E402

from tunerd.db import BundleError, InvalidRecord, Store, UntrustedRecord  # noqa: E402
from tunerd.db.bundle import _canonical, bundle_bytes, import_bundle_bytes, read_bundle  # noqa: E402
from tunerd.db.fingerprint import current  # noqa: E402
from tunerd.kernels import block as B  # noqa: E402
from tunerd.kernels import block_reference, fused, reference, trust  # noqa: E402
from tunerd.kernels import plan as P  # noqa: E402
from tunerd.kernels.schedule import Schedule  # noqa: E402
from tunerd.schedules.blocks import BlockHarness, handle, space  # noqa: E402

DEV = current()  # this CPU box: the Triton interpreter
OLD = replace(DEV, torch="0.0.1")  # the same hardware before an upgrade
BLK = B.convnext(n=1, c=16, in_size=(4, 4))  # what timm's ConvNeXtBlock(16) traces to on a 4x4 input
OTHER = B.separable(n=1, c=16, k=16, in_size=(4, 4))
FUSED = P.best(BLK)  # convnext[dw+ln+pw1+act+pw2+gamma+res]: one fused step
ILLEGAL = {"block_m": 8, "block_n": 16, "block_k": 16, "group_m": 1, "num_warps": 4, "num_stages": 2}


def tuned_schedule() -> Schedule:
    """A legal schedule of BLK's fused step other than its default."""
    fs = fused.FusedSpec(BLK, FUSED.steps[0])
    return next(s for s in space(fs) if s != fused.default_schedule(fs))


def sqlite(tmp_path, name: str) -> Store:
    return Store(f"sqlite:///{tmp_path / name}.sqlite")


def put(store: Store, plan=FUSED, schedules=None, ms: float = 2.0, device=DEV, block=BLK) -> str:
    return store.record_block_winner(
        device,
        block,
        plan,
        {0: tuned_schedule()} if schedules is None else schedules,
        median_ms=ms,
        spread_ms=ms / 20,
        reps=3,
        max_error=1e-6,
        strategy="test",
    )


def test_the_store_keeps_the_fastest_plan_and_pins_snapshots(tmp_path):
    s = sqlite(tmp_path, "a")
    assert s.block_winner(DEV, BLK) is None and s.block_winners() == []
    assert put(s) == "added"
    w = s.block_winner(DEV, BLK)
    assert w.plan == FUSED and w.schedules == {0: tuned_schedule()} and not w.claimed and w.origin is None
    assert w.plan_id == trust.verify_plan(BLK, FUSED, {0: tuned_schedule()}).id
    assert "1 step [convnext]" in w.describe() and w.describe().endswith("2 ms")
    base = P.unfused(BLK)
    assert put(s, base, {}, ms=3.0) == "kept"  # slower
    assert put(s, base, {}, ms=1.0) == "replaced"
    assert s.block_winner(DEV, BLK).plan == base and s.block_winner(DEV, BLK).schedules == {}
    s.create_snapshot("before")
    assert put(s, ms=0.5, schedules={}) == "replaced"  # a fused step without a schedule takes its default
    assert s.block_winner(DEV, BLK).schedules == {0: fused.resolve(fused.FusedSpec(BLK, FUSED.steps[0]), None)}
    assert s.block_winner(DEV, BLK, snapshot="before").plan == base  # pinned
    assert s.block_winner(DEV, OTHER) is None and [w.block for w in s.block_winners(DEV)] == [BLK]
    # stale: measured on the same hardware before an upgrade, answered by the same rules as single convs
    put(s, P.best(OTHER), {}, ms=4.0, device=OLD, block=OTHER)
    stale = s.stale_block_winner(DEV, OTHER)
    assert stale is not None and stale.stale and stale.device == OLD and s.stale_block_winner(DEV, BLK) is None
    # what a caller hands in is checked before anything is written
    with pytest.raises(InvalidRecord, match="tl.dot's minimum"):
        put(s, schedules={0: Schedule.from_dict(ILLEGAL)})
    with pytest.raises(InvalidRecord, match="plan steps must cover"):
        put(s, plan=P.best(OTHER))
    with pytest.raises(InvalidRecord, match="median_ms"):
        put(s, ms=float("nan"))
    assert s.block_winner(DEV, BLK).median_ms == 0.5


def test_block_winners_on_postgresql(pg_url, tmp_path):
    """The same rules on PostgreSQL (its upsert and row locks), and a bundle between the backends."""
    s = Store(pg_url)
    assert put(s) == "added" and put(s, ms=3.0) == "kept" and put(s, P.unfused(BLK), {}, ms=1.0) == "replaced"
    s.create_snapshot("pinned")
    assert s.block_winner(DEV, BLK, snapshot="pinned").plan == P.unfused(BLK)
    lite = sqlite(tmp_path, "lite")
    assert import_bundle_bytes(lite, bundle_bytes(s, provenance={})).blocks_added == 1
    assert lite.block_winner(DEV, BLK).plan_id == s.block_winner(DEV, BLK).plan_id


HOSTILE = {  # what a hand-edited (or foreign) row says -> the refusal
    "illegal plan": (
        "plan",
        json.dumps({"steps": [{"kind": "convnext", "nodes": ["dw", "ln"]}]}),
        "not a legal plan",
    ),
    "illegal schedule": ("schedules", json.dumps({"0": ILLEGAL}), "not legal for"),
    "schedule of a step that is not fused": ("plan", P.unfused(BLK).to_json(), "has fused steps \\[\\]"),
    "another plan's kernels": ("plan_id", "0" * 24, "claimed plan id"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_row_is_refused_and_never_run(tmp_path, case, monkeypatch):
    from tunerd.tuning import StoreBlockLookup

    column, value, why = HOSTILE[case]
    s = sqlite(tmp_path, "a")
    put(s)
    with s._engine.begin() as c:
        c.execute(text(f"UPDATE block_winners SET {column} = :v"), {"v": value})
    with pytest.raises(UntrustedRecord, match=why):
        s.block_winner(DEV, BLK)
    with pytest.raises(UntrustedRecord, match=why):
        bundle_bytes(s, provenance={})  # never exported either
    launched = []
    monkeypatch.setattr(fused.runtime, "launch", lambda *a, **k: launched.append(a))
    assert StoreBlockLookup(s)(BLK, torch.device("cpu")) is None and not launched
    pytest.importorskip("fastapi")
    from tunerd.api.state import Service
    from tunerd.settings import Settings

    (answer,) = Service(Settings(), s, None).lookup([BLK], DEV, None)["results"]  # the daemon answers a miss
    assert not answer["hit"] and "plan" not in answer


def tamper(data: bytes, edit, *, unsign: bool = True) -> bytes:
    """data with its first block winner edited and the checksum resealed (a well-formed but wrong bundle)."""
    env = json.loads(gzip.decompress(data))
    if unsign:
        env.pop("signature", None)
    edit(env["payload"]["block_winners"][0])
    env["sha256"] = hashlib.sha256(_canonical(env["payload"])).hexdigest()
    return gzip.compress(_canonical(env))


BAD_BUNDLE_ROWS = {
    "a source field": (lambda w: w.update(source="import os; os.system('echo owned')"), "unknown \\['source'\\]"),
    "an illegal plan": (lambda w: w.update(plan={"steps": [{"kind": "mlp", "nodes": ["dw"]}]}), "malformed"),
    "an illegal schedule": (lambda w: w["schedules"].update({"0": ILLEGAL}), "tl.dot's minimum"),
    "a schedule for a missing step": (lambda w: w["schedules"].update({"3": w["schedules"]["0"]}), "fused steps"),
    "a wrong plan id": (lambda w: w.update(plan_id="f" * 24), "claimed plan id"),
}


def test_bundles_carry_block_winners_signed_and_rechecked(tmp_path):
    from test_store import variants

    src = sqlite(tmp_path, "ci")
    v = variants()[0]
    src.record_trial(
        DEV, v.spec, v.schedule, v.source, status="ok", median_ms=1.0, spread_ms=0.1, reps=3, max_error=0.0
    )
    put(src)
    key = Ed25519PrivateKey.generate()
    data = bundle_bytes(src, provenance={"ci": 1}, signing_key=key)
    (row,) = read_bundle(data)["payload"]["block_winners"]
    assert "source" not in row and set(row["schedules"]) == {"0"}
    dest = sqlite(tmp_path, "cluster")
    r = import_bundle_bytes(dest, data, trusted_keys=[key.public_key()])
    assert (r.winners, r.added, r.block_winners, r.blocks_added) == (1, 1, 1, 1) and r.signed_by
    got, want = dest.block_winner(DEV, BLK), src.block_winner(DEV, BLK)
    assert (got.plan, got.schedules, got.plan_id, got.median_ms) == (want.plan, want.schedules, want.plan_id, 2.0)
    assert got.claimed and got.origin == f"bundle:{r.sha256}"
    assert import_bundle_bytes(dest, data).blocks_unchanged == 1
    assert put(dest, ms=9.0) == "replaced"  # a local measurement beats a claim whatever its time
    edited = tamper(data, lambda w: w.update(median_ms=1e-6), unsign=False)
    with pytest.raises(BundleError, match="does not verify"):  # the signature covers block winners
        import_bundle_bytes(dest, edited, trusted_keys=[key.public_key()])
    for case, (edit, why) in BAD_BUNDLE_ROWS.items():
        fresh = sqlite(tmp_path, case.replace(" ", "_"))
        with pytest.raises(BundleError, match=why):
            import_bundle_bytes(fresh, tamper(data, edit))
        assert fresh.winners() == [] and fresh.block_winners() == [] and fresh.devices() == [], case  # atomic


def answer_for(result: dict):
    """A client whose server answers every lookup with result (a hostile or broken server)."""
    from tunerd.client import Client

    def handler(request: httpx.Request) -> httpx.Response:
        n = len(json.loads(request.content)["specs"])
        return httpx.Response(200, json={"device": DEV.digest, "results": [{"index": 0, **result}] * n})

    return Client("http://tunerd.test", transport=httpx.MockTransport(handler), local_store=None, retries=0)


def test_the_service_and_client_answer_blocks_and_refuse_what_does_not_check_out(tmp_path):
    pytest.importorskip("fastapi")
    from daemon import TOKEN, live, spec_of

    from tunerd.client import Client

    s = sqlite(tmp_path, "d")
    put(s)
    put(s, P.best(OTHER), {}, ms=4.0, device=OLD, block=OTHER)  # measured before an upgrade of this device
    third = B.separable(n=1, c=16, k=32, in_size=(4, 4))
    huge = B.convnext(n=1, c=16, in_size=(20000, 20000))
    with live(s) as (srv, http):
        body = {"specs": [spec_of().to_dict(), BLK.to_dict(), OTHER.to_dict(), third.to_dict()]}
        conv, hit, stale, miss = http.post("/v1/lookup", json=body).json()["results"]
        assert not conv["hit"] and conv["spec_digest"] == spec_of().digest
        assert hit["hit"] and hit["block_digest"] == BLK.digest and "source" not in hit
        assert hit["plan"] == FUSED.to_dict() and hit["schedules"] == {"0": tuned_schedule().to_dict()}
        assert stale["hit"] and stale["stale"] and stale["provenance"]["device_digest"] == OLD.digest
        assert not miss["hit"] and miss["block_digest"] == third.digest
        again = http.post("/v1/lookup", json={"specs": [BLK.to_dict()]}).json()["results"][0]  # the cached path
        assert again["plan_id"] == hit["plan_id"]
        (listed,) = http.get("/v1/winners", params={"device": DEV.digest}).json()["block_winners"]
        assert listed["plan"] == FUSED.to_dict() and listed["block_digest"] == BLK.digest and "source" not in listed
        refused = http.post("/v1/lookup", json={"specs": [huge.to_dict()]})
        assert refused.status_code == 422 and "exceeds the limit" in refused.json()["detail"]
        with Client(srv.url, local_store=None, cache_dir=tmp_path / "cache") as client:
            a, m = client.lookup_blocks([BLK, third])
        assert a.hit and a.origin == "server" and a.plan.schedules == {0: tuned_schedule()} and a.median_ms == 2.0
        assert not m.hit and m.origin == "default" and m.plan is None
    with live(s, stale_answers="default") as (srv, http):  # the setting single convs follow
        (stale,) = http.post("/v1/lookup", json={"specs": [OTHER.to_dict()]}).json()["results"]
        assert not stale["hit"] and stale["stale"] and "plan" not in stale
        auth = {"Authorization": f"Bearer {TOKEN}"}
        queued = http.post("/v1/jobs", json={"suite": "blocks:convnext_t"}, headers=auth)
        assert queued.status_code == 201 and queued.json()["suite"] == "blocks:convnext_t"
        unknown = http.post("/v1/jobs", json={"suite": "blocks:nope"}, headers=auth)
        assert unknown.status_code == 422 and "blocks:mobilenetv2" in unknown.json()["detail"]
    hostile = {**hit, "source": "import os"}
    illegal = {**hit, "schedules": {"0": ILLEGAL}}
    for result in (hostile, illegal, {**hit, "plan": P.unfused(BLK).to_dict()}, {**hit, "block": OTHER.to_dict()}):
        with answer_for(result) as client:
            (a,) = client.lookup_blocks(BLK)
            assert not a.hit and a.origin == "default" and client.last_error, result.keys()


class InProcessHarness(BlockHarness):
    """The block harness measuring in this process through the worker's own handler (schedules.blocks.handle:
    the same gate and timing), without starting a worker process (seconds a test need not spend)."""

    def __init__(self) -> None:
        super().__init__(device="cpu", reps=1)
        self._harness = SimpleNamespace(
            isolated_request=lambda _sandbox, msg, _timeout: handle(msg, torch.device("cpu"))
        )


def test_tune_store_export_import_and_patch_runs_the_winner(tmp_path):
    """The whole path: tune a tiny block (2 trials: the planner's plan and the unfused baseline), store its
    winner, carry it in a bundle to a fresh store, and tunerd.patch (local store, then a server) runs exactly
    that plan; that plan's kernels are checked against the float64 reference with NaN-poisoned buffers."""
    pytest.importorskip("fastapi")
    import models_zoo  # noqa: F401  (timm and torchvision after tunerd, with torchvision's ops declared)
    from daemon import live
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    import tunerd
    from tunerd.blocks import set_block_lookup
    from tunerd.kernels.conv import set_schedule_lookup
    from tunerd.patching import patch, unpatch
    from tunerd.tuning import tune_block_winner, use_local_store

    sep = B.separable(n=1, c=16, k=16, in_size=(4, 4), residual=True)  # DepthwiseSeparableConv(16, 16) at 4x4
    src = sqlite(tmp_path, "ci")
    with InProcessHarness() as h:
        res = tune_block_winner(src, DEV, sep, budget_trials=2, max_plans=1, max_candidates=2, harness=h)
    assert res.best is not None and len(res.trials) == 2 and res.statuses == {"ok": 2}
    dest = sqlite(tmp_path, "cluster")
    assert import_bundle_bytes(dest, bundle_bytes(src, provenance={})).blocks_added == 1
    won = dest.block_winner(DEV, sep)
    assert won.plan == res.best.plan and won.claimed and won.median_ms == res.best.trial.median_ms
    model = torch.nn.Sequential(DepthwiseSeparableConv(16, 16, pw_act=True)).eval()
    x = torch.randn(1, 16, 4, 4)
    try:
        use_local_store(dest)
        kernels = dict(patch(model, example_input=x).kernels)["0"]
        assert "tuned winner" in kernels and won.plan.describe() in kernels, kernels
        unpatch(model)
        set_schedule_lookup(None)
        set_block_lookup(None)
        with live(dest) as (srv, _):
            kernels = dict(tunerd.patch(model, server=srv.url, example_input=x).kernels)["0"]
        assert "tuned winner" in kernels and won.plan.describe() in kernels, kernels
        unpatch(model)
        set_block_lookup(None)  # no winner: the planner's plan on default tile schedules, as before
        assert "default" in dict(patch(model, example_input=x).kernels)["0"]
    finally:
        set_schedule_lookup(None)
        set_block_lookup(None)
    tp = trust.verify_plan(sep, won.plan, won.schedules, claimed_id=won.plan_id)
    gen = torch.Generator().manual_seed(1)
    params = fused.random_params(sep, "cpu", gen)
    xs = torch.randn(1, 16, 4, 4, generator=gen)
    got = fused.run_plan(sep, params, xs, tp.plan, tp.schedules, poison=True)
    ref = block_reference.block(sep, {k: v.double() for k, v in params.items()}, xs.double())
    assert reference.rel_error(got, ref) < reference.tolerance("float32")


def test_cli_show_export_and_import_carry_block_winners(tmp_path):
    from typer.testing import CliRunner

    from tunerd.cli import app

    def cli(*args: str):
        return CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})

    src, dest = tmp_path / "ci.sqlite", tmp_path / "cluster.sqlite"
    put(Store(f"sqlite:///{src}"))
    shown = cli("show", "--db", f"sqlite:///{src}")
    assert shown.exit_code == 0 and "1 block winner(s)" in shown.stdout
    assert "dw-ln-pw-act-pw-scale-add float32: 1 step [convnext] 2 ms" in shown.stdout, shown.stdout
    out = cli("export", "--db", f"sqlite:///{src}", "--out", str(tmp_path / "b.bundle"))
    assert out.exit_code == 0 and "0 winners and 1 block winners" in out.stdout, out.stdout
    done = cli("import", str(tmp_path / "b.bundle"), "--db", f"sqlite:///{dest}")
    assert done.exit_code == 0 and "block winners: 1 added" in done.stdout, done.stdout
    assert "(claimed)" in cli("show", "--db", f"sqlite:///{dest}").stdout
    with Store(f"sqlite:///{dest}")._engine.begin() as c:  # a hand-edited row: refused with its reason
        c.execute(text("UPDATE block_winners SET schedules = :v"), {"v": json.dumps({"0": ILLEGAL})})
    bad = CliRunner().invoke(app, ["show", "--db", f"sqlite:///{dest}"])
    assert bad.exit_code == 2 and "refusing the stored block winner" in bad.stderr, bad.stderr
    nope = CliRunner().invoke(app, ["tune-blocks", "--suite", "nonesuch", "--db", f"sqlite:///{dest}"])
    assert nope.exit_code == 2 and "unknown block suite 'nonesuch'" in nope.stderr
    nope = CliRunner().invoke(app, ["tune-blocks", "--suite", "convnext_t", "--only", "stage9.9"])
    assert nope.exit_code == 2 and "no blocks ['stage9.9'] in convnext_t" in nope.stderr


def test_a_block_suite_job_fans_out_and_records_block_winners(tmp_path):
    """The worker's path: a job naming a block suite fans out one task per block, and running a task tunes that
    block into the store's block winners. The real suites are too large for the interpreter, so the job's
    expansion here is two tiny blocks; the suite expansion itself is checked apart."""
    from tunerd.tuning import job_specs, run_job

    assert all(isinstance(b, B.Block) for b in job_specs(None, "blocks:mobilenetv2"))
    s = sqlite(tmp_path, "fleet")
    job = s.enqueue_job(suite="blocks:tiny", strategy="exhaustive", budget_trials=2)
    tiny = [B.separable(n=1, c=16, k=16, in_size=(4, 4)), B.separable(n=1, c=16, k=16, in_size=(4, 4), act=None)]
    task = s.claim_task("w1", expand=lambda _job: tiny)
    assert task.spec == tiny[0] and task.job.specs == (tiny[0],)
    with InProcessHarness() as h:
        result = run_job(s, task.job, DEV, block_harness=h)
    (summary,) = result["specs"]
    assert summary["describe"] == tiny[0].describe() and summary["best_ms"] > 0 and summary["plan"]
    s.finish_task(task.id, "w1", result=result)
    w = s.block_winner(DEV, tiny[0])
    assert w is not None and w.plan.describe() == summary["plan"] and not w.claimed
    assert s.block_winner(DEV, tiny[1]) is None and s.job(job).status == "running"  # its other task is queued


def test_the_verify_job_measures_an_imported_block_claim_here(tmp_path):
    """An imported block winner is a claim (1e-6 ms here); the idle worker queues a verify job for it, measures the
    claimed plan and schedules and the planner's default with the real harness, and the local measurement
    replaces the claim."""
    from tunerd.worker import JobWorker

    src, dest = sqlite(tmp_path, "src"), sqlite(tmp_path, "dest")
    put(src, P.unfused(BLK), {}, ms=1e-6)
    assert import_bundle_bytes(dest, bundle_bytes(src, provenance={})).blocks_added == 1
    assert dest.claimed_blocks(DEV) == [BLK] and dest.block_winner(DEV, BLK).claimed
    worker = JobWorker(dest, DEV, tune_misses=False, poll_s=0.05, heartbeat_s=1.0, stale_after_s=120.0)
    job = dest.job(worker.run_once())
    assert (job.status, job.strategy) == ("done", "verify"), job.error
    (summary,) = job.result["specs"]
    assert summary["statuses"] == ["ok", "ok"] and summary["claimed_ms"] == 1e-6  # the claim and the default
    w = dest.block_winner(DEV, BLK)
    assert not w.claimed and w.origin is None and w.strategy == "verify" and w.median_ms > 1e-4
    assert w.plan in (P.unfused(BLK), FUSED) and w.median_ms == summary["best_ms"]
    assert dest.claimed_blocks(DEV) == [] and worker.run_once() is None  # nothing left to verify
