"""python -m benchmarks.gpu_check: the prepared GPU run behind scripts/gpu-check.sh.

One command spends a short, scarce device lease well. Phases run in priority order, each a child
process in its own process group with a time slice; a slice a phase leaves unused goes to the next:

  install  the wheels carried in .whl/ into a private --target folder (the box lacks the service packages)
  env      versions, the device, which modules import (and which are blocked in a dry run)
  pytest   pytest -m gpu -x with a per-test time limit (pytest-timeout), in parallel when pytest-xdist is there
  bench    python -m benchmarks.run --cases representative: bf16 fwd/dgrad/wgrad vs cuDNN and torch.compile,
           with the roofline
  blocks   python -m benchmarks.blocks: one block per block suite, bf16 fwd then fwd+bwd, vs eager torch and
           torch.compile, with the modelled HBM bytes
  replay   python -m tunerd.schedules.replay --record: timing tables (a seeded sample of each space; the strategy
           replay on them is CPU work, done by `collect` afterwards, off the lease)
  static   the sm_90 compile audit of the benchmarked layers, compared with the committed audit of this Triton

A phase past its slice gets SIGINT (pytest writes its report, the benchmark keeps every finished case),
then SIGKILL. SIGTERM/SIGINT to this process stop the running phase the same way. Everything goes to
--out as it happens, flat and at most 8 files (what the device tool brings back): summary.json (phases
with status ok | failed | timed_out | skipped | interrupted, key numbers; rewritten after every step),
gpu-check.log, pytest.xml, results.json, report.md, blocks.json, tables.tar, static.json.
`python -m benchmarks.gpu_check collect DIR` files a fetched run under benchmarks/results/<date>-<device>/,
renders what derives from those files (speedup.png, blocks.md, static.md) and replays the strategies on its
tables.

--dry-run is the same path on CPU (Triton's interpreter, the `quick` subset, tiny tables, a small budget, no
wheel install) with the service packages made unimportable, as on the box; CI runs it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "tunerd-gpu-check/1"
PHASES = ("pytest", "bench", "blocks", "replay", "static")
# share of the budget left after install + env, per phase; unused time rolls over to the next phase
SHARES = {"pytest": 0.32, "bench": 0.30, "blocks": 0.20, "replay": 0.10, "static": 0.08}
# not on the lent GPU box (device KINDS.md); blocked in a dry run so CI sees what the box sees
BOX_LACKS = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "pydantic",
    "pydantic_settings",
    "optuna",
    "psycopg",
    "httpx",
    "typer",
    "schemathesis",
)
PROBE = (
    "torch",
    "triton",
    "numpy",
    "jinja2",
    "matplotlib",
    "pytest",
    "pytest_timeout",
    "xdist",
    "hypothesis",
    "sqlalchemy",
    "alembic",
    "optuna",
    "fastapi",
    "uvicorn",
    "httpx",
    "typer",
)
OUT_FILES = (
    "summary.json",
    "gpu-check.log",
    "pytest.xml",
    "results.json",
    "report.md",
    "blocks.json",  # the block benchmark's results (its report.md is rendered by collect)
    "tables.tar",
    "static.json",
)
DERIVED = ("speedup.png",)  # written by a phase, rendered again by collect: removed from the 8 files returned


@dataclass
class Settings:
    dry_run: bool
    out: Path
    budget: float
    phases: list[str]
    wheels: Path
    test_timeout: float
    maxfail: int
    workers: int | None  # pytest-xdist workers (None: automatic)
    bench_args: list[str]
    blocks_args: list[str]
    block: list[str]
    grace: float  # seconds between SIGINT and SIGKILL for a phase past its slice
    min_start: float  # a phase with less time than this left is skipped


def parse_args(argv: list[str] | None = None) -> Settings:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same run on CPU: interpreter, tiny shapes and budget")
    p.add_argument("--out", default=env("OUT"), help="results folder (default: $OUT, else ./gpu-check-out)")
    p.add_argument(
        "--budget",
        type=float,
        default=float(env("GPU_CHECK_BUDGET", "0")) or None,
        help="wall-clock seconds for everything (env GPU_CHECK_BUDGET; default 540, dry run 240)",
    )
    p.add_argument(
        "--phases",
        default=env("GPU_CHECK_PHASES", ",".join(PHASES)),
        help=f"comma list of {', '.join(PHASES)} (env GPU_CHECK_PHASES)",
    )
    p.add_argument("--wheels", default=env("GPU_CHECK_WHEELS", str(ROOT / ".whl")), help="carried wheels folder")
    p.add_argument(
        "--test-timeout",
        type=float,
        default=float(env("GPU_CHECK_TEST_TIMEOUT", "120")),
        help="per-test seconds (env GPU_CHECK_TEST_TIMEOUT)",
    )
    p.add_argument(
        "--maxfail",
        type=int,
        default=int(env("GPU_CHECK_MAXFAIL", "1")),
        help="stop pytest after N failures (default 1: -x)",
    )
    p.add_argument("--workers", type=int, help="pytest-xdist workers (default: cores, at most 16; 0: none)")
    p.add_argument(
        "--bench-args",
        default=env("GPU_CHECK_BENCH_ARGS", ""),
        help="extra arguments for benchmarks.run, later ones win (--bench-args='--passes fwd'; env "
        "GPU_CHECK_BENCH_ARGS)",
    )
    p.add_argument(
        "--blocks-args",
        default=env("GPU_CHECK_BLOCKS_ARGS", ""),
        help="extra arguments for benchmarks.blocks, later ones win (env GPU_CHECK_BLOCKS_ARGS)",
    )
    p.add_argument(
        "--block",
        default=env("GPU_CHECK_BLOCK"),
        help="comma list of modules made unimportable (default: the service packages in a dry run)",
    )
    a = p.parse_args(argv)
    phases = [x for x in a.phases.split(",") if x]
    if bad := [x for x in phases if x not in PHASES]:
        p.error(f"unknown phases {bad}; choose from {list(PHASES)}")
    budget = a.budget or (240.0 if a.dry_run else 540.0)
    if budget < 30:
        p.error("--budget must be at least 30 seconds")
    block = [m for m in (a.block if a.block is not None else ",".join(BOX_LACKS) if a.dry_run else "").split(",") if m]
    return Settings(
        dry_run=a.dry_run,
        out=Path(a.out or ROOT / "gpu-check-out").resolve(),
        budget=budget,
        phases=phases,
        wheels=Path(a.wheels),
        test_timeout=a.test_timeout,
        maxfail=a.maxfail,
        workers=a.workers,
        bench_args=a.bench_args.split(),
        blocks_args=a.blocks_args.split(),
        block=block,
        grace=10.0 if a.dry_run else 20.0,
        min_start=5.0 if a.dry_run else 20.0,
    )


# ---- time --------------------------------------------------------------------------------------------
def deadlines(start: float, end: float, phases: list[str]) -> dict[str, float]:
    """Each phase's latest end: cumulative shares of [start, end], so time a phase leaves goes to the next;
    the last phase runs to the end."""
    total = sum(SHARES[p] for p in phases) or 1.0
    out, acc = {}, 0.0
    for p in phases:
        acc += SHARES[p] / total
        out[p] = start + (end - start) * acc
    if phases:
        out[phases[-1]] = end
    return out


# ---- child processes ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # ok | failed | timed_out | interrupted
    rc: int | None
    seconds: float
    stdout: str = ""


class Runner:
    """Runs phase commands in their own process groups, copies their output to the console and the log,
    and stops them at a deadline or when this process is told to stop."""

    def __init__(self, log: TextIO, env: dict[str, str], grace: float) -> None:
        self.log = log
        self.env = env
        self.grace = grace
        self.stop_signal: int | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def say(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)
            self.log.write(line + "\n")
            self.log.flush()

    def request_stop(self, signum: int, _frame: Any = None) -> None:
        self.stop_signal = signum
        self._interrupt()

    def _interrupt(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def run(self, argv: list[str], deadline: float, capture: bool = False) -> Outcome:
        t0 = time.monotonic()
        if self.stop_signal is not None:
            return Outcome("interrupted", None, 0.0)
        self.say("$ " + " ".join(argv))
        # its own process group (to signal it whole) in this session: whatever ends this command ends it too
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        self._proc = proc
        kept: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for raw in io.TextIOWrapper(proc.stdout, errors="replace"):
                line = raw.rstrip("\n")
                if capture:
                    kept.append(line)
                else:
                    self.say(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        status, stop_at = None, None
        while proc.poll() is None:  # past the deadline or told to stop: SIGINT, then SIGKILL after the grace
            now = time.monotonic()
            if stop_at is None and (now >= deadline or self.stop_signal is not None):
                stop_at = now
                if self.stop_signal is None:
                    status = "timed_out"
                    self.say(f"!! time slice over: SIGINT, SIGKILL after {self.grace:.0f}s")
                self._interrupt()
            elif stop_at is not None and now - stop_at > self.grace:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            time.sleep(0.1)
        self._proc = None
        if self.stop_signal is not None and proc.returncode != 0:
            status = "interrupted"
        try:  # a grandchild holding the pipe open must not hang us
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        reader.join(timeout=5)
        status = status or ("ok" if proc.returncode == 0 else "failed")
        return Outcome(status, proc.returncode, time.monotonic() - t0, "\n".join(kept))


# ---- the summary -------------------------------------------------------------------------------------
@dataclass
class Summary:
    path: Path
    doc: dict[str, Any] = field(default_factory=dict)

    def phase(self, name: str) -> dict[str, Any]:
        return next(p for p in self.doc["phases"] if p["name"] == name)

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.doc["_t0"], 1)
        text = json.dumps({k: v for k, v in self.doc.items() if not k.startswith("_")}, indent=1, default=str)
        write_whole(self.path, (text + "\n").encode())


def write_whole(path: Path, data: bytes) -> None:
    """Write data to a temp file beside path, then rename it over path: a reader never sees a part.
    (Not tunerd.kernels.runtime's writer: this process imports neither torch nor triton, to start at once.)"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ---- phases --------------------------------------------------------------------------------------------
def probe() -> dict[str, Any]:
    """What this interpreter has: versions, which modules import, the device (run as `env` in the child env)."""
    import importlib.util
    from importlib import metadata

    dists = {"xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout", "jinja2": "Jinja2"}
    imports: dict[str, str | None] = {}
    for m in PROBE:
        if importlib.util.find_spec(m) is None:
            imports[m] = None
            continue
        try:
            imports[m] = metadata.version(dists.get(m, m))
        except metadata.PackageNotFoundError:
            imports[m] = "?"
    import torch  # not tunerd (it would import triton): this is a quick look

    interpreter = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    cuda = not interpreter
    dev: dict[str, Any] = {
        "cuda": cuda,
        "interpreter": interpreter,
        "torch": torch.__version__,
        "triton": imports.get("triton"),
        "python": sys.version.split()[0],
        "cuda_version": torch.version.cuda,
        "cpus": os.cpu_count(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        dev.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            dev["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            dev["nvidia_smi"] = f"unavailable: {e}"
    else:
        dev["name"] = "cpu"
    return {"device": dev, "imports": imports}


def pytest_argv(s: Settings, imports: dict[str, Any], out: Path) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        f"--maxfail={s.maxfail}",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        f"--junitxml={out / 'pytest.xml'}",
    ]
    if imports.get("pytest_timeout"):
        argv.append(f"--timeout={s.test_timeout:g}")
    else:  # no hard per-test limit: at least dump the stacks of a test that hangs; the slice stops it
        argv += ["-o", f"faulthandler_timeout={s.test_timeout:g}"]
    workers = s.workers if s.workers is not None else (min(16, os.cpu_count() or 1) if not s.dry_run else 0)
    if workers > 1 and imports.get("xdist"):
        argv += ["-n", str(workers)]
    return argv


def junit(path: Path) -> dict[str, Any] | None:
    """Counts and the first failures from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                bad.append(
                    {
                        "test": f"{case.get('classname')}::{case.get('name')}",
                        "kind": tag,
                        "message": (el.get("message") or "")[:300],
                    }
                )
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {**n, "failed_tests": bad[:30]}


def bench_argv(s: Settings, out: Path, seconds: float) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--dtypes",
        "bf16",
        "--passes",
        "fwd,dgrad,wgrad",
        "--out",
        str(out),
        "--time-limit",
        f"{seconds:.0f}",
    ]
    if s.dry_run:
        argv += ["--small", "--cases", "quick", "--no-fused", "--tune-budget", "1", "--reps", "1", "--rounds", "1"]
    else:
        argv += ["--cases", "representative", "--tune-budget", "4", "--tune-seconds", "6"]
    return argv + s.bench_args


def bench_summary(path: Path, keys: tuple[str, ...] = ("peaks", "summary")) -> dict[str, Any] | None:
    """A benchmark JSON's case counts and its top-level keys (None when it is missing or unreadable)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    stopped = doc.get("stopped") or {}
    return {
        "cases": len(doc.get("cases", [])),
        "not_run": stopped.get("cases_not_run", 0),
        **{k: doc.get(k) for k in keys},
    }


def blocks_argv(s: Settings, out: Path, seconds: float) -> list[str]:
    """benchmarks.blocks: bf16, every suite's forward first, then fwd+bwd (the planner's default plans: no tuning
    in this slice); the dry run one tiny block's forward on the interpreter."""
    argv = [sys.executable, "-m", "benchmarks.blocks", "--json", str(out), "--time-limit", f"{seconds:.0f}"]
    argv += ["--dtypes", "bf16"]
    if s.dry_run:
        argv += ["--small", "--suites", "mobilenetv2", "--passes", "fwd", "--reps", "1", "--rounds", "1"]
    else:
        argv += ["--passes", "fwd,fwd+bwd"]
    return argv + s.blocks_args


def blocks_summary(path: Path) -> dict[str, Any] | None:
    return bench_summary(path, ("summary",))


def pack_tables(tables: Path, dest: Path) -> list[str]:
    """tables/*.json into one tar (written whole, then renamed): the device returns at most 8 files."""
    names = sorted(p.name for p in tables.glob("*.json"))
    if not names:
        return []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for n in names:
            tar.add(tables / n, arcname=n)
    write_whole(dest, buf.getvalue())
    return names


def tables_summary(tables: Path, names: list[str]) -> list[dict[str, Any]]:
    """What each recorded table holds (read as plain JSON: this process stays free of torch)."""
    out = []
    for n in names:
        d = json.loads((tables / n).read_text())
        times = [e["median_ms"] for e in d["entries"] if e["status"] == "ok"]
        out.append(
            {
                "file": n,
                "device": d["device"],
                "candidates": d["candidates"],
                "space_size": d["space_size"],
                "complete": d["complete"],
                "ok": len(times),
                "best_ms": min(times, default=None),
                "worst_ms": max(times, default=None),
            }
        )
    return out


# ---- static compare (runs as a child: `python -m benchmarks.gpu_check static ...`) -----------------
COMPARED = ("regs", "spill_bytes", "shared", "mma", "cp_async", "max_load_bytes", "max_store_bytes")


def static_audit(
    cases: str, passes: list[str], out: Path, limit: int | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """benchmarks.static's audit of the subset's layers (default schedules, bf16; the first `limit`), compared
    row by row with the committed audit of the same Triton version and arch."""
    import triton

    from benchmarks import run, static  # first: they import tunerd, which picks the interpreter before triton
    from tunerd.kernels.runtime import atomic_write_text
    from tunerd.kernels.validate import compile_check
    from tunerd.schedules.device import DeviceLimits

    limits = DeviceLimits.h100()
    picked = {(pick.suite, li) for pick, li in run.resolve(cases)}
    names = list(dict.fromkeys(suite for suite, _ in picked))
    todo = [t for t in static.variants(names, passes, ["bfloat16"], 0, limits) if (t[0], t[1]) in picked][:limit]
    t0 = time.perf_counter()
    results = compile_check([v for *_, v in todo], arch=90, timeout=timeout or max(300.0, 5.0 * len(todo)))
    rows = [static.row(s, li, which, v, r, limits) for (s, li, which, v), r in zip(todo, results)]
    doc: dict[str, Any] = {
        "arch": 90,
        "triton": triton.__version__,
        "limits": limits.name,
        "date": f"{_dt.date.today()}",
        "config": {"cases": cases, "passes": passes, "dtypes": ["bfloat16"], "top": 0},
        "elapsed_s": time.perf_counter() - t0,
        "rows": rows,
    }
    doc["summary"] = static.summarize(rows)
    committed = sorted((ROOT / "benchmarks" / "results").glob(f"*-static-sm90-triton{triton.__version__}/static.json"))
    compare: dict[str, Any] = {"against": None, "compared": 0, "identical": 0, "differ": []}
    if committed:
        ref = {r["variant"]: r for r in json.loads(committed[-1].read_text())["rows"] if r.get("ok")}
        compare["against"] = str(committed[-1].relative_to(ROOT))
        for r in rows:
            old = ref.get(r["variant"])
            if old is None or not r["ok"]:
                continue
            compare["compared"] += 1
            diff = {k: [old.get(k), r.get(k)] for k in COMPARED if old.get(k) != r.get(k)}
            if diff:
                compare["differ"].append({"spec": r["spec"], "variant": r["variant"], "committed_vs_here": diff})
            else:
                compare["identical"] += 1
    doc["compare"] = compare
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    return doc


# ---- the run -------------------------------------------------------------------------------------------
class Check:
    """One run: the settings, the runner, the summary, a scratch folder; one method per phase, each returning
    its outcome (None: skipped) and a one-line detail, with its results in summary.doc["results"]."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.t0 = time.monotonic()
        self.end = self.t0 + s.budget
        s.out.mkdir(parents=True, exist_ok=True)
        for name in OUT_FILES:  # a folder reused from an earlier run: nothing stale may pass for this run's result
            (s.out / name).unlink(missing_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TUNERD_CACHE_DIR=str(self.scratch / "cache"))
        self.paths = [str(ROOT)]  # the checkout first: tunerd maps kernels/ schedules/ db/ in, no install needed
        if s.block:
            self.env["GPU_CHECK_BLOCK"] = ",".join(s.block)
            self.paths.append(str(ROOT / "scripts" / "box_site"))
        self.log = open(s.out / "gpu-check.log", "w", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.runner = Runner(self.log, self.env, s.grace)
        self.imports: dict[str, Any] = {}
        self.summary = Summary(
            s.out / "summary.json",
            {
                "schema": SCHEMA,
                "_t0": self.t0,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "dry_run": s.dry_run,
                "budget_s": s.budget,
                "out": str(s.out),
                "commit_as": None,
                "blocked_imports": s.block,
                "complete": False,
                "stopped_by": None,
                "device": None,
                "imports": None,
                "wheels": [],
                "phases": [{"name": n, "status": "pending"} for n in ("install", "env", *s.phases)],
                "results": {},
            },
        )
        self.results = self.summary.doc["results"]

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # -- phases
    def install(self, deadline: float) -> tuple[Outcome | None, str]:
        if self.s.dry_run:
            return None, "dry run: nothing installed"
        wheels = sorted(self.s.wheels.glob("*.whl")) if self.s.wheels.is_dir() else []
        if not wheels:
            return None, f"no wheels in {self.s.wheels}"
        site = self.scratch / "site"
        self.summary.doc["wheels"] = [w.name for w in wheels]
        o = self.runner.run(
            self.python(
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--upgrade",
                "--target",
                str(site),
                *map(str, wheels),
            ),
            deadline,
        )
        if o.status == "ok":
            self.paths.append(str(site))
        return o, f"{len(wheels)} wheels"

    def probe_env(self, deadline: float) -> tuple[Outcome, str]:
        o = self.runner.run(self.python("-m", "benchmarks.gpu_check", "env"), deadline, capture=True)
        try:
            info = json.loads(o.stdout.strip().splitlines()[-1]) if o.status == "ok" else None
        except (ValueError, IndexError):
            info, o.status = None, "failed"
        if info is None:
            self.runner.say(o.stdout)
            return o, "no probe"
        self.imports = info["imports"]
        dev = info["device"]
        dry = "-dry-run" if self.s.dry_run else ""
        self.summary.doc.update(
            device=dev,
            imports=self.imports,
            commit_as=f"benchmarks/results/{_dt.date.today():%Y-%m-%d}-{slug(dev['name'])}{dry}",
        )
        self.runner.say(json.dumps(info))
        return o, f"{dev['name']}, torch {dev['torch']}, triton {dev['triton']}"

    def pytest(self, deadline: float, left: float) -> tuple[Outcome, str]:
        o = self.runner.run(pytest_argv(self.s, self.imports, self.s.out), deadline)
        res = self.results["pytest"] = junit(self.s.out / "pytest.xml")
        if res is None:
            return o, "no JUnit report"
        return o, (
            f"{res['passed']} passed, {res['failures']} failed, {res['errors']} errors, {res['skipped']} "
            f"skipped of {res['tests']}"
        )

    def bench(self, deadline: float, left: float) -> tuple[Outcome, str]:
        # the benchmark stops itself in time (no case starts that would cross its limit); the slice is the
        # backstop for a case that overruns
        limit = min(20.0, left) if self.s.dry_run else max(10.0, 0.85 * left - 10)
        o = self.runner.run(bench_argv(self.s, self.s.out, limit), deadline)
        for name in DERIVED:  # collect renders it again; the device returns at most 8 files
            (self.s.out / name).unlink(missing_ok=True)
        res = self.results["bench"] = bench_summary(self.s.out / "results.json")
        if res is None:
            o.status = "failed" if o.status == "ok" else o.status
            return o, "no results.json"
        return o, f"{res['cases']} cases, {res['not_run']} not run"

    def blocks(self, deadline: float, left: float) -> tuple[Outcome, str]:
        limit = min(20.0, left) if self.s.dry_run else max(10.0, 0.85 * left - 10)
        o = self.runner.run(blocks_argv(self.s, self.s.out / "blocks.json", limit), deadline)
        res = self.results["blocks"] = blocks_summary(self.s.out / "blocks.json")
        if res is None:
            o.status = "failed" if o.status == "ok" else o.status
            return o, "no blocks.json"
        return o, f"{res['cases']} cases, {res['not_run']} not run"

    def replay(self, deadline: float, left: float) -> tuple[Outcome, str]:
        tables = self.scratch / "tables"
        limit = min(8.0, left) if self.s.dry_run else max(5.0, 0.7 * left - 10)
        size = (
            ["--specs", "interp", "--sample", "2", "--reps", "1"]
            if self.s.dry_run
            else ["--sample", "64", "--reps", "20"]
        )
        o = self.runner.run(
            self.python(
                "-m",
                "tunerd.schedules.replay",
                "--record",
                "--tables-dir",
                str(tables),
                "--time-limit",
                f"{limit:.0f}",
                *size,
            ),
            deadline,
        )
        names = pack_tables(tables, self.s.out / "tables.tar")
        self.results["replay"] = {"tables": tables_summary(tables, names)}
        if not names and o.status == "ok":
            o.status = "failed"
        return o, f"{len(names)} tables"

    def static(self, deadline: float, left: float) -> tuple[Outcome, str]:
        # the dry run compiles two of the real layers: the committed audits cover them, not `quick`
        size = ["--passes", "fwd", "--limit", "2"] if self.s.dry_run else ["--passes", "fwd,dgrad,wgrad"]
        o = self.runner.run(
            self.python(
                "-m",
                "benchmarks.gpu_check",
                "static",
                "--cases",
                "representative",
                "--out",
                str(self.s.out / "static.json"),
                "--timeout",
                f"{left - 5:.0f}",
                *size,
            ),
            deadline,
        )
        try:
            doc = json.loads((self.s.out / "static.json").read_text())
            c = doc["compare"]
        except (OSError, ValueError, KeyError):
            self.results["static"] = None
            o.status = "failed" if o.status == "ok" else o.status
            return o, "no static.json"
        self.results["static"] = {"variants": len(doc["rows"]), "compare": c}
        return o, f"{c['identical']} of {c['compared']} identical to {c['against']}"

    # -- bookkeeping
    def begin(self, name: str, slice_s: float | None = None) -> dict[str, Any]:
        ph = self.summary.phase(name)
        ph.update(status="running", started_s=round(time.monotonic() - self.t0, 1))
        if slice_s is not None:
            ph["slice_s"] = round(slice_s, 1)
        self.summary.write()
        self.runner.say(f"== {name}" + (f" (slice {slice_s:.0f}s)" if slice_s is not None else ""))
        return ph

    def finish(self, ph: dict[str, Any], o: Outcome | None, detail: str, status: str | None = None) -> None:
        ph.update(status=status or (o.status if o else "skipped"), detail=detail)
        if o is not None:
            ph.update(rc=o.rc, seconds=round(o.seconds, 1))
        self.summary.write()
        took = f" ({o.seconds:.0f}s)" if o is not None else ""
        self.runner.say(f"== {ph['name']}: {ph['status']}{took} {detail}")

    def run(self) -> int:
        s, runner = self.s, self.runner
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, runner.request_stop)
        self.summary.write()
        runner.say(f"== gpu-check {'(dry run) ' if s.dry_run else ''}budget {s.budget:.0f}s -> {s.out}")
        ph = self.begin("install")
        self.finish(ph, *self.install(min(self.end, time.monotonic() + 120)))
        self.env["PYTHONPATH"] = os.pathsep.join(
            self.paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        ph = self.begin("env")
        self.finish(ph, *self.probe_env(min(self.end, time.monotonic() + 120)))
        device = self.summary.doc["device"]
        if device is not None and not device["cuda"] and not s.dry_run:
            runner.say("!! no CUDA device: the GPU phases would run on the interpreter (use --dry-run on CPU)")
            for name in s.phases:
                self.summary.phase(name).update(status="skipped", detail="no CUDA device")
            self.summary.doc["stopped_by"] = "no CUDA device"
            self.summary.write()
            return 2
        due = deadlines(time.monotonic(), self.end, s.phases)
        for name in s.phases:
            if runner.stop_signal is not None:
                self.summary.phase(name).update(status="interrupted")
                continue
            left = due[name] - time.monotonic()
            ph = self.begin(name, left)
            if left < s.min_start:  # the budget is spent: it never started
                self.finish(ph, None, f"not started: {left:.0f}s left", status="timed_out")
                continue
            self.finish(ph, *getattr(self, name)(due[name], left))
        if runner.stop_signal is not None:
            self.summary.doc["stopped_by"] = signal.Signals(runner.stop_signal).name
        self.summary.doc["complete"] = runner.stop_signal is None and all(
            p["status"] in ("ok", "skipped") for p in self.summary.doc["phases"]
        )
        self.summary.write()
        state = "complete" if self.summary.doc["complete"] else "INCOMPLETE"
        runner.say(f"== done in {time.monotonic() - self.t0:.0f}s ({state}): {s.out}/summary.json")
        for p in self.summary.doc["phases"]:  # the recap the device tool's output tail shows
            runner.say(f"   {p['name']:<8} {p['status']:<11} {p.get('detail', '')}")
        return 0 if self.summary.doc["complete"] else 1

    def close(self) -> None:
        self.summary.write()
        self.log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def run_check(s: Settings) -> int:
    check = Check(s)
    try:
        return check.run()
    finally:
        check.close()


def collect(src: Path, dest_root: Path = ROOT, seeds: int = 5, strategies: list[str] | None = None) -> Path:
    """File a fetched run: its files under the summary's commit_as folder, the timing tables under
    benchmarks/tables/ and the strategy replay on them (replay.json); rendered from the JSON files: static.md,
    blocks.md and speedup.png."""
    summary = json.loads((src / "summary.json").read_text())
    if summary.get("schema") != SCHEMA or not summary.get("commit_as"):
        raise SystemExit(f"{src / 'summary.json'}: not a gpu-check summary with a device")
    dest = dest_root / summary["commit_as"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:
        if name != "tables.tar" and (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    if (src / "tables.tar").is_file():
        from tunerd.kernels.runtime import atomic_write_text
        from tunerd.schedules import replay

        tables_dir = dest_root / "benchmarks" / "tables"
        with tarfile.open(src / "tables.tar") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and re.fullmatch(r"[\w.-]+\.json", m.name)]
            tar.extractall(tables_dir, members=members, filter="data")
        tables = [
            t for t in (replay.Table.load(tables_dir / m.name) for m in members) if any(x.ok for x in t.trials.values())
        ]  # a table without one ok entry has no best to replay to
        report = replay.replay(tables, strategies, seeds=seeds)
        print(replay.format_report(report))
        atomic_write_text(dest / "replay.json", json.dumps(report, indent=1) + "\n")
    if (dest / "static.json").is_file():
        from benchmarks import static
        from tunerd.kernels.runtime import atomic_write_text

        atomic_write_text(dest / "static.md", static.markdown(json.loads((dest / "static.json").read_text())))
    if (dest / "blocks.json").is_file():
        from benchmarks import blocks
        from tunerd.kernels.runtime import atomic_write_text

        atomic_write_text(dest / "blocks.md", blocks.markdown(json.loads((dest / "blocks.json").read_text())))
    bench = json.loads((dest / "results.json").read_text()) if (dest / "results.json").is_file() else {}
    if bench.get("schema") == "tunerd-benchmark/1":
        from benchmarks import report

        report.plot(bench, dest / "speedup.png")
    return dest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in ("run", "env", "static", "collect") else "run"
    rest = argv[1:] if argv and argv[0] == cmd else argv
    if cmd == "env":
        print(json.dumps(probe()), flush=True)
        return 0
    if cmd == "static":
        p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check static")
        p.add_argument("--cases", required=True)
        p.add_argument("--passes", default="fwd,dgrad,wgrad")
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--limit", type=int, help="only the first N variants")
        p.add_argument("--timeout", type=float, help="seconds for the compiles")
        a = p.parse_args(rest)
        doc = static_audit(a.cases, a.passes.split(","), a.out, a.limit, a.timeout)
        c = doc["compare"]
        print(
            f"static: {len(doc['rows'])} variants in {doc['elapsed_s']:.0f}s; {c['identical']} of {c['compared']} "
            f"identical to {c['against']}; {len(c['differ'])} differ",
            flush=True,
        )
        return 0
    if cmd == "collect":
        p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check collect")
        p.add_argument("src", type=Path, help="the fetched $OUT folder")
        a = p.parse_args(rest)
        print(f"filed under {collect(a.src)}")
        return 0
    return run_check(parse_args(rest))


if __name__ == "__main__":
    sys.exit(main())
