"""Structural re-parameterization in training: RepVGG / MobileOne training forms as fused launches.

kernels.reparam.train_forward (the stats conv over every branch, then a combine or a merged conv) and its
gradients against float64 torch (F.batch_norm in training mode) with odd channel counts, groups, stride 2
and n = 2 MobileOne branches, in fp32 / fp16 / bf16 with NaN-poisoned kernel outputs; tunerd.blocks.rep_block
on timm blocks (BatchNorm buffers, momentum None, frozen BNs, SE + GELU); tunerd.patch on a timm RepVGG
stage trained three SGD steps against the unpatched one, then in eval; the cost model's choice.
"""

from __future__ import annotations

import copy

import models_zoo  # noqa: F401  (timm after tunerd, with torchvision's ops declared)
import pytest
import timm.models.byobnet as byob
import torch
import torch.nn.functional as F
from torch import nn

from tunerd import blocks
from tunerd.blocks import RepParts, last_form, rep_block
from tunerd.kernels import conv as kconv
from tunerd.kernels import reparam
from tunerd.kernels.reference import rel_error, tolerance
from tunerd.kernels.spec import SpecError
from tunerd.patching import patch, unpatch

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MATCH = 1e-4  # patched vs unpatched fp32 (the bound)
GRAD_FACTOR = 4.0  # a gradient's error vs float64: within GRAD_FACTOR x (the dtype's tolerance, or torch's own fp32
# error: a depthwise 1 x 1 branch under batch BN is scale-invariant but for eps, its weight gradient all cancellation)

# name -> (C, K, groups, stride, kxk branches, 1x1 branch, identity, frozen: branch indices whose BN is in eval)
CASES = {
    "repvgg": (5, 5, 1, 1, 1, True, True, ()),
    "repvgg_grouped": (12, 12, 3, 1, 1, True, True, ()),
    "repvgg_s2": (5, 7, 1, 2, 1, True, False, ()),
    "mobileone_n2": (5, 5, 1, 1, 2, True, True, ()),
    "mobileone_dw_frozen": (5, 5, 5, 1, 2, True, True, (1,)),
}


def _case(name: str, dtype: torch.dtype, seed: int):
    c, k, groups, stride, n_kxk, one, ident, frozen = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 6, 5, generator=g)
    ws = [torch.randn(k, c // groups, 3, 3, generator=g) * 0.5 for _ in range(n_kxk)]
    ws += [torch.randn(k, c // groups, 1, 1, generator=g)] if one else []
    n_bn = len(ws) + ident
    gammas = [torch.rand(k, generator=g) + 0.5 for _ in range(n_bn)]
    betas = [torch.randn(k, generator=g) * 0.3 for _ in range(n_bn)]
    running = {i: (torch.randn(k, generator=g) * 0.2, torch.rand(k, generator=g) + 0.5) for i in frozen}
    leaves = [x, *ws, *gammas, *betas]
    return [t.to(dtype) for t in leaves], running, (len(ws), ident, stride, groups)


def _reference(leaves, running, shape):
    """float64 torch: sum of conv -> F.batch_norm (training unless frozen) branches + BN(x), relu."""
    p, ident, stride, groups = shape
    n_bn = p + ident
    x, ws, gammas, betas = leaves[0], leaves[1 : 1 + p], leaves[1 + p : 1 + p + n_bn], leaves[1 + p + n_bn :]
    out = 0
    for i in range(n_bn):
        v = F.conv2d(x, ws[i], None, stride, ws[i].shape[-1] // 2, 1, groups) if i < p else x
        rm, rv = (t.to(x.dtype) for t in running[i]) if i in running else (None, None)
        out = out + F.batch_norm(v, rm, rv, gammas[i], betas[i], i not in running, 0.0, 1e-5)
    return torch.relu(out)


def _ours(leaves, running, shape, form):
    p, ident, stride, groups = shape
    n_bn = p + ident
    x, ws, gammas, betas = leaves[0], leaves[1 : 1 + p], leaves[1 + p : 1 + p + n_bn], leaves[1 + p + n_bn :]
    branches = [reparam.Branch(w, None, (1, 1), (w.shape[-1] // 2,) * 2) for w in ws]
    norms = [reparam.Norm(gammas[i], betas[i], 1e-5, running.get(i)) for i in range(n_bn)]
    return reparam.train_forward(
        x, branches, norms[:p], norms[p] if ident else None, (stride, stride), groups, "relu", form
    )


@pytest.mark.parametrize("form", reparam.FORMS)
@pytest.mark.parametrize(
    "name,dtype",
    [(n, "float32") for n in CASES] + [("repvgg", "float16"), ("repvgg", "bfloat16"), ("mobileone_n2", "float16")],
)
def test_train_forward_and_gradients_match_float64(monkeypatch, name, dtype, form):
    monkeypatch.setattr(kconv, "POISON_OUTPUTS", True)
    leaves, running, shape = _case(name, DT[dtype], seed=len(name))
    ours = [t.detach().requires_grad_() for t in leaves]
    res = _ours(ours, running, shape, form)
    assert res.form == form and res.convs == (1 if form == "combine" else 2) and res.y.dtype == DT[dtype]
    p, ident = shape[0], shape[1]
    assert [s is None for s in res.stats] == [i in running for i in range(p + ident)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _reference(ref_leaves, running, shape)
    tol = tolerance(dtype)
    assert rel_error(res.y, ref) < tol, rel_error(res.y, ref)
    # the batch statistics each BN used: mean and biased variance of its conv output (of x: identity)
    x64 = ref_leaves[0].detach()
    for i, st in enumerate(res.stats):
        if st is not None:
            w = ref_leaves[1 + i].detach() if i < p else None
            v = F.conv2d(x64, w, None, shape[2], w.shape[-1] // 2, 1, shape[3]) if w is not None else x64
            var, mean = torch.var_mean(v, dim=(0, 2, 3), unbiased=False)
            assert rel_error(st[0], mean) < tol and rel_error(st[1], var) < tol
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(res.y, ours, dy.to(res.y.dtype))
    want = torch.autograd.grad(ref, ref_leaves, dy)
    torch32 = [t.detach().float().requires_grad_() for t in leaves]
    own = torch.autograd.grad(_reference(torch32, running, shape), torch32, dy.float())
    for i, (a, b, c) in enumerate(zip(got, want, own)):
        assert a.shape == b.shape and a.dtype == DT[dtype]
        assert rel_error(a, b) < GRAD_FACTOR * max(tol, rel_error(c, b)), (i, rel_error(a, b), rel_error(c, b))


def test_eval_is_one_merged_conv_and_forms_are_checked():
    leaves, _, shape = _case("mobileone_n2", torch.float32, seed=3)
    running = {i: (torch.randn(5) * 0.2, torch.rand(5) + 0.5) for i in range(4)}
    res = _ours(leaves, running, shape, "combine")
    assert res.form == "eval" and res.convs == 1 and res.stats == [None] * 4
    ref = _reference([t.double() for t in leaves], running, shape)
    assert rel_error(res.y, ref) < tolerance("float32")
    with pytest.raises(SpecError, match="form"):
        _ours(leaves, running, shape, "fused")
    w = [torch.randn(5, 5, 3, 3), torch.randn(5, 5, 1, 1)]
    with pytest.raises(SpecError, match="identity"):  # an identity needs stride 1
        reparam.train_forward(
            leaves[0], [reparam.Branch(t, None, (1, 1), (t.shape[-1] // 2,) * 2) for t in w],
            [reparam.Norm(None, None, 1e-5)] * 2, reparam.Norm(None, None, 1e-5), (2, 2), 1,
        )  # fmt: skip


def test_merged_form_without_gradients_writes_only_statistics(monkeypatch):
    """No gradients (a precise-BN pass in train mode): the merged form's stats conv is stats_only (no stacked
    output written, no out_ptr); with gradients it keeps z, which the statistics' gradient reads."""
    monkeypatch.setattr(kconv, "POISON_OUTPUTS", True)
    seen = []
    real = kconv.runtime.launch
    monkeypatch.setattr(kconv.runtime, "launch", lambda v, a, d: (seen.append((v, a)), real(v, a, d)))
    leaves, running, shape = _case("repvgg_grouped", torch.float32, seed=5)
    with torch.no_grad():
        res = _ours(leaves, running, shape, "merged")
    ref = _reference([t.double() for t in leaves], running, shape)
    assert res.form == "merged" and rel_error(res.y, ref) < tolerance("float32")
    (stats_v, stats_args), (merged_v, _) = seen
    assert stats_v.spec.epilogue.stats_only and "out_ptr" not in stats_args
    assert not merged_v.spec.epilogue.stats
    x64, p = leaves[0].double(), shape[0]
    for i in range(p):
        w = leaves[1 + i].double()
        var, mean = torch.var_mean(F.conv2d(x64, w, None, 1, w.shape[-1] // 2, 1, 3), dim=(0, 2, 3), unbiased=False)
        assert rel_error(res.stats[i][0], mean) < tolerance("float32") and rel_error(res.stats[i][1], var) < 1e-5
    seen.clear()
    _ours([t.detach().requires_grad_() for t in leaves], running, shape, "merged")
    assert not seen[0][0].spec.epilogue.stats_only and "out_ptr" in seen[0][1]


def test_stack_grouped_keeps_each_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 5, 5, generator=g, dtype=torch.float64)
    ws = [torch.randn(9, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    z = F.conv2d(x, reparam.stack_grouped(ws, 3), padding=1, groups=3)
    mean = reparam.split_grouped(z.mean((0, 2, 3)), 2, 3)
    for b, w in enumerate(ws):
        zb = F.conv2d(x, w, padding=1, groups=3)
        assert torch.allclose(mean[b], zb.mean((0, 2, 3)), rtol=0, atol=1e-12)


# ---- timm blocks -------------------------------------------------------------------------------------
def _randomize(m: nn.Module, g: torch.Generator) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


def test_rep_block_updates_buffers_like_torch():
    """A timm MobileOneBlock (n = 2, one BN with cumulative averages, one frozen in eval) two steps in train
    mode, then eval: output, gradients and every buffer as the unpatched block's."""
    g = torch.Generator().manual_seed(4)
    ref = byob.MobileOneBlock(5, 5, 3, num_conv_branches=2)
    _randomize(ref, g)
    ref.conv_kxk[0].bn.momentum = None
    ref.conv_scale.bn.eval()
    ours = copy.deepcopy(ref)
    assert rep_block(ours, form="merged").convs == ("conv_kxk.0", "conv_kxk.1", "conv_scale")
    assert list(ours.state_dict()) == list(ref.state_dict())
    for _ in range(2):
        x = torch.randn(2, 5, 5, 6, generator=g)
        y_ref, y = ref(x), ours(x)
        assert last_form(ours) == "merged" and rel_error(y, y_ref) < MATCH
        dy = torch.randn(y.shape, generator=g)
        got = torch.autograd.grad(y, list(ours.parameters()), dy)
        for a, b in zip(got, torch.autograd.grad(y_ref, list(ref.parameters()), dy)):
            assert rel_error(a, b) < MATCH
    for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
        assert rel_error(a, b) < 1e-6, name
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert rel_error(ours(x), ref(x)) < MATCH and last_form(ours) == "eval"


def test_rep_block_refuses_what_it_cannot_fuse():
    dropped = byob.RepVggBlock(5, 5, 3, drop_path_rate=0.1)
    with pytest.raises(SpecError, match="drop path"):
        rep_block(dropped)
    assert type(dropped) is byob.RepVggBlock
    nonlinear = byob.RepVggBlock(5, 5, 3)
    nonlinear.conv_1x1.bn.act = nn.ReLU()
    with pytest.raises(SpecError, match="not linear"):
        rep_block(nonlinear)
    with pytest.raises(SpecError, match="form"):
        rep_block(byob.RepVggBlock(5, 5, 3), form="fast")


def _stack() -> nn.Module:
    return nn.Sequential(
        byob.RepVggBlock(3, 6, 3, stride=2),
        byob.RepVggBlock(6, 6, 3),
        byob.RepVggBlock(6, 6, 3, group_size=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def test_patch_names_the_blocks_and_the_ones_it_leaves():
    model = nn.Sequential(byob.RepVggBlock(5, 5, 3), byob.RepVggBlock(5, 5, 3, drop_path_rate=0.2))
    report = patch(model)
    text = str(report)
    assert "block   0: RepVggBlock re-parameterized" in text and "2 conv branch(es) + identity" in text
    assert any(n == "1" and "drop path" in why for n, why in report.left)
    assert type(model[1]) is byob.RepVggBlock and type(model[1].conv_kxk.conv).__module__ == "tunerd.nn"
    assert type(model[0].conv_kxk.conv) is nn.Conv2d  # computed in the block's own launches
    assert ("0.conv_1x1.conv", "computed in the re-parameterized block 0's launches") in report.swapped


@pytest.mark.parametrize("form", reparam.FORMS)
def test_patched_repvgg_stack_trains_like_unpatched(form):
    """Three SGD steps (momentum, weight decay) of a timm RepVGG stage (stride 2, identity, grouped), patched vs
    unpatched, in each fused training form: loss, every parameter and buffer within 1e-4 (fp32); then eval mode
    runs one merged conv per block."""
    torch.manual_seed(0)
    ref = _stack()
    ours = copy.deepcopy(ref)
    report = patch(ours, example_input=torch.randn(2, 3, 8, 7), rep_form=form)
    assert len(report.blocks) == 3 and all(type(ours[i]).__name__.startswith("RepTrain") for i in range(3))
    assert any(n == "0" and "stats conv" in w for n, w in report.kernels)
    assert list(ours.state_dict()) == list(ref.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in (ref, ours)]
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, t = torch.randn(2, 3, 8, 7, generator=g), torch.randint(0, 4, (2,), generator=g)
        losses = []
        for m, opt in zip((ref, ours), opts):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < MATCH * max(1.0, abs(losses[0]))
    assert all(last_form(ours[i]) == form for i in range(3))
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert rel_error(a, b) < MATCH, name
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert rel_error(ours(x), ref(x)) < MATCH
    assert all(last_form(ours[i]) == "eval" for i in range(3))
    assert unpatch(ours) == 3 and type(ours[0]) is byob.RepVggBlock


def test_cost_model_of_the_forms_on_repvgg_a0():
    """RepVGG-A0 (batch 32, fp16): stacking pads the 1 x 1 into the 3 x 3 window (1.8x eager's GEMM FLOPs, the
    merged conv 2.7x); the merged form moves the fewest bytes; the choice is the least modelled time."""
    s3 = reparam.train_costs(32, 192, 192, (14, 14), (14, 14), (9, 1), 9, 1, True, 2, backward=True)
    eager, comb, merged = s3["eager"], s3["combine"], s3["merged"]
    assert comb.flops == pytest.approx(eager.flops * 18 / 10) and merged.flops == pytest.approx(eager.flops * 27 / 10)
    assert merged.bytes < eager.bytes < comb.bytes
    fwd = reparam.train_costs(32, 192, 192, (14, 14), (14, 14), (9, 1), 9, 1, True, 2, backward=False)
    assert fwd["merged"].launches < merged.launches and fwd["merged"].bytes < merged.bytes
    # forward only, the merged form's stats pass is stats_only: of the stacked branches' 2 outputs nothing is
    # written, so it moves fewer bytes than combine's stats pass by those outputs
    x = z = 32 * 192 * 14 * 14  # elements (fp16: 2 bytes; the identity's var_mean casts x to fp32 first)
    w = 192 * 192 * 2  # bytes of one tap's weights
    stats_only, ident = 2 * x + 2 * w * 9, 2 * x + 6 * x
    prologue = w * 9 * (2 + 4 + 5)
    assert fwd["merged"].bytes == stats_only + ident + prologue + 2 * (x + z) + w * 9
    stem = reparam.train_costs(32, 3, 48, (224, 224), (112, 112), (9, 1), 9, 1, False, 2, backward=True)
    assert stem["merged"].seconds < stem["eager"].seconds < stem["combine"].seconds
    for costs in (s3, fwd, stem):
        assert reparam.choose_form(costs) == min(reparam.FORMS, key=lambda f: costs[f].seconds)


def test_by_modelled_cost_a_block_runs_a_fused_form_or_its_own_forward():
    """Unforced, a block in training runs what models fastest for its input: its own per-branch forward on a
    tiny input (launches dominate; the fused forms launch more kernels), and the same numbers either way."""
    g = torch.Generator().manual_seed(6)
    ref = byob.RepVggBlock(6, 6, 3)
    _randomize(ref, g)
    ours = copy.deepcopy(ref)
    rep_block(ours)
    x = torch.randn(2, 6, 5, 5, generator=g)
    assert rel_error(ours(x), ref(x)) < MATCH and last_form(ours) == "eager"
    for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
        assert rel_error(a, b) < 1e-6, name
    stem = (32, 3, 48, (224, 224), (112, 112), (9, 1), 9, 1, False, 2, True)  # RepVGG-A0's stem, fp16 training
    assert blocks._auto_form(*stem) == "merged"


def test_rep_block_large_kernel_with_se_and_gelu():
    """fastvit's ReparamLargeKernelConv (depthwise 5 x 5 + 3 x 3, each with BN), SE and GELU after the sum: the
    attention runs between the fused launches and the activation, gradients and buffers as torch's."""
    import timm.models.fastvit as fv

    g = torch.Generator().manual_seed(6)
    ref = fv.ReparamLargeKernelConv(5, 5, 5, 1, 1, small_kernel=3, use_se=True, act_layer=nn.GELU)
    _randomize(ref, g)
    ours = copy.deepcopy(ref)
    assert rep_block(ours) == RepParts(("large_conv", "small_conv"), None, "se")
    x = torch.randn(2, 5, 7, 6, generator=g)
    y_ref, y = ref(x), ours(x)
    assert rel_error(y, y_ref) < MATCH
    dy = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, list(ours.parameters()), dy)
    for a, b in zip(got, torch.autograd.grad(y_ref, list(ref.parameters()), dy)):
        assert rel_error(a, b) < MATCH
    for a, b in zip(ours.buffers(), ref.buffers()):
        assert rel_error(a, b) < 1e-6
