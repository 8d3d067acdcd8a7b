"""The tunerd CLI and the tuner<->store glue, end to end on the interpreter with tiny budgets."""
import json

import pytest

for _extra in ("fastapi", "sqlalchemy", "httpx", "typer"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")
from typer.testing import CliRunner

from kernels.spec import conv_spec
from tunerd.cli import app

SPEC = conv_spec(n=1, c=16, k=16, in_size=(6, 6), kernel=3, padding=1)


@pytest.fixture()
def db(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    monkeypatch.setenv("TUNERD_DB", url)
    return url


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


def test_source_prints_the_variant(db):
    r = run("source", SPEC.to_json())
    assert r.exit_code == 0 and "@triton.jit" in r.stdout and SPEC.to_json() in r.stdout


def test_check_compiles_for_sm90_and_reports_resources(db):
    spec = conv_spec(n=1, c=16, k=16, in_size=(6, 6), kernel=3, padding=1, dtype="bfloat16")
    r = run("check", spec.to_json())
    assert r.exit_code == 0, r.output
    assert "compiles for sm_90" in r.stdout and "wgmma" in r.stdout and "0 B spilled" in r.stdout
    r = run("check", spec.to_json(), "--schedule", '{"block_m": 8}')
    assert r.exit_code != 0


def test_tune_resume_show_export_import(db, tmp_path):
    r = run("tune", SPEC.to_json(), "--budget", "3", "--strategy", "random")
    assert r.exit_code == 0, r.output
    from db.fingerprint import current
    from db.store import Store

    store = Store(db)
    first = store.measured(current(), SPEC)
    assert len(first) >= 2 and store.winner(current(), SPEC) is not None
    # a second run resumes: nothing already measured is measured again
    r = run("tune", SPEC.to_json(), "--budget", "3", "--strategy", "random")
    assert r.exit_code == 0 and "0 measured" in r.output
    assert store.measured(current(), SPEC).keys() == first.keys()
    rows = json.loads(run("show", "--json").stdout)
    assert rows[0]["spec"] == SPEC.to_dict() and rows[0]["median_ms"] > 0
    bundle = tmp_path / "w.bundle"
    assert run("export", "--out", str(bundle)).exit_code == 0
    other = f"sqlite:///{tmp_path / 'other.sqlite'}"
    r = run("import", str(bundle), "--db", other)
    assert r.exit_code == 0 and "1 added" in r.output
    assert Store(other).winner(current(), SPEC).source == store.winner(current(), SPEC).source


def test_bad_inputs_exit_with_messages(db, tmp_path):
    r = CliRunner().invoke(app, ["tune", "{not json"])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = CliRunner().invoke(app, ["tune", "--suite", "nonesuch"])
    assert r.exit_code == 2 and "unknown suite" in r.output
    r = CliRunner().invoke(app, ["tune", SPEC.to_json(), "--strategy", "magic"])
    assert r.exit_code == 2 and "unknown strategy" in r.output
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(b"\x1f\x8b\x08truncated")
    r = CliRunner().invoke(app, ["import", str(bad)])
    assert r.exit_code == 2 and "error:" in r.output


def test_local_store_answers_conv_calls(db):
    import torch

    from db.fingerprint import current
    from db.store import Store
    from kernels import conv, runtime
    from schedules.tuner import tune as _unused  # noqa: F401  (the glue's dependency is importable)
    from tunerd import functional as F
    from tunerd.tuning import tune_spec, use_local_store

    store = Store(db)
    tune_spec(store, current(), SPEC, strategy="random", budget_trials=2)
    win = store.winner(current(), SPEC)
    lookup = use_local_store(store)
    try:
        x, w = torch.randn(1, 16, 6, 6), torch.randn(16, 16, 3, 3)
        y = F.conv2d(x, w, padding=1)
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
        assert win.variant_id in runtime._loaded  # the stored source is what ran
        assert lookup(SPEC, x.device).source == win.source
    finally:
        conv.set_schedule_lookup(None)
