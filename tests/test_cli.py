"""The tunerd CLI and the tuner<->store glue, end to end on the interpreter with tiny budgets."""

import json

import pytest

for _extra in ("fastapi", "sqlalchemy", "httpx", "typer"):
    pytest.importorskip(_extra, reason="needs the service extras (pip install -e .[service])")
from typer.testing import CliRunner

from tunerd.cli import app
from tunerd.kernels import generator
from tunerd.kernels.spec import conv_spec

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
    assert r.exit_code == 0 and "@triton.jit" in r.stdout and generator.batch_free_json(SPEC) in r.stdout


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
    from tunerd.db.fingerprint import current
    from tunerd.db.store import Store

    store = Store(db)
    first = store.measured(current(), SPEC)
    assert len(first) >= 2 and store.winner(current(), SPEC) is not None
    # a second run resumes: nothing already measured is measured again
    r = run("tune", SPEC.to_json(), "--budget", "3", "--strategy", "random")
    assert r.exit_code == 0 and "nothing new measured" in r.output and "3 trials (3 ok)" in r.output
    assert store.measured(current(), SPEC).keys() == first.keys()
    rows = json.loads(run("show", "--json").stdout)
    assert rows[0]["spec"] == SPEC.to_dict() and rows[0]["median_ms"] > 0
    narrow = CliRunner().invoke(app, ["show"], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0 and "1 winner(s)" in narrow.stdout and "random" in narrow.stdout
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
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

    from tunerd import functional as F
    from tunerd.db.fingerprint import current
    from tunerd.db.store import Store
    from tunerd.kernels import conv, runtime
    from tunerd.schedules.tuner import tune as _unused  # noqa: F401  (the glue's dependency is importable)
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


def cli_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry (tunerd.cli.main) as the `tunerd` command would: exit code, stdout, stderr."""
    from tunerd.cli import main

    monkeypatch.setattr("sys.argv", ["tunerd", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_errors_are_one_line(db, tmp_path, monkeypatch, capsys):
    code, _, err = cli_main(monkeypatch, capsys, "tune", SPEC.to_json(), "--budget", "0")
    assert code == 2 and "--budget is trials per spec and must be at least 1" in one_line_error(err)
    code, _, err = cli_main(monkeypatch, capsys, "export", "--out", str(tmp_path / "x.bundle"), "--snapshot", "nope")
    assert code == 2 and "no snapshot named 'nope'" in one_line_error(err)
    assert not (tmp_path / "x.bundle").exists()
    code, _, err = cli_main(monkeypatch, capsys, "show", "--db", f"sqlite:///{tmp_path}/missing/s.sqlite")
    assert code == 2 and "missing does not exist" in one_line_error(err) and not (tmp_path / "missing").exists()
    code, out, _ = cli_main(monkeypatch, capsys)
    assert code == 0 and "Usage" in out  # no arguments: the help


def test_model_from_the_current_directory_and_input_rank(db, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_net_mod.py").write_text("import torch\n\ndef net():\n    return torch.nn.Conv2d(3, 8, 3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    code, _, err = cli_main(monkeypatch, capsys, "tune", "--model", "my_net_mod:net", "--input-shape", "3,32")
    assert code == 2 and "--input-shape has 2 dims" in one_line_error(err) and "1,3,32,32" in err


def test_mkdir_is_asked_for(tmp_path, monkeypatch):
    from tunerd.cli import _store

    url = f"sqlite:///{tmp_path}/new/dir/s.sqlite"
    store = _store(url, mkdir=True)
    assert (tmp_path / "new" / "dir" / "s.sqlite").exists() and store.winners() == []


def test_empty_show_says_what_to_do(db):
    r = CliRunner().invoke(app, ["show"], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and "no winners" in r.stdout and "tunerd tune --suite quick" in r.stdout


def _fake_tune(monkeypatch, action):
    import tunerd.tuning

    monkeypatch.setattr(tunerd.tuning, "tune_spec", lambda *a, **k: action())


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_tune_is_one_line(db, monkeypatch, capsys, how):
    import os
    import signal

    def stop():
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # the handler tune installs turns it into an orderly stop
        raise AssertionError("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    _fake_tune(monkeypatch, stop)
    code, _, err = cli_main(monkeypatch, capsys, "tune", SPEC.to_json(), "--budget", "2")
    assert code == 130 and "interrupted after 0 of 1 spec(s)" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before


def test_large_suite_on_the_interpreter_warns_with_an_estimate(db, monkeypatch, capsys):
    _fake_tune(monkeypatch, lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = cli_main(monkeypatch, capsys, "tune", "--suite", "resnet50", "--budget", "32")
    assert code == 130 and "warning: on the Triton interpreter this takes roughly" in err and " h " in err
    code, _, err = cli_main(monkeypatch, capsys, "tune", "--suite", "quick", "--budget", "2")
    assert "warning" not in err


def test_check_recognizes_tcgen05_on_sm100(db):
    spec = conv_spec(n=1, c=64, k=64, in_size=(8, 8), kernel=3, padding=1, dtype="bfloat16")
    r = run("check", spec.to_json(), "--arch", "100")
    assert r.exit_code == 0, r.output
    assert "compiles for sm_100" in r.stdout and "MMA tcgen05" in r.stdout
    assert "cp.async copies of up to 16 B" in r.stdout and "up to 0 B" not in r.stdout
