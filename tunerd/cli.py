"""The tunerd command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generated, autotuned Triton conv kernels.")


def fail(message: str, code: int = 2) -> NoReturn:
    """End the command with a one-line error on stderr (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def read_json_arg(value: str) -> dict:
    """A JSON object given inline, as @path, or '-' for stdin."""
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        path = Path(value[1:])
        if not path.exists():
            raise typer.BadParameter(f"no such file: {path}")
        text = path.read_text()
    else:
        text = value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter("expected a JSON object")
    return data


def _variant(spec_json: str, schedule_json: str | None):
    from tunerd.kernels import generator
    from tunerd.kernels.schedule import Schedule, ScheduleError
    from tunerd.kernels.spec import BlockSpec, SpecError

    try:
        spec = BlockSpec.from_dict(read_json_arg(spec_json))
        schedule = Schedule.from_dict(read_json_arg(schedule_json)) if schedule_json else None
        return generator.render(spec, schedule)
    except (SpecError, ScheduleError) as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def source(
    spec: str = typer.Argument(..., help="BlockSpec JSON, @file or -"),
    schedule: str | None = typer.Option(None, help="Schedule JSON or @file (default: heuristic)"),
) -> None:
    """Print the generated Triton source of a variant."""
    v = _variant(spec, schedule)
    typer.echo(v.source, nl=False)
    typer.echo(f"# variant id {v.id}, grid {v.grid}, num_warps {v.num_warps}, num_stages {v.num_stages}", err=True)


@app.command()
def check(
    spec: str = typer.Argument(..., help="BlockSpec JSON, @file or -"),
    schedule: str | None = typer.Option(None, help="Schedule JSON or @file"),
    arch: int = typer.Option(90, help="CUDA compute capability to compile for"),
) -> None:
    """Compile a variant for a real GPU target (no GPU needed) and report what it uses."""
    from tunerd.kernels.validate import compile_check

    v = _variant(spec, schedule)
    r = compile_check([v], arch=arch)[0]
    if not r["ok"]:
        typer.echo(r["error"], err=True)
        raise typer.Exit(1)
    reads = [f"plain global loads up to {r['max_load_bytes']} B"] if r["max_load_bytes"] else []
    if r["cp_async"]:
        reads.append(f"{r['cp_async']} cp.async copies of up to {r['max_copy_bytes']} B")
    typer.echo(
        f"ok: variant {v.id} compiles for sm_{arch}: {r['regs']} registers, {r['spill_bytes']} B spilled, "
        f"{r['shared']} B shared memory, MMA {r['mma']}, " + (", ".join(reads) or "no global loads")
    )
    if r.get("loop_sass"):
        per = "step of its reduction (unrolled whole)" if r.get("loop_unrolled") else "iteration"
        typer.echo(
            f"main loop: {r['loop_sass']} SASS per {per}, {r['loop_mma']} MMA ({r['loop_mma_share']:.0%}), "
            f"{r['loop_fma']} FMA ({r['loop_fma_share']:.0%}), {r['loop_idiv']} runtime integer divisions; "
            f"{r['sass']} SASS in all, {r['tma']} TMA loads"
        )


def _store(db: str | None, mkdir: bool = False):
    """The store at db (default $TUNERD_DB or the cache's SQLite file). A named SQLite file in a directory
    that does not exist is an error (a typo must not start a silent new store) unless mkdir."""
    import os

    from tunerd.db.engine import parse_url
    from tunerd.db.errors import StoreError
    from tunerd.db.store import Store

    try:
        url = parse_url(db)
        path = url.database if url.get_backend_name() == "sqlite" else None
        if path not in (None, "", ":memory:") and (db is not None or os.environ.get("TUNERD_DB")):
            folder = Path(path).expanduser().absolute().parent
            if not folder.is_dir():
                if not mkdir:
                    fail(
                        f"the store's directory {folder} does not exist (check --db / $TUNERD_DB; "
                        f"`tunerd tune --mkdir` creates it)"
                    )
                folder.mkdir(parents=True)
        return Store(db)
    except StoreError as e:
        fail(f"cannot open the store: {e}")


def _specs_for(
    spec: str | None,
    suite: str | None,
    model: str | None,
    input_shape: str | None,
    batch: int | None,
    dtype: str | None,
) -> list:
    import torch

    from tunerd.kernels.spec import BlockSpec, SpecError
    from tunerd.schedules import suites

    try:
        if sum(x is not None for x in (spec, suite, model)) != 1:
            raise typer.BadParameter("give exactly one of SPEC, --suite or --model")
        if spec is not None:
            return [BlockSpec.from_dict(read_json_arg(spec))]
        if suite is not None:
            return suites.suite(suite, batch=batch, dtype=dtype)
        assert model is not None
        net = _load_model(model, dtype)
        x = _example_input(input_shape, dtype)
        first = next((m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        if first is not None and x.dim() != len(first.kernel_size) + 2:
            want = len(first.kernel_size) + 2
            raise typer.BadParameter(
                f"--input-shape has {x.dim()} dims, but {model}'s first conv "
                f"({type(first).__name__}) takes {want}-D input, e.g. "
                f"{','.join(['1', str(first.in_channels)] + ['32'] * (want - 2))}"
            )
        try:
            return suites.model_specs(net, x)
        except RuntimeError as e:  # the model itself refused the example input
            raise typer.BadParameter(
                f"running {model} on an input of shape {tuple(x.shape)} failed: {str(e).splitlines()[0]}"
            ) from None
    except SpecError as e:
        raise typer.BadParameter(str(e)) from None


def _load_model(ref: str, dtype: str | None):
    import importlib

    import torch

    mod_name, _, attr = ref.partition(":")
    if not attr:
        raise typer.BadParameter("--model takes module:callable, e.g. benchmarks.networks:resnet50")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m` would: the current directory first
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise typer.BadParameter(f"cannot load {ref}: {e}") from None
    model = factory()
    return model.to(getattr(torch, dtype)) if dtype else model


def _example_input(shape: str | None, dtype: str | None):
    import torch

    if not shape:
        raise typer.BadParameter("--model needs --input-shape, e.g. 1,3,224,224")
    try:
        dims = [int(v) for v in shape.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--input-shape must be comma-separated ints, got {shape!r}") from None
    return torch.randn(*dims, dtype=getattr(torch, dtype) if dtype else torch.float32)


STATUS_WORDS = {
    "ok": "ok",
    "wrong-result": "wrong result",
    "compile-error": "compile error",
    "crash": "crashed",
    "timeout": "timed out",
}
LONG_RUN_WARNING_S = 600.0  # warn before an interpreter run the cost model expects to take longer
INTERPRETER_SPEC_S, INTERPRETER_TRIAL_S = 5.0, 2.0  # worker start-up per spec; render + float64 gate per trial


def _interpreter_estimate_s(specs: list, budget: int | None) -> float:
    """Cost-model seconds of tuning specs on the interpreter: per trial a gate run plus the timed repetitions."""
    from tunerd.kernels.schedule import default
    from tunerd.schedules import cost
    from tunerd.schedules.device import DeviceLimits
    from tunerd.schedules.space import DEFAULT_MAX_CANDIDATES

    limits = DeviceLimits.interpreter()
    launches = 4  # the correctness gate's run plus the CPU harness's 3 timed repetitions
    trials = 1 + (budget or DEFAULT_MAX_CANDIDATES)
    return sum(
        INTERPRETER_SPEC_S + trials * (INTERPRETER_TRIAL_S + launches * cost.predict(s, default(s), limits))
        for s in specs
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _summary(res, trials: int) -> str:
    """One human line per tuned spec; `trials` is the count the progress display showed."""
    from collections import Counter

    counts = Counter(t.status for t in res.trials[:trials])
    parts = [f"{n} {STATUS_WORDS.get(k, k)}" for k, n in counts.most_common()]
    text = f"{trials} trial{'s' if trials != 1 else ''}" + (f" ({', '.join(parts)})" if parts else "")
    if res.best is None:
        text += "; no correct variant"
    else:
        text += f"; best {res.best.median_ms:.4g} ms"
        if res.speedup_vs_default:
            text += f", {res.speedup_vs_default:.2f}x the default schedule's speed"
    fresh = res.measured
    return text + (
        f"; {fresh} new measurement{'s' if fresh != 1 else ''}"
        if fresh
        else "; nothing new measured (all resumed from the store)"
    )


@app.command()
def tune(
    spec: str | None = typer.Argument(None, help="BlockSpec JSON, @file or -"),
    suite: str | None = typer.Option(None, help="a named suite: quick, resnet50, mobilenetv2, ..."),
    model: str | None = typer.Option(
        None, help="module:callable building a torch model to take convs from (imported from the current directory too)"
    ),
    input_shape: str | None = typer.Option(None, help="input shape for --model, e.g. 1,3,224,224"),
    batch: int | None = typer.Option(None, help="batch size for --suite"),
    dtype: str | None = typer.Option(None, help="float32, float16 or bfloat16"),
    strategy: str | None = typer.Option(
        None, help="exhaustive, random, halving, tpe, evolution or model (default: tunerd.tuning.DEFAULT_STRATEGY)"
    ),
    budget: int | None = typer.Option(None, help="trials per spec (at least 1)"),
    seconds: float | None = typer.Option(None, help="time budget per spec"),
    seed: int = typer.Option(0),
    db: str | None = typer.Option(None, help="SQLAlchemy URL (default: $TUNERD_DB or the cache's SQLite)"),
    mkdir: bool = typer.Option(False, "--mkdir", help="create the --db SQLite file's directory if missing"),
) -> None:
    """Tune specs on this machine's device and store every trial and the winners (a rerun resumes)."""
    import signal

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tunerd.db.fingerprint import current
    from tunerd.schedules.strategies import STRATEGIES

    from .tuning import DEFAULT_STRATEGY, tune_spec

    strategy = strategy or DEFAULT_STRATEGY
    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"unknown strategy {strategy!r}; choose from {', '.join(sorted(STRATEGIES))}")
    if budget is not None and budget < 1:
        raise typer.BadParameter(f"--budget is trials per spec and must be at least 1, got {budget}")
    if seconds is not None and not seconds > 0:
        raise typer.BadParameter(f"--seconds must be positive, got {seconds}")
    specs = _specs_for(spec, suite, model, input_shape, batch, dtype)
    store = _store(db, mkdir=mkdir)
    device = current()
    console = Console(stderr=True)
    live = console.is_terminal  # piped to a log: plain lines, one per spec, no redrawn bars
    say = (
        (lambda text: console.print(text, markup=False, highlight=False))
        if live
        else (lambda text: typer.echo(text, err=True))
    )
    label = " (interpreter timings: never used to answer a GPU)" if device.interpreter else ""
    say(f"tuning {len(specs)} spec(s) with {strategy} on {device.name}{label} into {store.url}")
    if device.interpreter and seconds is None:
        estimate = _interpreter_estimate_s(specs, budget)
        if estimate > LONG_RUN_WARNING_S:
            say(
                f"warning: on the Triton interpreter this takes roughly {_duration(estimate)} (cost-model estimate); "
                f"`--suite quick`, a smaller --budget or --seconds bound it"
            )

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TimeRemainingColumn(),
    )
    done = 0
    try:
        with Progress(*cols, console=console, disable=not live) as bar:
            for i, s in enumerate(specs, 1):
                name = f"[{i}/{len(specs)}] {s.describe()}"
                task = bar.add_task(name, total=budget, best="-")
                last: list = []

                def show(p, task=task, last=last) -> None:
                    last[:] = [p]
                    best = f"{p.best.median_ms:.4g} ms" if p.best and p.best.median_ms else "-"
                    bar.update(task, completed=p.done, total=p.total, best=best)

                try:
                    res = tune_spec(
                        store,
                        device,
                        s,
                        strategy=strategy,
                        budget_trials=budget,
                        budget_seconds=seconds,
                        seed=seed,
                        on_progress=show,
                    )
                except ValueError as e:  # a spec this device cannot tune (no candidates, an unbound op)
                    say(f"{name}: skipped: {e}")
                    continue
                trials = last[0].done if last else 0
                bar.update(task, completed=trials, total=trials or 1)
                say(f"{name}: {_summary(res, trials)}")
                done += 1
    except KeyboardInterrupt:
        fail(
            f"interrupted after {done} of {len(specs)} spec(s); every finished trial is stored, "
            f"and the same command resumes",
            code=130,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def show(
    db: str | None = typer.Option(None, help="SQLAlchemy URL"),
    all_devices: bool = typer.Option(False, "--all", help="every device, not only this one"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """List the stored winners: speed, speedup over the default schedule, fraction of roofline."""
    from rich.console import Console
    from rich.table import Table

    from tunerd.db.errors import UntrustedRecord
    from tunerd.db.fingerprint import current

    store = _store(db)
    device = None if all_devices else current()
    rows = store.winners(device)
    try:
        blocks = store.block_winners(device)
    except UntrustedRecord as e:  # a row whose plan or schedules are not legal for its block: never shown as usable
        fail(str(e))
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=1))
        if blocks:
            typer.echo(json.dumps({"block_winners": [b.to_dict() for b in blocks]}, indent=1))
        return
    if blocks:
        head = (
            f"{len(blocks)} block winner(s) " + ("in" if device is None else f"for {device.name} in") + f" {store.url}"
        )
        lines = [head] + [
            f"  {b.describe()}"
            + (f" on {b.device.name}" if device is None else "")
            + (" (claimed)" if b.claimed else "")
            + f"  plan {b.plan.describe()}"
            for b in blocks
        ]
        typer.echo("\n".join(lines))
    if not rows and blocks:
        return
    if not rows:
        where = "in the store" if device is None else f"for {device.name}"
        others = len(store.winners(None)) if device is not None else 0
        hint = f" ({others} for other devices: `tunerd show --all`)" if others else ""
        Console().print(
            f"no winners {where} yet in {store.url}{hint}.\nNext: `tunerd tune --suite quick` tunes a "
            f"small suite here; `tunerd import FILE.bundle` adds winners tuned on another machine.",
            markup=False,
            highlight=False,
        )
        return
    title = f"{len(rows)} winner(s) " + ("in" if device is None else f"for {device.name} in") + f" {store.url}"
    table = Table(title=title, title_justify="left")
    table.add_column("spec", ratio=1, overflow="fold")
    if device is None:
        table.add_column("device", overflow="fold", max_width=16)
    for col in ("ms", "vs default", "roofline"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("strategy", no_wrap=True)
    table.add_column("variant", no_wrap=True)
    for r in rows:
        cells = [r.spec.describe()] + ([r.device.name] if device is None else [])
        cells += [
            f"{r.median_ms:.4g}",
            f"{r.speedup_vs_default:.2f}x" if r.speedup_vs_default else "-",
            f"{r.fraction_of_roofline:.0%}" if r.fraction_of_roofline else "-",
            r.strategy or "-",
            r.variant_id[:8],
        ]
        table.add_row(*cells)
    Console().print(table)


@app.command("tune-blocks")
def tune_blocks(
    suite: str = typer.Option(..., help="a block suite: convnext_t, efficientnet_b0, mobilenetv2, ..."),
    batch: int = typer.Option(32, help="batch size"),
    dtype: str = typer.Option("bfloat16", help="float32, float16 or bfloat16"),
    only: str | None = typer.Option(None, help="comma-separated block names of the suite (e.g. stage2.0)"),
    strategy: str = typer.Option("exhaustive", help="search strategy of each plan's costliest fused step"),
    budget: int | None = typer.Option(None, help="trials per block, shared over the plans searched"),
    seconds: float | None = typer.Option(None, help="time budget per block"),
    max_plans: int = typer.Option(3, help="the cheapest modelled plans searched (plus the unfused baseline)"),
    seed: int = typer.Option(0),
    db: str | None = typer.Option(None, help="SQLAlchemy URL (default: $TUNERD_DB or the cache's SQLite)"),
    mkdir: bool = typer.Option(False, "--mkdir", help="create the --db SQLite file's directory if missing"),
) -> None:
    """Tune a block suite's fused blocks (plan x schedule) here and store each block's winning plan."""
    from tunerd.db.fingerprint import current
    from tunerd.kernels.spec import SpecError
    from tunerd.schedules.block_suites import block_suite

    from .tuning import tune_block_winner

    if budget is not None and budget < 1:
        raise typer.BadParameter(f"--budget is trials per block and must be at least 1, got {budget}")
    try:
        entries = block_suite(suite, batch, dtype)
    except (KeyError, SpecError) as e:
        raise typer.BadParameter(str(e).strip("'\"")) from None
    if only is not None:
        names = set(only.split(","))
        unknown = names - {x.name for x in entries}
        if unknown:
            raise typer.BadParameter(f"no blocks {sorted(unknown)} in {suite}; it has {[x.name for x in entries]}")
        entries = [x for x in entries if x.name in names]
    store = _store(db, mkdir=mkdir)
    device = current()
    typer.echo(f"tuning {len(entries)} block(s) of {suite} with {strategy} on {device.name} into {store.url}", err=True)
    for entry in entries:
        res = tune_block_winner(
            store,
            device,
            entry.block,
            strategy=strategy,
            budget_trials=budget,
            budget_seconds=seconds,
            max_plans=max_plans,
            seed=seed,
        )
        row = store.block_winner(device, entry.block)
        typer.echo(f"{suite} {entry.name}: " + (row.describe() if row else f"no correct plan ({res.statuses})"))


@app.command("export")
def export_(
    out: Path = typer.Option(..., help="bundle file to write (atomically)"),
    db: str | None = typer.Option(None, help="SQLAlchemy URL"),
    this_device: bool = typer.Option(False, help="only this machine's device"),
    snapshot: str | None = typer.Option(None, help="export a pinned snapshot instead of live winners"),
    name_host: bool = typer.Option(False, help="record this machine's host name in the provenance"),
    sign: Path | None = typer.Option(None, help="ed25519 private key file (PEM or OpenSSH) to sign with"),
    arch: list[int] | None = typer.Option(
        None,
        help="also ship every exported kernel compiled for this CUDA compute capability (90: sm_90); repeatable. "
        "No GPU needed; clients with the same Triton build load them without compiling (bundle signed by a key "
        "they pin). Binaries kept in the store are reused where their Triton cache key still matches; the rest "
        "are compiled and kept",
    ),
) -> None:
    """Write a versioned, checksummed (optionally signed) bundle of winners with their source and provenance."""
    import platform

    from tunerd.db.bundle import export_bundle, load_signing_key
    from tunerd.db.errors import StoreError
    from tunerd.db.fingerprint import current

    from . import __version__

    provenance = {"tunerd": __version__, "tool": "tunerd export", **({"host": platform.node()} if name_host else {})}
    try:  # StoreError includes UntrustedRecord: a stored block winner that does not check out stops the export
        key = load_signing_key(sign) if sign is not None else None
        summary = export_bundle(
            _store(db),
            out,
            device=current() if this_device else None,
            snapshot=snapshot,
            provenance=provenance,
            signing_key=key,
            arches=arch or (),
        )
    except StoreError as e:  # BundleError, an unknown --snapshot
        fail(str(e))
    except RuntimeError as e:  # the ahead-of-time compiler itself failed
        fail(f"cannot compile binaries: {e}")
    binaries = (
        f", {summary.binaries} binaries for sm_{'/'.join(map(str, sorted(set(arch))))} ({summary.binaries_reused} "
        f"reused from the store, {summary.binaries_compiled} compiled)"
        if arch
        else ""
    )
    typer.echo(
        f"wrote {summary.winners} winners and {summary.block_winners} block winners for {summary.devices} device(s)"
        f"{binaries} to {out} ({summary.bytes} bytes, sha256 {summary.sha256[:16]})"
    )
    for err in summary.binary_errors:
        typer.echo(f"warning: no binary (clients compile it): {err}", err=True)
    if arch and key is None:
        typer.echo("warning: unsigned bundle: clients use its winners but never its binaries (--sign)", err=True)


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="bundle file"),
    db: str | None = typer.Option(None, help="SQLAlchemy URL"),
    trusted_key: list[Path] | None = typer.Option(
        None,
        help="ed25519 public key file; repeatable. When given (or $TUNERD_TRUSTED_KEYS), only bundles signed by "
        "one are read",
    ),
) -> None:
    """Merge a bundle: a corrupt, foreign, tampered or incompatible file is refused and nothing changes.
    Its timings are claims until the daemon's verify job measures them here."""
    from tunerd.db.bundle import BundleError, import_bundle, pinned_keys

    try:
        keys = pinned_keys(trusted_key or None)
        r = import_bundle(_store(db), path, trusted_keys=keys)
    except BundleError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    signed = f", signed by {r.signed_by}" if r.signed_by else ""
    blocks = (
        f"; block winners: {r.blocks_added} added, {r.blocks_replaced} replaced, {r.blocks_kept} kept, "
        f"{r.blocks_unchanged} unchanged"
        if r.block_winners
        else ""
    )
    binaries = f"; {r.binaries} binaries kept" if r.binaries else ""
    typer.echo(
        f"imported {path}{signed}: {r.added} added, {r.replaced} replaced (a slower claim), {r.kept} kept "
        f"(measured here or faster), {r.unchanged} unchanged{blocks}{binaries}; imported timings are claims until "
        f"measured here"
    )
    if r.binaries_note:
        typer.echo(f"warning: {r.binaries_note}", err=True)


@app.command()
def gc(
    db: str | None = typer.Option(None, help="SQLAlchemy URL"),
    older_than: float = typer.Option(
        3600.0, min=0.0, help="seconds: only files an interrupted import left at least this long ago"
    ),
) -> None:
    """Delete binary files no kept binary refers to (what an import that failed or was killed halfway left), as a
    running daemon's idle worker does every few minutes: for stores no daemon serves. In short transactions."""
    from tunerd.db.errors import StoreError

    store = _store(db)
    before, removed = store.blob_count(), 0
    try:
        while n := store.collect_blobs(older_than, limit=256):
            removed += n
    except StoreError as e:
        fail(f"cannot collect: {e}")
    after = store.blob_count()
    typer.echo(
        f"removed {removed} unreferenced files and chunks ({(before[1] - after[1]) / 2**20:.1f} MiB); "
        f"{after[0]} files ({after[1] / 2**20:.1f} MiB) kept"
    )


_SERVE_HELP = {
    "host": "address to listen on (env TUNERD_HOST; default 127.0.0.1)",
    "port": "port (env TUNERD_PORT; default 8521)",
    "db": "SQLAlchemy URL of the store (env TUNERD_DB_URL or TUNERD_DB; default the local SQLite file)",
    "token_file": "file holding the admin bearer token: every route (env TUNERD_TOKEN)",
    "read_token_file": "file holding the read-only bearer token, for training jobs (env TUNERD_READ_TOKEN)",
    "insecure": "allow a non-loopback --host without a token (every route open to the network)",
    "worker": "run the tuning worker in this daemon (default on)",
    "log_level": "log level (env TUNERD_LOG_LEVEL; default info)",
}


@app.command()
def serve(
    host: str | None = typer.Option(None, help=_SERVE_HELP["host"]),
    port: int | None = typer.Option(None, help=_SERVE_HELP["port"]),
    db: str | None = typer.Option(None, help=_SERVE_HELP["db"]),
    token_file: Path | None = typer.Option(None, help=_SERVE_HELP["token_file"]),
    read_token_file: Path | None = typer.Option(None, help=_SERVE_HELP["read_token_file"]),
    insecure: bool = typer.Option(False, "--insecure", help=_SERVE_HELP["insecure"]),
    worker: bool | None = typer.Option(None, "--worker/--no-worker", help=_SERVE_HELP["worker"]),
    log_level: str | None = typer.Option(None, help=_SERVE_HELP["log_level"]),
) -> None:
    """Run the tunerd daemon: the HTTP API (/v1, /docs, /metrics, dashboard at /) and a tuning worker."""
    from pydantic import ValidationError

    from tunerd.db.errors import StoreError

    from .api import InsecureExposure
    from .api import serve as run
    from .settings import Settings

    def read_token(path: Path | None) -> str | None:
        try:
            return None if path is None else path.read_text().strip()
        except OSError as e:
            raise typer.BadParameter(f"cannot read the token file {path}: {e.strerror or e}") from None

    overrides: dict[str, Any] = {
        k: v
        for k, v in dict(
            host=host,
            port=port,
            db_url=db,
            token=read_token(token_file),
            read_token=read_token(read_token_file),
            worker=worker,
            log_level=log_level,
            insecure=insecure or None,
        ).items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        raise typer.BadParameter(
            "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        ) from None
    try:
        run(settings=settings)
    except InsecureExposure as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except StoreError as e:  # a bad URL or a schema from a newer tunerd (a database that is down only waits)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    """The console entry: every expected failure is one line on stderr, Ctrl-C included."""
    cli_errors: tuple[type[Exception], ...]
    try:
        from typer.exceptions import TyperException  # typer >= 0.24 vendors click

        cli_errors = (TyperException,)
    except ImportError:
        import click

        cli_errors = (click.ClickException,)
    try:
        code = app(standalone_mode=False)
    except cli_errors as e:  # bad options or arguments, BadParameter raised by the commands
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(0)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {getattr(e, 'format_message', e.__str__)()}{where}", err=True)
        code = getattr(e, "exit_code", 2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
