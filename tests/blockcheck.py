"""Numerics checks of fused block plans against the float64 reference (kernels.block_reference), shared by the
block test modules: fresh random parameters and input, NaN-poisoned buffers, the dtype's tolerance."""

from __future__ import annotations

import torch

from tunerd.kernels import block_autograd, block_reference, fused, reference
from tunerd.kernels.block import Block
from tunerd.kernels.conv import SPEC_DTYPES
from tunerd.kernels.plan import Plan
from tunerd.kernels.schedule import Schedule


def inputs(blk: Block, seed: int, device: str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random parameters (fused.random_params) and an NCHW input of blk's dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = fused.random_params(blk, device, g)
    x = torch.randn((blk.n, blk.c, *blk.in_size), generator=g, device=device).to(SPEC_DTYPES[blk.dtype])
    return params, x


def check_plan(
    blk: Block, plan: Plan, seed: int = 0, schedules: dict[int, Schedule] | None = None, device: str = "cpu"
) -> float:
    """Run blk under plan (buffers poisoned) and assert it matches the float64 reference; the relative error."""
    params, x = inputs(blk, seed, device)
    ref = block_reference.block(blk, params, x)
    y = fused.run_plan(blk, params, x, plan, schedules, poison=True)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    err = reference.rel_error(y, ref)
    assert err < reference.tolerance(blk.dtype), (plan.describe(), blk.dtype, err)
    return err


def check_gradients(blk: Block, plan: Plan, seed: int, device: str = "cpu", tol: float = 1e-5) -> list[str]:
    """The fused forward and its (recomputing) backward against float64 autograd of the reference, for the
    input and every parameter; the names of the parameters checked."""
    g = torch.Generator().manual_seed(seed)
    params = {k: v.to(device).requires_grad_() for k, v in fused.random_params(blk, "cpu", g).items()}
    x = torch.randn((blk.n, blk.c, *blk.in_size), generator=g).to(device).requires_grad_()
    y = block_autograd.block(blk, params, x, plan, poison=True)
    dy = torch.randn(y.shape, generator=g).to(device)
    got = torch.autograd.grad(y, [x, *params.values()], dy)
    x64 = x.detach().double().requires_grad_()
    p64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    y64 = block_reference.block(blk, p64, x64)
    want = torch.autograd.grad(y64, [x64, *p64.values()], dy.double())
    assert reference.rel_error(y, y64) < tol
    for what, a, b in zip(["input", *params], got, want):
        assert a.shape == b.shape and reference.rel_error(a, b) < tol, (what, reference.rel_error(a, b))
    return list(params)
