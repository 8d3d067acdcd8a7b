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
    """Compile a variant for a real GPU target (no GPU needed) and report shared memory."""
    from kernels.validate import compile_check

    v = _variant(spec, schedule)
    r = compile_check([v], arch=arch)[0]
    if not r["ok"]:
        typer.echo(r["error"], err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: variant {v.id} compiles for sm_{arch}, {r['shared']} bytes of shared memory")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
