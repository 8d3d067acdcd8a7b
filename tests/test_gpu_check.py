"""scripts/gpu-check.sh: the dry run on CPU (the GPU run's own code path), its time slices, signal
handling, the bare-box import blocker and the filing of fetched results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check, run
from tunerd.schedules.replay import Table

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check(*args: str, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "OUT"))}
    return subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_dry_run_writes_every_result(tmp_path):
    # a generous budget: the slices must not cut a loaded CI box; the phases' own limits keep it short
    proc = _gpu_check("--dry-run", "--out", str(tmp_path), "--budget", "900")
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-6000:]
    assert {p.name for p in tmp_path.iterdir()} <= set(gpu_check.OUT_FILES)  # flat, at most 8 files
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["schema"] == gpu_check.SCHEMA and s["dry_run"] and s["complete"] and s["stopped_by"] is None
    status = {p["name"]: p["status"] for p in s["phases"]}
    assert status == {
        "install": "skipped",
        "env": "ok",
        "pytest": "ok",
        "bench": "ok",
        "blocks": "ok",
        "replay": "ok",
        "static": "ok",
    }, s["phases"]
    assert all(p["seconds"] > 0 and p["slice_s"] > 0 for p in s["phases"] if p["name"] in gpu_check.PHASES)
    # the box's missing packages were missing here too, and `pytest -m gpu` still collected cleanly
    assert all(s["imports"][m] is None for m in ("fastapi", "sqlalchemy", "httpx", "typer", "uvicorn"))
    assert s["imports"]["torch"] and s["imports"]["jinja2"] and not s["device"]["cuda"]
    tests = s["results"]["pytest"]
    assert tests["tests"] > 100 and tests["errors"] == tests["failures"] == 0
    assert tests["skipped"] == tests["tests"]  # every gpu test skips on CPU; none was deselected by an error
    assert (tmp_path / "pytest.xml").read_text().startswith("<?xml")
    # the benchmark: the named subset, bf16, cut by its time limit with the rest listed
    bench = json.loads((tmp_path / "results.json").read_text())
    assert bench["schema"] == "tunerd-benchmark/1" and bench["config"]["cases"] == "quick"
    labels = {p.label for p in run.SUBSETS["quick"]}
    assert bench["cases"] and all(c["pick"] in labels and c["dtype"] == "bfloat16" for c in bench["cases"])
    first = bench["cases"][0]
    assert first["pass"] == "fwd" and first["contenders"]["tunerd_default"]["status"] == "ok"
    assert first["contenders"]["torch"]["status"] == "ok" and first["roofline"]["roofline_ms"] > 0
    ran = len(bench["cases"]) + (bench["stopped"] or {}).get("cases_not_run", 0)
    assert ran == 2 * 3 and s["results"]["bench"]["cases"] == len(bench["cases"])
    assert "| quick |" in (tmp_path / "report.md").read_text()
    # the block benchmark: one tiny block's forward, every contender checked, flat as blocks.json
    blocks = json.loads((tmp_path / "blocks.json").read_text())
    assert blocks["schema"] == "tunerd-block-benchmark/1" and s["results"]["blocks"]["cases"] == len(blocks["cases"])
    assert blocks["cases"] and blocks["cases"][0]["contenders"]["tunerd"]["status"] == "ok"
    # the timing tables: real tables, a seeded sample of their space
    with tarfile.open(tmp_path / "tables.tar") as tar:
        tables = {m.name: Table.from_dict(json.load(tar.extractfile(m))) for m in tar.getmembers()}
    recorded = {t["file"]: t for t in s["results"]["replay"]["tables"]}
    assert tables and set(tables) == set(recorded)
    for name, tb in tables.items():
        assert name.startswith("interp_") and tb.trials and tb.best.median_ms > 0
        assert tb.space_size >= len(tb.trials) and tb.complete == (tb.space_size == len(tb.trials))
        assert recorded[name]["best_ms"] == tb.best.median_ms and recorded[name]["candidates"] == len(tb.trials)
    # the static compare: compiled for sm_90 and compared with the committed audit of this Triton
    static = json.loads((tmp_path / "static.json").read_text())
    assert len(static["rows"]) == 2 and all(r["ok"] for r in static["rows"])
    c = static["compare"]
    assert c["against"] and c["compared"] == 2 and c["identical"] == 2, c
    log = (tmp_path / "gpu-check.log").read_text()
    assert all(f"== {name}: ok" in log for name in gpu_check.PHASES)


@pytest.mark.slow
def test_sigterm_stops_the_running_phase_and_keeps_the_summary(tmp_path):
    proc = _gpu_check("--dry-run", "--out", str(tmp_path), "--phases", "pytest,bench", "--budget", "600")
    summary = tmp_path / "summary.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until pytest is running
        try:
            if json.loads(summary.read_text())["phases"][2]["status"] == "running":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    time.sleep(3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 60 and proc.returncode == 1, out[-4000:]
    s = json.loads(summary.read_text())
    assert s["stopped_by"] == "SIGTERM" and not s["complete"]
    assert [p["status"] for p in s["phases"]] == ["skipped", "ok", "interrupted", "interrupted"]


def test_a_phase_past_its_slice_is_interrupted_then_killed(tmp_path):
    with open(tmp_path / "log", "w") as log:
        runner = gpu_check.Runner(log, dict(os.environ), grace=1.0)
        t0 = time.monotonic()
        polite = runner.run(
            [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], time.monotonic() + 2
        )
        ignores_sigint = (
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
        )
        stubborn = runner.run([sys.executable, "-c", ignores_sigint], time.monotonic() + 2)
        fine = runner.run([sys.executable, "-c", "print('done')"], time.monotonic() + 30)
    assert time.monotonic() - t0 < 30
    assert polite.status == "timed_out" and polite.rc != 0
    assert stubborn.status == "timed_out" and stubborn.rc == -signal.SIGKILL
    assert fine.status == "ok" and fine.rc == 0
    text = (tmp_path / "log").read_text()
    assert text.splitlines().count("up") == 2 and "done" in text.splitlines() and text.count("time slice over") == 2


def test_slices_are_cumulative_shares_and_the_last_runs_to_the_end():
    d = gpu_check.deadlines(100.0, 600.0, list(gpu_check.PHASES))
    assert d["pytest"] == pytest.approx(100 + 500 * 0.32) and d["bench"] == pytest.approx(100 + 500 * 0.62)
    assert d["static"] == 600.0 and list(d.values()) == sorted(d.values())
    assert gpu_check.deadlines(0.0, 50.0, ["bench", "replay"]) == {
        "bench": pytest.approx(50 * 0.3 / 0.4),
        "replay": 50.0,
    }


def test_bare_box_blocker_hides_modules_and_their_distributions():
    code = (
        "import importlib.util as u, importlib.metadata as m, json\n"
        "names = {d.metadata['Name'].lower() for d in m.distributions()}\n"
        "try:\n    import sqlalchemy.orm; imported = True\nexcept ModuleNotFoundError:\n    imported = False\n"
        "print(json.dumps([u.find_spec('fastapi') is None, imported, 'sqlalchemy' in names, "
        "u.find_spec('jinja2') is not None]))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts" / "box_site"), GPU_CHECK_BLOCK="fastapi,sqlalchemy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [True, False, False, True]


def test_junit_counts_and_failures(tmp_path):
    (tmp_path / "r.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure message="boom"/></testcase>'
        '<testcase classname="t" name="c"><error message="bad fixture"/></testcase>'
        '<testcase classname="t" name="d"><skipped/></testcase></testsuite></testsuites>'
    )
    r = gpu_check.junit(tmp_path / "r.xml")
    assert (r["tests"], r["passed"], r["failures"], r["errors"], r["skipped"]) == (4, 1, 1, 1, 1)
    assert [f["test"] for f in r["failed_tests"]] == ["t::b", "t::c"] and r["failed_tests"][0]["message"] == "boom"
    assert gpu_check.junit(tmp_path / "missing.xml") is None


def test_collect_files_a_fetched_run(tmp_path):
    src, repo = tmp_path / "fetched", tmp_path / "repo"
    src.mkdir()
    (src / "summary.json").write_text(
        json.dumps({"schema": gpu_check.SCHEMA, "commit_as": "benchmarks/results/2026-12-01-nvidia-h200"})
    )
    (src / "report.md").write_text("# report\n")
    audit = next((ROOT / "benchmarks" / "results").glob("*-static-sm90-*/static.json"))
    (src / "static.json").write_bytes(audit.read_bytes())
    (src / "blocks.json").write_bytes((ROOT / "benchmarks/results/2026-12-02-blocks-cpu/results.json").read_bytes())
    table = next((ROOT / "benchmarks" / "tables").glob("interp_depthwise2d_*.json"))
    with tarfile.open(src / "tables.tar", "w") as tar:
        tar.add(table, arcname=table.name)
    dest = gpu_check.collect(src, repo, seeds=1, strategies=["random", "model"])
    assert dest == repo / "benchmarks/results/2026-12-01-nvidia-h200"
    assert sorted(p.name for p in dest.iterdir()) == [
        "blocks.json",
        "blocks.md",
        "replay.json",
        "report.md",
        "static.json",
        "static.md",
        "summary.json",
    ]
    assert (dest / "static.md").read_text().startswith("# Static sm_90 audit")
    assert (dest / "blocks.md").read_text().startswith("# tunerd block benchmark")
    assert (repo / "benchmarks/tables" / table.name).read_bytes() == table.read_bytes()
    report = json.loads((dest / "replay.json").read_text())
    assert set(report["strategies"]) == {"random", "model"} and report["tables"][0]["complete"]
    (src / "summary.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(SystemExit, match="not a gpu-check summary"):
        gpu_check.collect(src, repo)
