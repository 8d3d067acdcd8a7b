"""The tunerd command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generated, autotuned Triton conv kernels.")


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


def _variant(spec_json: str, schedule_json: Optional[str]):
    from kernels import generator
    from kernels.schedule import Schedule, ScheduleError
    from kernels.spec import BlockSpec, SpecError

    try:
        spec = BlockSpec.from_dict(read_json_arg(spec_json))
        schedule = Schedule.from_dict(read_json_arg(schedule_json)) if schedule_json else None
        return generator.render(spec, schedule)
    except (SpecError, ScheduleError) as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def source(spec: str = typer.Argument(..., help="BlockSpec JSON, @file or -"),
           schedule: Optional[str] = typer.Option(None, help="Schedule JSON or @file (default: heuristic)")) -> None:
    """Print the generated Triton source of a variant."""
    v = _variant(spec, schedule)
    typer.echo(v.source, nl=False)
    typer.echo(f"# variant id {v.id}, grid {v.grid}, num_warps {v.num_warps}, num_stages {v.num_stages}", err=True)


@app.command()
def check(spec: str = typer.Argument(..., help="BlockSpec JSON, @file or -"),
          schedule: Optional[str] = typer.Option(None, help="Schedule JSON or @file"),
          arch: int = typer.Option(90, help="CUDA compute capability to compile for")) -> None:
    """Compile a variant for a real GPU target (no GPU needed) and report what it uses."""
    from kernels.validate import compile_check

    v = _variant(spec, schedule)
    r = compile_check([v], arch=arch)[0]
    if not r["ok"]:
        typer.echo(r["error"], err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: variant {v.id} compiles for sm_{arch}: {r['regs']} registers, {r['spill_bytes']} B spilled, "
               f"{r['shared']} B shared memory, MMA {r['mma']}, {r['cp_async']} cp.async, "
               f"loads up to {r['max_load_bytes']} B")


def _store(db: Optional[str]):
    from db.errors import StoreError
    from db.store import Store

    try:
        return Store(db)
    except StoreError as e:
        raise typer.BadParameter(f"cannot open the store: {e}") from None


def _specs_for(spec: Optional[str], suite: Optional[str], model: Optional[str], input_shape: Optional[str],
               batch: Optional[int], dtype: Optional[str]) -> list:
    from kernels.spec import BlockSpec, SpecError
    from schedules import suites

    try:
        if sum(x is not None for x in (spec, suite, model)) != 1:
            raise typer.BadParameter("give exactly one of SPEC, --suite or --model")
        if spec is not None:
            return [BlockSpec.from_dict(read_json_arg(spec))]
        if suite is not None:
            return suites.suite(suite, batch=batch, dtype=dtype)
        return suites.model_specs(_load_model(model, dtype), _example_input(input_shape, dtype))
    except SpecError as e:
        raise typer.BadParameter(str(e)) from None


def _load_model(ref: str, dtype: Optional[str]):
    import importlib

    import torch

    mod_name, _, attr = ref.partition(":")
    if not attr:
        raise typer.BadParameter("--model takes module:callable, e.g. benchmarks.models:resnet50")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise typer.BadParameter(f"cannot load {ref}: {e}") from None
    model = factory()
    return model.to(getattr(torch, dtype)) if dtype else model


def _example_input(shape: Optional[str], dtype: Optional[str]):
    import torch

    if not shape:
        raise typer.BadParameter("--model needs --input-shape, e.g. 1,3,224,224")
    try:
        dims = [int(v) for v in shape.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--input-shape must be comma-separated ints, got {shape!r}") from None
    return torch.randn(*dims, dtype=getattr(torch, dtype) if dtype else torch.float32)


@app.command()
def tune(spec: Optional[str] = typer.Argument(None, help="BlockSpec JSON, @file or -"),
         suite: Optional[str] = typer.Option(None, help="a named suite: quick, resnet50, mobilenetv2, ..."),
         model: Optional[str] = typer.Option(None, help="module:callable building a torch model to take convs from"),
         input_shape: Optional[str] = typer.Option(None, help="input shape for --model, e.g. 1,3,224,224"),
         batch: Optional[int] = typer.Option(None, help="batch size for --suite"),
         dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16"),
         strategy: str = typer.Option("halving", help="exhaustive, random, halving, tpe or evolution"),
         budget: Optional[int] = typer.Option(None, help="trials per spec"),
         seconds: Optional[float] = typer.Option(None, help="time budget per spec"),
         seed: int = typer.Option(0),
         db: Optional[str] = typer.Option(None, help="SQLAlchemy URL (default: $TUNERD_DB or the cache's SQLite)")) -> None:
    """Tune specs on this machine's device and store every trial and the winners."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from db.fingerprint import current
    from schedules.strategies import STRATEGIES

    from .tuning import tune_spec

    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"unknown strategy {strategy!r}; choose from {', '.join(sorted(STRATEGIES))}")
    specs = _specs_for(spec, suite, model, input_shape, batch, dtype)
    store = _store(db)
    device = current()
    console = Console(stderr=True)
    label = " (interpreter timings: never used to answer a GPU)" if device.interpreter else ""
    console.print(f"tuning {len(specs)} spec(s) on [bold]{device.name}[/]{label} into {store.url}")
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
            TimeRemainingColumn())
    with Progress(*cols, console=console) as bar:
        for s in specs:
            task = bar.add_task(s.describe(), total=budget, best="-")

            def show(p, task=task) -> None:
                best = f"{p.best.median_ms:.4g} ms" if p.best and p.best.median_ms else "-"
                bar.update(task, completed=p.done, total=p.total, best=best)

            res = tune_spec(store, device, s, strategy=strategy, budget_trials=budget, budget_seconds=seconds,
                            seed=seed, on_progress=show)
            bar.update(task, completed=bar.tasks[task].total or 1, total=bar.tasks[task].total or 1)
            speed = f"{res.speedup_vs_default:.2f}x vs default" if res.speedup_vs_default else "no ok variant"
            bar.console.print(f"  {s.describe()}: {res.best.median_ms if res.best else float('nan'):.4g} ms, "
                              f"{speed}, {res.measured} measured, {res.statuses}")


@app.command()
def show(db: Optional[str] = typer.Option(None, help="SQLAlchemy URL"),
         all_devices: bool = typer.Option(False, "--all", help="every device, not only this one"),
         as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List the stored winners: speed, fraction of roofline, speedup over the default schedule."""
    from rich.console import Console
    from rich.table import Table

    from db.fingerprint import current

    store = _store(db)
    rows = store.winners(None if all_devices else current())
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=1))
        return
    table = Table(title=f"tunerd winners ({store.url})")
    table.add_column("spec", no_wrap=True)
    for col in ("device", "median ms", "vs default", "roofline", "strategy", "variant"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.spec.describe(), r.device.name, f"{r.median_ms:.4g}",
                      f"{r.speedup_vs_default:.2f}x" if r.speedup_vs_default else "-",
                      f"{r.fraction_of_roofline:.0%}" if r.fraction_of_roofline else "-", r.strategy or "-",
                      r.variant_id[:12])
    Console().print(table)


@app.command("export")
def export_(out: Path = typer.Option(..., help="bundle file to write (atomically)"),
            db: Optional[str] = typer.Option(None, help="SQLAlchemy URL"),
            this_device: bool = typer.Option(False, help="only this machine's device"),
            snapshot: Optional[str] = typer.Option(None, help="export a pinned snapshot instead of live winners")) -> None:
    """Write a versioned, checksummed bundle of winners with their source and provenance."""
    import platform

    from db.bundle import BundleError, export_bundle
    from db.fingerprint import current

    from . import __version__

    provenance = {"tunerd": __version__, "host": platform.node(), "tool": "tunerd export"}
    try:
        summary = export_bundle(_store(db), out, device=current() if this_device else None, snapshot=snapshot,
                                provenance=provenance)
    except BundleError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(f"wrote {summary.winners} winners for {summary.devices} device(s) to {out} "
               f"({summary.bytes} bytes, sha256 {summary.sha256[:16]})")


@app.command("import")
def import_(path: Path = typer.Argument(..., help="bundle file"),
            db: Optional[str] = typer.Option(None, help="SQLAlchemy URL")) -> None:
    """Merge a bundle: a corrupt, foreign or incompatible file is refused and nothing changes."""
    from db.bundle import BundleError, import_bundle

    try:
        r = import_bundle(_store(db), path)
    except BundleError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"imported {path}: {r.added} added, {r.replaced} replaced (faster), {r.kept} kept (ours faster), "
               f"{r.unchanged} unchanged")


_SERVE_HELP = {"host": "address to listen on (env TUNERD_HOST; default 127.0.0.1)",
               "port": "port (env TUNERD_PORT; default 8521)",
               "db": "SQLAlchemy URL of the store (env TUNERD_DB_URL or TUNERD_DB; default the local SQLite file)",
               "token_file": "file holding the bearer token for write routes (env TUNERD_TOKEN)",
               "worker": "run the tuning worker in this daemon (default on)",
               "log_level": "log level (env TUNERD_LOG_LEVEL; default info)"}


@app.command()
def serve(host: Optional[str] = typer.Option(None, help=_SERVE_HELP["host"]),
          port: Optional[int] = typer.Option(None, help=_SERVE_HELP["port"]),
          db: Optional[str] = typer.Option(None, help=_SERVE_HELP["db"]),
          token_file: Optional[Path] = typer.Option(None, help=_SERVE_HELP["token_file"]),
          worker: Optional[bool] = typer.Option(None, "--worker/--no-worker", help=_SERVE_HELP["worker"]),
          log_level: Optional[str] = typer.Option(None, help=_SERVE_HELP["log_level"])) -> None:
    """Run the tunerd daemon: the HTTP API (/v1, /docs, /metrics, dashboard at /) and a tuning worker."""
    from pydantic import ValidationError

    from db.errors import StoreError

    from .service import serve as run
    from .settings import Settings

    token = None
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise typer.BadParameter(f"cannot read the token file {token_file}: {e.strerror or e}") from None
    overrides = {k: v for k, v in dict(host=host, port=port, db_url=db, token=token, worker=worker,
                                       log_level=log_level).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        raise typer.BadParameter("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                           for err in e.errors())) from None
    try:
        run(settings=settings)
    except StoreError as e:  # a bad URL or a schema from a newer tunerd (a database that is down only waits)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
