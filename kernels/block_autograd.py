"""Training through fused block plans.

block() runs a Block under a plan (kernels.fused.run_plan) inside a torch.autograd.Function that saves only
the block input and its parameters. Backward recomputes the block through the unfused differentiable path,
unfused(): every conv node through tunerd's own conv autograd (kernels.autograd: the forward kernel, then
dgrad / wgrad kernels), every other node through block_reference.apply_node in torch (LayerNorm, activation,
BN affine, the se / eca gates with their pooling, average pooling (F.avg_pool2d's own gradient: each output's
gradient spread over its window / divisor), scale, scalar, add, mul, split, concat, in fp32 as
run_plan's 'op' steps do), and returns the gradient of the input and of every parameter autograd asks for. No
intermediate of the block is kept between forward and backward: activation memory per block is its input.
"""

from __future__ import annotations

from typing import Any

import torch

from . import autograd as _autograd
from .block import INPUT, Block
from .block_reference import Params, apply_node
from .fused import check_inputs, run_plan
from .plan import Plan, check, rank
from .schedule import Schedule


def unfused(block: Block, params: Params, x: torch.Tensor) -> torch.Tensor:
    """The block's output, differentiable in x and every parameter: conv nodes through tunerd's conv
    autograd (their bias in the kernel's epilogue), other nodes in fp32 torch, cast back to x's dtype."""
    vals: dict[str, torch.Tensor] = {INPUT: x}
    for nd in block.nodes:
        ins = [vals[i] for i in nd.inputs]
        y: Any
        if nd.op == "conv":
            spec = block.conv_spec(nd)
            y = _autograd.conv(
                ins[0],
                params[f"{nd.name}.weight"],
                params.get(f"{nd.name}.bias"),
                spec.stride,
                spec.padding,
                spec.dilation,
                spec.groups,
                ndim=2,
            )
        elif nd.op in ("split", "concat"):  # exact in any dtype: no fp32 round trip, and a concat's gradient
            y = apply_node(nd, ins, params)  # reaches each branch conv as a channel slice it reads in place
        else:
            y = apply_node(nd, [t.float() for t in ins], params).to(x.dtype)
        vals[nd.name] = y
    return vals[block.nodes[-1].name]


class _BlockFunction(torch.autograd.Function):
    """forward: the fused plan (no graph, saves x and the parameters); backward: recompute unfused()."""

    @staticmethod
    def forward(
        ctx: Any,
        block: Block,
        plan: Plan,
        schedules: dict[int, Schedule] | None,
        poison: bool,
        keys: tuple[str, ...],
        x: torch.Tensor,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        ctx.block, ctx.keys = block, keys
        ctx.save_for_backward(x, *params)
        return run_plan(block, dict(zip(keys, params)), x, plan, schedules, poison=poison)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        leaves = [t.detach().requires_grad_(bool(need)) for t, need in zip((x, *params), needs)]
        wanted = [t for t in leaves if t.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        if wanted:
            with torch.enable_grad():
                y = unfused(ctx.block, dict(zip(ctx.keys, leaves[1:])), leaves[0])
                got = torch.autograd.grad(y, wanted, dy, allow_unused=True)
            it = iter(got)
            grads = [next(it) if t.requires_grad else None for t in leaves]
            # a parameter the output does not depend on still gets a (zero) gradient, as eager torch gives
            grads = [torch.zeros_like(t) if g is None and t.requires_grad else g for g, t in zip(grads, leaves)]
        return (None, None, None, None, None, *grads)


def block(
    blk: Block,
    params: Params,
    x: torch.Tensor,
    plan: Plan | None = None,
    schedules: dict[int, Schedule] | None = None,
    poison: bool = False,
) -> torch.Tensor:
    """The block's output [N, K, P, Q] under plan (the planner's best when None), differentiable in x and
    every parameter tensor of params (keys as Block.param_shapes()); backward recomputes unfused().
    poison: every buffer the forward's kernels write is NaN-filled first (run_plan's correctness gate)."""
    check_inputs(blk, params, x)
    plan = plan or rank(blk)[0].plan
    check(blk, plan)
    keys = tuple(blk.param_shapes())
    return _BlockFunction.apply(blk, plan, schedules, poison, keys, x, *(params[k] for k in keys))
