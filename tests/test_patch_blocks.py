"""Whole-block patching and training through fused plans.

kernels.block_autograd: the fused forward (NaN-poisoned outputs) and the recomputing backward against float64
torch, and the bytes a fused block saves for backward. tunerd.blocks / tunerd.patch: timm and torchvision
blocks proven from their traced graphs, swapped whole, falling back per mode with the reason named; three SGD
steps of patched timm ConvNeXt and InceptionNeXt models match the unpatched ones (train and eval mode, buffers
included) with every gradient checked against float64; the patch report (tuned or default, plans, left layers).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import partial

import models_zoo  # noqa: F401  (timm and torchvision after tunerd, with torchvision's ops declared)
import pytest
import torch
from blockcheck import check_gradients
from timm.layers import LayerNorm, LayerNorm2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, SqueezeExcite
from timm.models._efficientnet_builder import EfficientNetBuilder, decode_arch_def, round_channels
from timm.models.convnext import ConvNeXtBlock, ConvNeXtStage
from timm.models.inception_next import InceptionDWConv2d, MetaNeXt
from torch import nn
from torchvision.models.convnext import CNBlock

from tunerd.blocks import BlockTracer, NotABlock, from_graph, last_plan
from tunerd.kernels import block as B
from tunerd.kernels import block_autograd, fused
from tunerd.kernels import schedule as S
from tunerd.kernels.conv import set_schedule_lookup
from tunerd.kernels.plan import FUSED, rank
from tunerd.kernels.reference import rel_error
from tunerd.patching import patch, unpatch

MATCH = 1e-4  # patched vs unpatched fp32 (the bound)
FACTOR, FLOOR = 4.0, 1e-5  # a gradient's error vs float64: within FACTOR x torch's own fp32 error, or FLOOR


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- block autograd ----------------------------------------------------------------------------------
BLOCKS = {
    "convnext": lambda: B.convnext(n=2, c=20, in_size=(5, 7)),
    "inception": lambda: B.inception_dw(n=2, c=21, in_size=(6, 5), band_kernel=5),
    "separable_res": lambda: B.separable(n=2, c=12, k=12, in_size=(5, 6), act="relu6", pw_act=None, residual=True),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_fused_block_gradients_match_float64(name, device):
    blk = BLOCKS[name]()
    plan = rank(blk)[0].plan
    assert any(s.kind in FUSED for s in plan.steps), plan.describe()
    check_gradients(blk, plan, seed=7, device=device)


def test_fused_block_saves_only_its_input_and_parameters():
    blk = B.convnext(n=1, c=16, in_size=(6, 6))
    params = {k: v.requires_grad_() for k, v in fused.random_params(blk).items()}
    x = torch.randn(1, 16, 6, 6, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = block_autograd.block(blk, params, x)
    assert {id(t) for t in saved} == {id(t) for t in [x, *params.values()]}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y.sum().backward()  # the recompute's own saved tensors live only inside backward
    assert x.grad is not None and all(p.grad is not None for p in params.values())


# ---- proving blocks from traced graphs ----------------------------------------------------------------
def _graph(m: nn.Module, training: bool):
    m.train(training)
    return from_graph(m, BlockTracer().trace(m), training)


def test_traced_blocks_are_the_seed_blocks():
    seeds = {
        "timm": (ConvNeXtBlock(16, ls_init_value=0.5), B.convnext(n=1, c=16, in_size=(8, 8))),
        "timm_conv_mlp": (ConvNeXtBlock(16, conv_mlp=True), B.convnext(n=1, c=16, in_size=(8, 8))),
        "torchvision": (CNBlock(16, 1e-6, 0.0), B.convnext(n=1, c=16, in_size=(8, 8))),
        "inception": (InceptionDWConv2d(24), B.inception_dw(n=1, c=24, in_size=(8, 8))),
    }
    for what, (module, seed) in seeds.items():  # the seed's own nodes (names too: the store's block key)
        for training in (True, False):
            g = _graph(module, training)
            assert (g.c, g.nodes) == (seed.c, seed.nodes), what
            assert {k for k, _ in g.sources} == set(seed.param_shapes()), what
    g = _graph(DepthwiseSeparableConv(8, 8, pw_act=True), False)
    assert g.nodes == B.separable(n=1, c=8, k=8, in_size=(8, 8), residual=True).nodes
    # not a seed (tanh GELU): the traced names stay, the block still computes the module
    g = _graph(ConvNeXtBlock(16, act_layer="gelu_tanh"), False)
    assert [nd.op for nd in g.nodes] == ["conv", "ln", "conv", "act", "conv", "scale", "add"]
    assert g.nodes[3]["fn"] == "gelu_tanh" and g.nodes != B.convnext(n=1, c=16, in_size=(8, 8)).nodes


@pytest.mark.parametrize(
    "module, training, reason",
    [
        (lambda: ConvNeXtBlock(16, drop_path=0.1), True, "DropPath drop_path (p=0.1) is active in training"),
        (lambda: CNBlock(16, 1e-6, 0.2), True, "StochasticDepth stochastic_depth (p=0.2) is active in training"),
        (lambda: DepthwiseSeparableConv(8, 8), True, "batch statistics in training mode"),
        (lambda: ConvNeXtBlock(16, use_grn=True), False, "has no block node"),
    ],
)
def test_unprovable_blocks_name_the_reason(module, training, reason):
    with pytest.raises(NotABlock, match=re.escape(reason)):
        _graph(module(), training)


def test_drop_path_falls_back_in_train_and_fuses_in_eval():
    torch.manual_seed(0)
    base = ConvNeXtBlock(16, drop_path=0.5, ls_init_value=0.5)
    ours = copy.deepcopy(base)
    report = patch(ours)
    assert [n for n, _ in report.blocks] == [""] and "eval mode" in report.blocks[0][1]
    assert any("train mode runs per-conv kernels" in why and "DropPath" in why for _, why in report.left)
    x = torch.randn(2, 16, 5, 5)
    for training in (True, False):
        base.train(training), ours.train(training)
        ours.__dict__.pop("_tunerd_last", None)
        torch.manual_seed(1)
        want = base(x)
        torch.manual_seed(1)
        got = ours(x)
        assert rel_error(got, want.double()) < 1e-5
        assert (last_plan(ours) is None) == training
    assert unpatch(ours) == 2 and type(ours) is ConvNeXtBlock


# ---- three SGD steps of patched models ----------------------------------------------------------------
@dataclass
class Run:
    ys: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


def _train(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, training: bool, steps: int = 3) -> Run:
    model.train(training)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    run = Run([], [], {}, {})
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        y = model(x)
        (y * dy).sum().backward()
        run.ys.append(y.detach().clone())
        run.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    run.params = {n: p.detach().clone() for n, p in model.named_parameters()}
    run.buffers = {n: b.clone() for n, b in model.named_buffers()}
    return run


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Layer scales and BatchNorm statistics away from their init, so every block term and gradient matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "layer_scale")):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


MODELS = {
    # a convnext_atto-style stage, narrow: LayerNorm2d + 2x2 s2 downsample, then two ConvNeXt blocks
    "timm_convnext_stage": (
        lambda: ConvNeXtStage(
            16,
            24,
            stride=2,
            depth=2,
            norm_layer=partial(LayerNorm2d, eps=1e-6),  # as timm's ConvNeXt builds its stages
            norm_layer_cl=partial(LayerNorm, eps=1e-6),
        ),
        (2, 16, 10, 10),
        (2, 24, 5, 5),
    ),
    "timm_inceptionnext": (lambda: MetaNeXt(depths=(1, 1), dims=(24, 32), num_classes=10), (2, 3, 16, 16), (2, 10)),
    # EfficientNet-B0's first two stages as timm's builder makes them (narrow stem): DS conv + SE + residual,
    # then a stride-2 and a residual MBConv with SE; train-mode BatchNorm: per-conv kernels, eval: fused
    "timm_efficientnet_stage": (
        lambda: nn.Sequential(
            *EfficientNetBuilder(
                round_chs_fn=round_channels, act_layer=nn.SiLU, norm_layer=nn.BatchNorm2d, se_layer=SqueezeExcite
            )(16, decode_arch_def([["ds_r1_k3_s1_e1_c16_se0.25"], ["ir_r2_k3_s2_e6_c24_se0.25"]]))
        ),
        (2, 16, 10, 10),
        (2, 24, 5, 5),
    ),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_three_sgd_steps_match_unpatched(name, training):
    check_three_sgd_steps(*MODELS[name], training)


def check_three_sgd_steps(make, x_shape: tuple[int, ...], y_shape: tuple[int, ...], training: bool) -> None:
    """Three SGD steps of patch(make()) against the unpatched model in fp32 and float64 (also for other modules)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    base = make()
    _randomize(base, gen)
    ref, plain, ours = copy.deepcopy(base).double(), copy.deepcopy(base), copy.deepcopy(base)
    x = torch.randn(x_shape, generator=gen)
    dy = torch.randn(y_shape, generator=gen, dtype=torch.float64)
    report = patch(ours)
    assert report.blocks, str(report)
    # the blocks proven in this mode run their fused plans; the others name why they fall back
    fused_blocks = [ours.get_submodule(n) for n, _ in report.blocks]
    fused_blocks = [m for m in fused_blocks if training in m.__dict__["_tunerd_graphs"]]
    fallback = {n for n, why in report.left if f"in {'train' if training else 'eval'} mode runs per-conv" in why}
    assert len(fused_blocks) + len(fallback) == len(report.blocks), str(report)

    r64, r32 = _train(ref, x.double(), dy, training), _train(plain, x, dy.float(), training)
    got = _train(ours, x, dy.float(), training)
    for n in fallback:
        assert last_plan(ours.get_submodule(n)) is None, n
    for m in fused_blocks:  # the blocks ran their fused plans, not their own forward
        blk, plan = last_plan(m)
        assert any(s.kind in FUSED for s in plan.steps), plan.describe()

    bad: list[str] = []

    def judge(what: str, ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
        """Within MATCH of unpatched torch, or (an ill-conditioned quantity, e.g. a bias behind a train-mode
        BatchNorm that only border effects move) within FACTOR x torch's own fp32 error against float64."""
        err, torch_err = rel_error(ours, exact), rel_error(theirs, exact)
        if rel_error(ours, theirs.double()) > MATCH and err > max(FACTOR * torch_err, FLOOR):
            bad.append(f"{what}: {rel_error(ours, theirs.double()):.2g} vs unpatched, {err:.2g} vs float64")

    for step in range(3):
        judge(f"step {step} output", got.ys[step], r32.ys[step], r64.ys[step])
        assert got.grads[step].keys() == r32.grads[step].keys() == r64.grads[step].keys()
        # a gradient that is zero in exact arithmetic (a conv bias straight into a train-mode BatchNorm) is
        # rounding noise in both fp32 runs: it must stay that small against the whole model's gradient
        norm = torch.cat([g.flatten() for g in r64.grads[step].values()]).norm().item()
        for n, g in got.grads[step].items():  # every gradient against float64 too
            want, theirs = r64.grads[step][n], r32.grads[step][n]
            if want.norm() < 1e-9 * norm:
                if g.double().norm() > FLOOR * norm:
                    bad.append(f"step {step} grad {n} should vanish: {g.norm():.2g} of {norm:.2g}")
                continue
            judge(f"step {step} grad {n}", g, theirs, want)
            if rel_error(g, want) > max(FACTOR * rel_error(theirs, want), FLOOR):
                bad.append(f"step {step} grad {n} vs float64: {rel_error(g, want):.2g}")
    pnorm = torch.cat([p.flatten() for p in r64.params.values()]).norm().item()
    for n, p in got.params.items():
        if r64.params[n].norm() < 1e-9 * pnorm:  # zero in exact arithmetic (zero init, vanishing gradient)
            if p.double().norm() > FLOOR * pnorm:
                bad.append(f"parameter {n} should stay ~0: {p.norm():.2g} of {pnorm:.2g}")
            continue
        judge(f"parameter {n} after 3 steps", p, r32.params[n], r64.params[n])
    assert got.buffers.keys() == r32.buffers.keys()
    for n, b in got.buffers.items():
        if b.is_floating_point():
            judge(f"buffer {n}", b, r32.buffers[n], r64.buffers[n])
        else:
            assert torch.equal(b, r32.buffers[n]), n
    assert not bad, bad[:8]


# ---- the patch report ----------------------------------------------------------------------------------
def test_report_says_tuned_or_default_and_lists_what_it_leaves():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        ConvNeXtBlock(16, ls_init_value=0.5),
        nn.Conv2d(16, 8, 1),
        nn.ConvTranspose2d(8, 4, 2, stride=2),
    )
    x = torch.randn(1, 3, 6, 6)

    def lookup(spec, device):  # a tuned winner for pointwise convs only
        return S.default(spec) if spec.taps == 1 else None

    set_schedule_lookup(lookup)
    try:
        report = patch(model, example_input=x)
    finally:
        set_schedule_lookup(None)
    kernels = dict(report.kernels)
    assert kernels["0"] == "default schedule"
    assert kernels["2"] == "tuned winner"
    assert kernels["1"].startswith("plan convnext[") and "default tile schedules" in kernels["1"]
    assert kernels["1.conv_dw"] == "computed inside the fused block 1"
    assert ("3", "ConvTranspose2d: tunerd has no transposed-convolution kernel") in report.left
    text = str(report)
    assert "block   1: ConvNeXtBlock as a fused block plan in train and eval mode" in text
    assert "kernel  2: tuned winner" in text and "left    3: ConvTranspose2d" in text
    assert "default schedules (no tuned-kernel lookup installed)" in str(patch(nn.Sequential(nn.Conv2d(3, 4, 1))))
