"""Structural re-parameterization: parallel conv branches (each with eval BatchNorm) merged into one conv.

RepVGG / MobileOne (k x k + 1 x 1 + identity), RepLKNet (large + small kernel) and UniRepLKNet
(dilated small kernels beside a large one): every branch is a conv over the same input with the same
stride, groups and window centre, so their sum is one conv whose weight is the sum of the branch
kernels, each dilated and zero-padded to the largest window, and whose bias is the sum of the biases.
A weight prologue: torch ops on the weights only (differentiable), the conv kernel stays the plain one.

Training form (train_forward): each branch's BatchNorm normalises with its own batch statistics, which exist
only after that branch's conv ran, so the exact form takes two steps. The stats pass is one tunerd conv over x
whose weight stacks every branch's padded kernel ([P*K, C/g, kh, kw], each group's outputs kept in their group)
and gathers per-channel mean and biased variance in its epilogue; the identity branch's statistics are
torch.var_mean of x. Then either "combine" (one elementwise pass: sum_b s_b z_b + s_id x + t, act) or "merged"
(online re-parameterization: a second conv of x with the statistics-merged weight, t and the activation in its
epilogue). Both are differentiable pieces (the conv custom op's y, mean and var, torch ops on [K]-sized tensors
and weights), so gradients flow through the statistics exactly. Without gradients (a precise-BN pass in train
mode) the merged form's stats pass writes only the statistics (conv.conv_stats, epilogue.stats_only: the stacked
output is never stored); with gradients it keeps z, which the statistics' gradient reads (d var / d z =
2 (z - mean) / count). train_costs() models both against eager.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from . import autograd
from .conv import conv_stats
from .epilogue import activation_torch
from .plan import Rates
from .prologue import fold_bn
from .spec import SpecError

FORMS = ("combine", "merged")  # the training form's second step: elementwise combine, or a conv of merged weights


@dataclass(frozen=True)
class Branch:
    """One linear branch: conv weight [K, C/g, kh, kw] (bias [K] or None), its dilation and padding."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def window(self) -> tuple[int, int]:
        """The dilated kernel's extent."""
        (dh, dw), (kh, kw) = self.dilation, self.weight.shape[2:4]
        return dh * (kh - 1) + 1, dw * (kw - 1) + 1

    @property
    def offset(self) -> tuple[int, int]:
        """Where the window starts relative to the output pixel (minus the padding); equal for mergeable branches."""
        (ph, pw), (wh, ww) = self.padding, self.window
        return ph - (wh - 1) // 2, pw - (ww - 1) // 2


def bn_branch(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: torch.nn.modules.batchnorm._BatchNorm,
    dilation: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
) -> Branch:
    """conv -> eval BatchNorm as one Branch (BN folded into the weight, running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise SpecError("BatchNorm without running statistics cannot be folded")
    w, b = fold_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return Branch(w, b, (dilation[0], dilation[1]), (padding[0], padding[1]))


def identity_weight(channels: int, groups: int, like: torch.Tensor) -> torch.Tensor:
    """The 1 x 1 grouped conv weight [C, C/g, 1, 1] that copies its input (dtype and device of like)."""
    if channels % groups:
        raise SpecError(f"channels {channels} must be divisible by groups {groups}")
    cg = channels // groups
    w = torch.zeros((channels, cg, 1, 1), dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    w[idx, idx % cg, 0, 0] = 1
    return w


def dilate(weight: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """A dilated kernel as the equivalent undilated one (zeros between taps)."""
    dh, dw = dilation
    if (dh, dw) == (1, 1):
        return weight
    kh, kw = weight.shape[2:]
    out = weight.new_zeros((*weight.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    out[:, :, ::dh, ::dw] = weight
    return out


def pad_to(weight: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Zero-pad a kernel symmetrically to window (each extent's difference must be even: same centre)."""
    dh, dw = (t - k for t, k in zip(window, weight.shape[2:]))
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise SpecError(f"a {tuple(weight.shape[2:])} kernel cannot be centred in a {tuple(window)} window")
    return torch.nn.functional.pad(weight, (dw // 2, dw // 2, dh // 2, dh // 2))


def _aligned(branches: Sequence[Branch]) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Each branch's kernel dilated and padded to the largest window, and that window's padding. SpecError
    unless the branches share channels and window centre (padding - half window equal across branches)."""
    if not branches:
        raise SpecError("nothing to merge: no branches")
    shapes = {tuple(b.weight.shape[:2]) for b in branches}
    if len(shapes) != 1:
        raise SpecError(f"branches disagree on [out, in/groups] channels: {sorted(shapes)}")
    offsets = {b.offset for b in branches}
    if len(offsets) != 1:
        raise SpecError(f"branches are not centred alike (padding - half window differs: {sorted(offsets)})")
    window = tuple(max(b.window[d] for b in branches) for d in range(2))
    ((oh, ow),) = offsets
    padded = [pad_to(dilate(b.weight, b.dilation), window) for b in branches]
    return padded, (oh + (window[0] - 1) // 2, ow + (window[1] - 1) // 2)


def merge(branches: Sequence[Branch]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Sum of branches as one conv: (weight, bias, padding) at the largest window, dilation 1. SpecError unless
    the branches share channels and window centre (padding - half window equal across branches)."""
    padded, padding = _aligned(branches)
    weight = sum(padded[1:], padded[0])
    k = branches[0].weight.shape[0]
    bias = sum((b.bias for b in branches if b.bias is not None), branches[0].weight.new_zeros(k))
    return weight, bias, padding


# ---- training form ----------------------------------------------------------------------------------
def stack_grouped(weights: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """P kernels [K, C/g, kh, kw] as one [P*K, C/g, kh, kw] grouped conv weight: group i's outputs are every
    branch's outputs of group i (branch-major inside the group), so each stays in its group."""
    p, (k, cg, kh, kw) = len(weights), weights[0].shape
    w = torch.stack(list(weights)).reshape(p, groups, k // groups, cg, kh, kw)
    return w.transpose(0, 1).reshape(p * k, cg, kh, kw)


def split_grouped(t: torch.Tensor, p: int, groups: int) -> torch.Tensor:
    """Per-channel values [P*K] of a stack_grouped conv as [P, K] (branch, channel)."""
    return t.reshape(groups, p, -1).transpose(0, 1).reshape(p, -1)


@dataclass(frozen=True)
class Norm:
    """A BatchNorm after a branch: its affine (None: 1 / 0), eps, and running (mean, var) when it normalises with
    them (eval), None when with the batch's statistics (train)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    running: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class TrainResult:
    """y, and per norm (conv branches, then the identity) the batch (mean, biased var) it normalised with (fp32;
    a conv bias included in the mean) or None where it used running statistics; count: values per channel;
    form: 'combine', 'merged' or 'eval' (one merged conv); convs: tunerd conv launches."""

    y: torch.Tensor
    stats: list[tuple[torch.Tensor, torch.Tensor] | None]
    count: int
    form: str
    convs: int


def train_forward(
    x: torch.Tensor,
    branches: Sequence[Branch],
    norms: Sequence[Norm],
    identity: Norm | None,
    stride: tuple[int, int],
    groups: int,
    activation: str | None = None,
    form: str = "combine",
) -> TrainResult:
    """act(sum_b BN_b(conv_b(x)) + BN_id(x)) with each BN in its own mode (Norm.running), differentiable.

    branches: the conv branches as they are (unfolded weights, conv bias, dilation, padding; same centre). With
    every norm on running statistics it is one conv (the eval merge); otherwise the stats pass and then form."""
    if form not in FORMS:
        raise SpecError(f"form must be one of {FORMS}, got {form!r}")
    if len(norms) != len(branches):
        raise SpecError(f"{len(branches)} branches but {len(norms)} norms")
    padded, padding = _aligned(branches)
    k = branches[0].weight.shape[0]
    if identity is not None and (x.shape[1] != k or tuple(stride) != (1, 1)):
        raise SpecError(f"an identity branch needs in = out channels and stride 1, got {x.shape[1]} -> {k}, {stride}")
    p = len(branches)
    all_norms = [*norms, *([identity] if identity is not None else [])]
    batch = [n.running is None for n in all_norms]
    z = None
    stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(batch)
    count, convs = 0, 0
    if any(batch[:p]):  # the stats pass: every conv branch in one launch
        stacked = stack_grouped(padded, groups)
        grad = torch.is_grad_enabled() and (x.requires_grad or stacked.requires_grad)
        if form == "merged" and not grad:  # only the statistics: the stacked output is never written
            mean, var = conv_stats(x, stacked, 2, stride, padding, 1, groups)
        else:  # combine reads z; gradients through the statistics need z (d var / d z = 2 (z - mean) / count)
            z, mean, var = autograd.conv(x, stacked, None, stride, padding, 1, groups, ndim=2, stats=True)
        mean, var = split_grouped(mean, p, groups), split_grouped(var, p, groups)
        out = [(x.shape[2 + d] + 2 * padding[d] - stacked.shape[2 + d]) // stride[d] + 1 for d in range(2)]
        count, convs = x.shape[0] * out[0] * out[1], 1
        stats[:p] = [(mean[i], var[i]) if batch[i] else None for i in range(p)]
    if identity is not None and batch[p]:
        var_x, mean_x = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        stats[p] = (mean_x, var_x)
        count = x.numel() // x.shape[1]
    # every BN at once as s * v + t on its branch's bias-free conv output v, in fp32 (rows: branches, identity)
    biases = [br.bias for br in branches] + [None] * (len(all_norms) - p)
    means, variances = [], []
    for st, nm, bias in zip(stats, all_norms, biases):
        used = st if st is not None else nm.running
        assert used is not None
        mean = used[0].float()
        means.append(mean if st is not None or bias is None else mean - bias.float())  # eval BN of z + bias
        variances.append(used[1].float())
    ones = torch.ones_like(means[0])
    gamma = torch.stack([nm.weight.float() if nm.weight is not None else ones for nm in all_norms])
    beta = torch.stack([nm.bias.float() if nm.bias is not None else ones * 0 for nm in all_norms])
    epsilons = {nm.eps for nm in all_norms}
    eps = epsilons.pop() if len(epsilons) == 1 else torch.tensor([[nm.eps] for nm in all_norms], device=x.device)
    scale = torch.rsqrt(torch.stack(variances) + eps) * gamma
    shift = (beta - torch.stack(means) * scale).sum(0)
    for i, bias in enumerate(biases):
        st = stats[i]
        if bias is not None and st is not None:  # the bias cancels (times zero: a zero gradient, as torch's)
            shift, stats[i] = shift + bias.float() * 0, (st[0] + bias.float(), st[1])
    if z is not None and form == "combine":  # torch: one multiply-add per branch into an fp32 sum, in place
        cg = (groups, k // groups)
        zs = z.unflatten(1, (groups, p, k // groups)).unbind(2)  # each branch's [N, g, K/g, H, W] view of z

        def per_channel(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(1, *cg, 1, 1)

        pre = torch.addcmul(per_channel(shift), zs[0], per_channel(scale[0]))
        for i in range(1, p):
            pre = pre.addcmul_(zs[i], per_channel(scale[i]))
        if identity is not None:
            pre = pre.addcmul_(x.unflatten(1, cg), per_channel(scale[p]))
        y = activation_torch(activation, pre.flatten(1, 2)).to(x.dtype)
        return TrainResult(y, stats, count, "combine", convs)
    w = (torch.stack(padded).float() * scale[:p, :, None, None, None]).sum(0)
    if identity is not None:
        eye = pad_to(identity_weight(k, groups, w), w.shape[2:])
        w = w + eye * scale[p].reshape(-1, 1, 1, 1)
    y = cast(
        torch.Tensor,
        autograd.conv(
            x,
            w.to(x.dtype),
            None,
            stride,
            padding,
            1,
            groups,
            ndim=2,
            activation=activation,
            scale=torch.ones_like(shift),
            shift=shift,
        ),
    )
    return TrainResult(y, stats, count, "merged" if any(batch) else "eval", convs + 1)


# ---- modelled cost of the training forms -------------------------------------------------------------
@dataclass(frozen=True)
class FormCost:
    """Modelled HBM bytes, GEMM FLOPs, launches and time (per kernel max(bytes / bw, flops / peak) + launch)."""

    form: str
    launches: int
    bytes: int
    flops: float
    seconds: float


def train_costs(
    n: int,
    c: int,
    k: int,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    taps: Sequence[int],
    window_taps: int,
    groups: int,
    identity: bool,
    itemsize: int,
    backward: bool = True,
    rates: Rates | None = None,
) -> dict[str, FormCost]:
    """The kernels one step of a block launches, as they run: conv branches of taps[b] taps (window_taps once
    stacked), an optional identity BN, an activation. 'eager': torch (per branch a conv and a BatchNorm: stats,
    normalise; adds; act), 'combine' and 'merged': train_forward (torch's elementwise ops one kernel each, fp32
    sums; the per-channel [K] and weight-sized ops as launches only). backward: the backward pass too (a conv's
    dgrad and wgrad each read its output gradient and, under a stats or activation chain, its saved output)."""
    a, f = itemsize, 4  # bytes of an activation element, of an fp32 one
    x = n * c * in_size[0] * in_size[1]  # elements of the input, of one branch's output
    z = n * k * out_size[0] * out_size[1]
    p, ident, cg = len(taps), int(identity), c // groups
    half = int(itemsize < 4)
    w = k * cg * a

    def kern(nbytes: float, taps_: int = 0, outs: int = 1) -> tuple[float, float]:  # (bytes, GEMM FLOPs)
        return float(nbytes), 2.0 * z * outs * cg * taps_

    tiny = [kern(0)] * 10  # the BN affines from the statistics: [P + I, K]-sized launches
    prologue = [kern(w * window_taps)] * (p + 4 + 5 * ident)  # the merged weight: pad, stack, scale, sum, eye, cast
    stack = [kern((x + p * z) * a + p * w * window_taps, window_taps, p)]
    ident_stats = [kern(x * a + x * (a + f) * half)] * ident  # var_mean of x (16-bit: a cast to fp32 first)
    stats = stack + ident_stats
    # merged without backward: the stats pass is stats_only (no stacked output written); with backward it keeps
    # z, which the statistics' gradient reads
    stack_stats_only = [kern(x * a + p * w * window_taps, window_taps, p)]
    merged_stats = stats if backward else stack_stats_only + ident_stats
    ks: dict[str, list[tuple[float, float]]] = {}
    ks["eager"] = [kern((x + z) * a + w * t, t) for t in taps]
    ks["eager"] += [kern(z * a), kern(3 * z * a)] * p + [kern(x * a), kern(3 * x * a)] * ident  # BN stats, apply
    ks["eager"] += [kern(3 * z * a)] * (p + ident - 1) + [kern(2 * z * a)]  # adds, act
    ks["combine"] = stats + tiny + [kern(z * (a + f))] + [kern(z * (a + 2 * f))] * (p + ident - 1)  # addcmuls
    ks["combine"] += [kern(2 * z * f)] + [kern(z * (f + a))] * half  # act, cast
    ks["merged"] = merged_stats + tiny + prologue + [kern((x + z) * a + w * window_taps, window_taps)]
    if backward:
        stack_bwd = [kern((2 * p * z + x) * a, window_taps, p)] * 2  # dgrad, wgrad: dy and z, x
        ident_bwd = [kern(x * (a + f) + x * (a + f) * half)] * ident  # var_mean's, its cast's
        ks["eager"] += [kern(3 * z * a)] + [kern(2 * z * a), kern(3 * z * a)] * p
        ks["eager"] += [kern(2 * x * a), kern(3 * x * a)] * ident + [kern(3 * x * a)] * (p + ident - 1)
        ks["eager"] += [kern((2 * z + x) * a, t) for t in taps for _ in range(2)]
        # combine: cast, act, per multiply-add d(branch) and d(scale) (a product, a reduction), the stacked dz
        ks["combine"] += [kern(z * (a + f))] * half + [kern(3 * z * f)] + [kern(2 * p * z * a)]
        ks["combine"] += [kern(z * (f + a)), kern(z * (2 * f + a)), kern(z * f)] * (p + ident)
        ks["combine"] += tiny + ident_bwd + stack_bwd + [kern(3 * x * a)] * 2 * ident
        # merged: the merged conv's dgrad and wgrad, the stack's on a zero-filled dy (written first), dx sums
        ks["merged"] += [kern((3 * z + x) * a, window_taps)] * 2 + tiny + prologue + [kern(p * z * a)]
        ks["merged"] += stack_bwd + ident_bwd + [kern(3 * x * a)] * (1 + ident)
    rates = rates or Rates()
    peak = rates.fp32_mma_flops if itemsize == 4 else rates.mma_flops
    out = {}
    for form, kernels in ks.items():
        secs = sum(max(b / rates.dram_bw, fl / peak) + rates.launch_s for b, fl in kernels)
        out[form] = FormCost(form, len(kernels), int(sum(b for b, _ in kernels)), sum(fl for _, fl in kernels), secs)
    return out


def choose_form(costs: dict[str, FormCost]) -> str:
    """The training form (FORMS) with the least modelled time; ties go to fewer bytes."""
    return min(FORMS, key=lambda f: (costs[f].seconds, costs[f].bytes))
