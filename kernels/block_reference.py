"""Torch semantics of block nodes, and the float64 oracle of a whole block.

apply_node() is the one definition of what each non-conv node computes (gate() that of the se / eca
gates, which fused steps apply to pooled sums their producers took); the oracle runs it in float64 and
fused.py's 'op' steps run it in fp32. Tensors are [N, C, H, W] (any memory format).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .block import GATES, Block, Node
from .epilogue import activation_torch

Params = dict[str, torch.Tensor]


def _vec(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).reshape(1, -1, 1, 1)


def apply_node(nd: Node, ins: list[torch.Tensor], params: Params) -> torch.Tensor:
    """One non-conv node on tensors of one float dtype (computed in that dtype)."""
    x = ins[0]
    p = {k.split(".", 1)[1]: v.to(x.dtype) for k, v in params.items() if k.split(".", 1)[0] == nd.name}
    if nd.op == "bn":
        return x * _vec(p["scale"], x) + _vec(p["shift"], x)
    if nd.op == "ln":
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), p["weight"], p["bias"], nd["eps"])
        return y.permute(0, 3, 1, 2)
    if nd.op == "act":
        return activation_torch(nd["fn"], x)
    if nd.op in GATES:
        return x * gate(nd, x.mean(dim=(2, 3)), params)[:, :, None, None]
    if nd.op == "gap":
        return x.mean(dim=(2, 3), keepdim=True)
    if nd.op == "avgpool":
        return F.avg_pool2d(x, nd["kernel"], nd["stride"], nd["padding"], nd["ceil_mode"], nd["count_include_pad"])
    if nd.op == "broadcast":
        return x.expand(-1, -1, *nd["size"])
    if nd.op == "scale":
        return x * _vec(p["gamma"], x)
    if nd.op == "scalar":
        return x * nd["value"]
    if nd.op == "add":
        return x + ins[1]
    if nd.op == "mul":
        return x * ins[1]
    if nd.op == "split":
        return x[:, nd["start"] : nd["start"] + nd["size"]]
    if nd.op == "concat":
        return torch.cat(ins, dim=1)
    raise ValueError(f"apply_node does not run {nd.op!r} nodes")


def gate(nd: Node, pooled: torch.Tensor, params: Params) -> torch.Tensor:
    """An se / eca node's per-channel gate [N, C] from the pooled input [N, C] (the channel means), in its dtype."""
    p = {k.split(".", 1)[1]: v.to(pooled.dtype) for k, v in params.items() if k.split(".", 1)[0] == nd.name}
    if nd.op == "se":
        s = activation_torch(nd["act"], pooled @ p["w1"].t() + p["b1"])
        return torch.sigmoid(s @ p["w2"].t() + p["b2"])
    if nd.op == "eca":
        k = nd["kernel"]
        return torch.sigmoid(F.conv1d(pooled[:, None, :], p["weight"].reshape(1, 1, k), padding=k // 2)[:, 0])
    raise ValueError(f"{nd.op!r} nodes have no gate")


def block(blk: Block, params: Params, x: torch.Tensor) -> torch.Tensor:
    """float64 forward of the whole block on [N, C, H, W]."""
    d = torch.float64
    vals = {"x": x.to(d)}
    for nd in blk.nodes:
        ins = [vals[i] for i in nd.inputs]
        if nd.op == "conv":
            spec = blk.conv_spec(nd)
            bias = params.get(f"{nd.name}.bias")
            vals[nd.name] = reference.conv(spec, ins[0], params[f"{nd.name}.weight"], bias=bias)
        else:
            vals[nd.name] = apply_node(nd, ins, params)
    return vals[blk.nodes[-1].name]
