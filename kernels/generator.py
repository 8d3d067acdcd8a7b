"""Generator: (BlockSpec, Schedule) -> Variant, i.e. Triton source text plus its launch metadata.

Same spec + schedule -> byte-identical source -> the same content hash (the variant id).
Each (kind, op) has one Template: a Jinja2 file, a context builder and a grid function.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2

from . import epilogue as _ep
from . import schedule as _sched
from .schedule import UNROLL_TAPS, Schedule
from .spec import BlockSpec, SpecError

GENERATOR_VERSION = "0.2.0"
INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Variant:
    """One generated kernel: spec + schedule + the exact source and how to launch it."""

    spec: BlockSpec
    schedule: Schedule
    source: str
    kernel_name: str
    grid: tuple[int, ...]

    @cached_property
    def id(self) -> str:
        return source_id(self.source)

    @property
    def num_warps(self) -> int:
        return self.schedule.num_warps

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages


@dataclass(frozen=True)
class Template:
    file: str
    context: Callable[[BlockSpec, Schedule], dict[str, Any]]
    grid: Callable[[BlockSpec, Schedule], tuple[int, ...]]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


class Context(dict):
    """Template context with attribute access (v.BM rather than v['BM'])."""

    __getattr__ = dict.__getitem__


def geometry(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    """Shape constants every template shares: NHWC strides and window geometry."""
    nd = spec.ndim
    sx = [spec.c * _prod(spec.in_size[d + 1 :]) for d in range(nd)]
    largest = max(spec.n * spec.c * _prod(spec.in_size), spec.out_pixels * spec.k)
    return dict(
        ndim=nd,
        dims=list(range(nd)),
        N=spec.n,
        C=spec.c,
        K=spec.k,
        CG=spec.cg,
        KG=spec.kg,
        G=spec.groups,
        IN=list(spec.in_size),
        OUT=list(spec.out_size),
        KS=list(spec.kernel),
        ST=list(spec.stride),
        PAD=[p[0] for p in spec.padding],
        DIL=list(spec.dilation),
        TAPS=spec.taps,
        M=spec.out_pixels,
        SX=sx,
        SXN=spec.c * _prod(spec.in_size),
        padded=spec.has_padding,
        i64=largest > INT32_LIMIT,
        BM=s.block_m,
        BN=s.block_n,
        BK=s.block_k,
        GROUP_M=s.group_m,
        ep=spec.epilogue,
        BF16=spec.dtype == "bfloat16",
        ep_args=_ep.arg_names(spec.epilogue),
        act=lambda var: _ep.activation_expr(spec.epilogue.activation, var),
    )


def _grad_geometry(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    """Shared context of backward templates: geometry plus the plan of the chain's gradient."""
    g = geometry(spec, s)
    ep = spec.epilogue
    g.update(
        gep=ep,
        plan=_ep.grad_plan(ep, spec.op),
        SPLIT=s.split_k,
        act_grad=lambda var: _ep.activation_grad_expr(ep.activation, var),
        SO=[_prod(spec.out_size[d + 1 :]) for d in range(spec.ndim)],
        OPIX=_prod(spec.out_size),
        TS=[_prod(spec.kernel[d + 1 :]) for d in range(spec.ndim)],
        dot_kw=f', input_precision="{spec.precision}"' if spec.dtype == "float32" else "",
    )
    return g


def _select(var: str, values: list[int]) -> str:
    """Triton expression picking values[var] for a small runtime index (a literal when all agree)."""
    if all(v == values[0] for v in values):
        return str(values[0])
    expr = str(values[-1])
    for i in range(len(values) - 2, -1, -1):
        expr = f"tl.where({var} == {i}, {values[i]}, {expr})"
    return expr


def _phases(spec: BlockSpec) -> dict[str, Any]:
    """Stride-phase decomposition of dgrad, per spatial dim.

    Input coordinate i receives dz[o] * w[t] only where i + pad = o * stride + t * dilation. Split the
    input by phase ph = (i + pad) % stride: the phase's pixels are i = i0 + j * stride (j < cnt), and
    exactly the taps t = t0 + a * step (a < nt, step = stride / gcd(stride, dilation)) reach them,
    from o = q + j - a * stepo (stepo = dilation / gcd). Every multiply hits a real dz element.
    """
    nd = spec.ndim
    tab: dict[str, list] = {k: [] for k in ("I0", "CNT", "CNTS", "T0", "NT", "Q")}
    step, stepo = [], []
    for d in range(nd):
        st, dl, p, ks, n_in = spec.stride[d], spec.dilation[d], spec.padding[d][0], spec.kernel[d], spec.in_size[d]
        gcd = math.gcd(st, dl)
        step.append(st // gcd)
        stepo.append(dl // gcd)
        rows = []
        for ph in range(st):
            i0 = (ph - p) % st
            cnt = max(0, _cdiv(n_in - i0, st))
            taps = [t for t in range(ks) if (t * dl) % st == ph]
            t0 = taps[0] if taps else 0
            q = (i0 + p - t0 * dl) // st if taps else 0
            rows.append((i0, cnt, max(cnt, 1), t0, len(taps), q))  # CNTS: a safe divisor
        for key, col in zip(("I0", "CNT", "CNTS", "T0", "NT", "Q"), zip(*rows)):
            tab[key].append(_select(f"ph{d}", list(col)))
    return dict(PH=spec.phases, STEP=step, STEPO=stepo, MMAX=spec.phase_pixels, **tab)


def _conv_fwd_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = geometry(spec, s)
    pointwise = spec.taps == 1 and all(v == 1 for v in spec.stride) and not spec.has_padding
    dot_kw = f', input_precision="{spec.precision}"' if spec.dtype == "float32" else ""
    g.update(
        NPID_M=_cdiv(spec.out_pixels, s.block_m),
        NPID_N=_cdiv(spec.kg, s.block_n),
        NCB=_cdiv(spec.cg, s.block_k),
        KTOT=spec.cg * spec.taps,
        k_order=s.k_order,
        pointwise=pointwise,
        dot_kw=dot_kw,
    )
    return g


def _conv_fwd_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (_cdiv(spec.out_pixels, s.block_m) * _cdiv(spec.kg, s.block_n), spec.groups)


def _depthwise_fwd_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = geometry(spec, s)
    # Unroll the innermost window dim when short; longer ones (31x31) stay runtime loops.
    static = [d == spec.ndim - 1 and spec.kernel[d] <= UNROLL_TAPS for d in range(spec.ndim)]
    g.update(MULT=spec.k // spec.c, static=static)
    return g


def _depthwise_fwd_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (_cdiv(spec.out_pixels, s.block_m), _cdiv(spec.k, s.block_n))


def _conv_dgrad_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = _grad_geometry(spec, s)
    g.update(_phases(spec))
    g.update(
        NPID_M=_cdiv(g["MMAX"], s.block_m),
        NPID_N=_cdiv(spec.cg, s.block_n),
        NKB=_cdiv(spec.kg, s.block_k),
        k_order=s.k_order,
    )
    return g


def _conv_dgrad_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (_cdiv(spec.phase_pixels, s.block_m) * _cdiv(spec.cg, s.block_n), spec.groups, spec.phases)


def _wgrad_cols(spec: BlockSpec, s: Schedule) -> int:
    """Column tiles of the wgrad GEMM: taps x channel blocks ('tap'), or the flattened (tap, c) axis."""
    if s.k_order == "tap":
        return spec.taps * _cdiv(spec.cg, s.block_n)
    return _cdiv(spec.taps * spec.cg, s.block_n)


def _conv_wgrad_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = _grad_geometry(spec, s)
    g.update(
        NPID_M=_cdiv(spec.kg, s.block_m),
        NPID_N=_wgrad_cols(spec, s),
        NCB=_cdiv(spec.cg, s.block_n),
        k_order=s.k_order,
        KTOT=spec.taps * spec.cg,
        CHUNK=_cdiv(_cdiv(spec.out_pixels, s.block_k), s.split_k) * s.block_k,
    )
    return g


def _conv_wgrad_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (_cdiv(spec.kg, s.block_m) * _wgrad_cols(spec, s), spec.groups, s.split_k)


def _depthwise_dgrad_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = _grad_geometry(spec, s)
    g.update(_phases(spec))
    g.update(MULT=spec.k // spec.c)
    return g


def _depthwise_dgrad_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (_cdiv(spec.phase_pixels, s.block_m), _cdiv(spec.c, s.block_n), spec.phases)


def _depthwise_wgrad_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = _grad_geometry(spec, s)
    g.update(MULT=spec.k // spec.c, BT=s.block_k, CHUNK=_cdiv(_cdiv(spec.out_pixels, s.block_m), s.split_k) * s.block_m)
    return g


def _depthwise_wgrad_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (s.split_k, _cdiv(spec.k, s.block_n), _cdiv(spec.taps, s.block_k))


TEMPLATES: dict[tuple[str, str], Template] = {
    ("conv", "fwd"): Template("conv_fwd.py.j2", _conv_fwd_context, _conv_fwd_grid),
    ("depthwise", "fwd"): Template("depthwise_fwd.py.j2", _depthwise_fwd_context, _depthwise_fwd_grid),
    ("conv", "dgrad"): Template("conv_dgrad.py.j2", _conv_dgrad_context, _conv_dgrad_grid),
    ("conv", "wgrad"): Template("conv_wgrad.py.j2", _conv_wgrad_context, _conv_wgrad_grid),
    ("depthwise", "dgrad"): Template("depthwise_dgrad.py.j2", _depthwise_dgrad_context, _depthwise_dgrad_grid),
    ("depthwise", "wgrad"): Template("depthwise_wgrad.py.j2", _depthwise_wgrad_context, _depthwise_wgrad_grid),
}


def register(kind: str, op: str, template: Template) -> None:
    """Add or replace a (kind, op) template (e.g. a new family from outside this module)."""
    TEMPLATES[(kind, op)] = template
    _render.cache_clear()


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


def kernel_name(spec: BlockSpec) -> str:
    return f"tunerd_{spec.kind}{spec.ndim}d_{spec.op}"


def source_id(source: str) -> str:
    """A variant's id: the content hash of its exact source."""
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _template(spec: BlockSpec) -> Template:
    tpl = TEMPLATES.get((spec.kind, spec.op))
    if tpl is None:
        raise SpecError(f"no generator for kind={spec.kind!r} op={spec.op!r}")
    return tpl


def render(spec: BlockSpec, schedule: Schedule | dict | None = None) -> Variant:
    """Render the Triton source for spec under schedule (default heuristic when None).

    Cached per (spec, canonical schedule): conv calls on the hot path do not re-run Jinja.
    """
    _template(spec)
    return _render(spec, _sched.resolve(spec, schedule))


@lru_cache(maxsize=4096)
def _render(spec: BlockSpec, s: Schedule) -> Variant:
    tpl = _template(spec)
    ctx = Context(tpl.context(spec, s))
    name = kernel_name(spec)
    ctx.update(name=name, generator_version=GENERATOR_VERSION, spec_json=spec.to_json(), schedule_json=s.to_json())
    source = environment().get_template(tpl.file).render(v=ctx)
    source = "\n".join(line.rstrip() for line in source.splitlines()) + "\n"
    return Variant(spec=spec, schedule=s, source=source, kernel_name=name, grid=tpl.grid(spec, s))
