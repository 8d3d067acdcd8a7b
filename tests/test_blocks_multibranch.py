"""Multi-branch blocks: the InceptionNeXt token mixer as one fused launch over channel slices (numerics against
float64 with NaN-poisoned outputs, strided channels-last views, sm_90 compile-validity, modelled bytes), and
structural re-parameterization of timm's RepVGG / MobileOne / RepLKNet-style blocks."""

import pytest
import torch
import torch.nn.functional as F
from blockcheck import inputs

from tunerd.kernels import block as B
from tunerd.kernels import block_reference, fused, reference, reparam
from tunerd.kernels import plan as P
from tunerd.kernels.epilogue import activation_torch
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import SpecError

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INCEPTION_T = ((96, 56), (192, 28), (384, 14), (768, 7))  # InceptionNeXt-T stages: dim at resolution


# ---- description and planner ---------------------------------------------------------------------
def test_inception_block_plan_and_modelled_bytes():
    blk = B.inception_dw(n=2, c=37, in_size=(7, 9), band_kernel=5)
    gc = int(37 * 0.125)
    assert blk.output.c == 37
    ps = blk.param_shapes()
    assert ps["dwconv_hw.weight"] == (gc, 1, 3, 3) and ps["dwconv_w.weight"] == (gc, 1, 1, 5)
    assert ps["dwconv_h.weight"] == (gc, 1, 5, 1) and ps["dwconv_h.bias"] == (gc,)
    best = P.best(blk)
    assert best.describe() == "inception[x_id+x_hw+dwconv_hw+x_w+dwconv_w+x_h+dwconv_h+cat]"
    assert P.unfused(blk) in P.plans(blk) and B.Block.from_json(blk.to_json()) == blk
    fs = fused.FusedSpec(blk, best.steps[0])
    assert [(b.start, b.size, b.out_start, b.conv) for b in fs.branches] == [
        (0, 37 - 3 * gc, 0, None),
        (37 - 3 * gc, gc, 37 - 3 * gc, "dwconv_hw"),
        (37 - 2 * gc, gc, 37 - 2 * gc, "dwconv_w"),
        (37 - gc, gc, 37 - gc, "dwconv_h"),
    ]
    # InceptionNeXt-T: one launch reading x once and writing the concat once, vs eager (split views, three
    # dw convs, a concat that re-reads everything): 1 vs 4 launches, 192 vs 264 bytes per pixel-channel pair
    for c, hw in INCEPTION_T:
        b = B.inception_dw(n=8, c=c, in_size=(hw, hw), dtype="bfloat16")
        f, u = P.rank(b)[0], P.cost(b, P.unfused(b))
        assert f.plan.describe().startswith("inception[") and (f.launches, u.launches) == (1, 4)
        act = 8 * c * hw * hw * 2
        params = sum(gc_ * 4 for gc_ in [int(c * 0.125)] * 3) + int(c * 0.125) * (9 + 11 + 11) * 2
        assert f.bytes == 2 * act + params
        assert u.bytes == pytest.approx(act * (1 + 1 + 3 * 0.125 * 2), abs=params)
        assert f.seconds < u.seconds


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(band_kernel=4), "odd int"), (dict(branch_ratio=0.5), "branch_ratio"), (dict(c=7), "no channels")],
)
def test_inception_constructor_errors(kwargs, message):
    args = dict(n=1, c=16, in_size=(5, 5)) | kwargs
    with pytest.raises(SpecError, match=message):
        B.inception_dw(**args)


def test_inception_step_legality():
    blk = B.inception_dw(n=1, c=16, in_size=(5, 5))
    names = [nd.name for nd in blk.nodes]
    assert not P.matches(blk, P.Step("inception", tuple(names[:-1])))  # no concat
    # a strided branch changes the size: no inception step (and the concat itself is illegal)
    nodes = (
        B.node("a", "split", ["x"], start=0, size=8),
        B.node("b", "split", ["x"], start=8, size=8),
        B.node("bc", "conv", ["b"], out=8, kernel=3, padding=1, groups=8),
        B.node("bb", "bn", ["bc"]),
        B.node("ba", "act", ["bb"], fn="gelu"),
        B.node("cat", "concat", ["ba", "a"]),
    )
    bn_act = B.Block(n=1, c=16, in_size=(5, 3), nodes=nodes)
    step = P.Step("inception", tuple(nd.name for nd in nodes))
    assert P.matches(bn_act, step) and P.best(bn_act).steps == (step,)
    dense = nodes[:2] + (B.node("bc", "conv", ["b"], out=8, kernel=3, padding=1, groups=2),) + nodes[3:]
    assert not P.matches(B.Block(n=1, c=16, in_size=(5, 3), nodes=dense), step)


# ---- numerics ------------------------------------------------------------------------------------
def _bn_act_block(dtype):
    """Branches in a permuted concat order, one with [bn] [act], a 1x1 identity-sized dw, dilation 2."""
    nodes = (
        B.node("a", "split", ["x"], start=0, size=5),
        B.node("b", "split", ["x"], start=5, size=19),
        B.node("bc", "conv", ["b"], out=19, kernel=(3, 5), padding=(2, 4), dilation=2, groups=19, bias=True),
        B.node("bb", "bn", ["bc"]),
        B.node("ba", "act", ["bb"], fn="gelu"),
        B.node("c", "split", ["x"], start=24, size=3),
        B.node("cc", "conv", ["c"], out=3, kernel=1, groups=3),
        B.node("cat", "concat", ["ba", "a", "cc"]),
    )
    return B.Block(n=2, c=27, in_size=(6, 7), nodes=nodes, dtype=dtype)


CASES = {
    "inception_odd": lambda dt: B.inception_dw(n=2, c=37, in_size=(7, 9), band_kernel=5, dtype=dt),
    "inception_wide_band": lambda dt: B.inception_dw(n=1, c=21, in_size=(5, 13), band_kernel=11, dtype=dt),
    "bn_act_dilated": _bn_act_block,
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", sorted(DT))
def test_inception_matches_float64(name, dtype):
    blk = CASES[name](dtype)
    params, x = inputs(blk, 0)
    ref = block_reference.block(blk, params, x)
    plan = P.best(blk)
    assert plan.steps[0].kind == "inception"
    scheds = [None] + ([Schedule(block_m=16, block_n=16, num_warps=4)] if dtype == "float32" else [])
    for s in scheds:  # the default, and small tiles: several pixel and channel tiles per branch
        y = fused.run_plan(blk, params, x, plan, {0: s} if s else None, poison=True)
        assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
        err = reference.rel_error(y, ref)
        assert err < reference.tolerance(dtype), (s, err)
    if dtype == "bfloat16":  # the unfused plan agrees too
        y = fused.run_plan(blk, params, x, P.unfused(blk), poison=True)
        assert reference.rel_error(y, ref) < reference.tolerance(dtype)


def test_inception_on_strided_views_writes_in_place():
    """x a channel slice of a wider channels-last tensor, out a channel slice of a wider buffer: read and
    written in place, nothing outside the slice touched."""
    blk = B.inception_dw(n=2, c=21, in_size=(5, 6), band_kernel=3, dtype="float16")
    params, x = inputs(blk, 1)
    wide = torch.randn(2, 30, 5, 6).to(torch.float16).contiguous(memory_format=torch.channels_last)
    wide[:, 4:25] = x
    xv = wide[:, 4:25]
    assert not xv.is_contiguous(memory_format=torch.channels_last) and xv.stride(1) == 1
    buf = torch.full((2, 40, 5, 6), float("nan"), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    buf[:, :7] = 7.0
    buf[:, 28:] = -3.0
    fs = fused.FusedSpec(blk, P.best(blk).steps[0])
    out = fused.run_inception(fs, params, xv, buf[:, 7:28], Schedule(block_m=16, block_n=16))
    assert out.data_ptr() == buf[:, 7:28].data_ptr()
    ref = block_reference.block(blk, params, x)
    assert reference.rel_error(buf[:, 7:28], ref) < reference.tolerance("float16")
    assert (buf[:, :7] == 7.0).all() and (buf[:, 28:] == -3.0).all()
    y = fused.run_plan(blk, params, xv, poison=True)  # run_plan takes the view as is
    assert reference.rel_error(y, ref) < reference.tolerance("float16")
    with pytest.raises(SpecError, match="channels-last"):
        fused.run_inception(fs, params, x.contiguous(), buf[:, 7:28])
    with pytest.raises(SpecError, match="shape"):
        fused.run_inception(fs, params, xv, buf[:, 7:27])


def test_inception_matches_timm_module():
    from models_zoo import MetaNeXt  # noqa: F401  (declares torchvision's ops before timm imports it)
    from timm.models.inception_next import InceptionDWConv2d

    torch.manual_seed(0)
    mod = InceptionDWConv2d(37, band_kernel_size=5).eval()
    blk = B.inception_dw(n=2, c=37, in_size=(7, 9), band_kernel=5)
    params = {k: v.detach() for k, v in mod.state_dict().items()}
    assert set(params) == set(blk.param_shapes())
    x = torch.randn(2, 37, 7, 9)
    with torch.no_grad():
        ref = mod.double()(x.double())
    y = fused.run_plan(blk, params, x, poison=True)
    assert reference.rel_error(y, ref) < reference.tolerance("float32")


@pytest.mark.slow
def test_inception_defaults_compile_for_sm90_without_spills():
    items = []
    for c, hw in INCEPTION_T:
        for dt in ("bfloat16", "float32"):
            blk = B.inception_dw(n=8, c=c, in_size=(hw, hw), dtype=dt)
            items.append((blk, P.best(blk), 0, None))
    odd = CASES["bn_act_dilated"]("float16")
    items.append((odd, P.best(odd), 0, None))
    for (blk, _, _, _), r in zip(items, fused.compile_check(items)):
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0, (blk.describe(), r)


# ---- structural re-parameterization ------------------------------------------------------------------
def _timm_blocks():
    import models_zoo  # noqa: F401  (torchvision's ops declared before timm imports it)
    import timm.models.byobnet as byob
    import timm.models.fastvit as fv

    return {
        "repvgg": lambda: byob.RepVggBlock(12, 12, 3),
        "repvgg_s2_wider": lambda: byob.RepVggBlock(12, 20, 3, stride=2),
        "repvgg_grouped": lambda: byob.RepVggBlock(12, 12, 3, group_size=4),
        "mobileone": lambda: byob.MobileOneBlock(12, 12, 3, num_conv_branches=3),
        "mobileone_dw": lambda: byob.MobileOneBlock(12, 12, 3, group_size=1, num_conv_branches=2),
        "fastvit_mobileone_gelu": lambda: fv.MobileOneBlock(12, 12, 3, num_conv_branches=2, act_layer=torch.nn.GELU),
        "replk_7_3": lambda: fv.ReparamLargeKernelConv(12, 12, 7, 1, 1, small_kernel=3, act_layer=torch.nn.GELU),
        "replk_s2_se": lambda: fv.ReparamLargeKernelConv(12, 18, 5, 2, 4, small_kernel=3, use_se=True),
    }


def _randomize_bn(m, g):
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            mod.weight.data.copy_(torch.randn(n, generator=g) * 0.3 + 1)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


@pytest.mark.parametrize(
    "name",
    [
        "repvgg",
        "repvgg_s2_wider",
        "repvgg_grouped",
        "mobileone",
        "mobileone_dw",
        "fastvit_mobileone_gelu",
        "replk_7_3",
        "replk_s2_se",
    ],
)
def test_reparameterize_timm_blocks(name):
    from tunerd.blocks import RepConv2d, reparameterize

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train = _timm_blocks()[name]()
    _randomize_bn(train, g)
    train.eval()
    x = torch.randn(2, 12, 9, 7, generator=g)
    # float64: the merged weights reproduce the training form exactly (torch conv on the merged weight)
    t64 = train.double()
    inf = reparameterize(t64)
    assert isinstance(inf, RepConv2d)
    c = inf.conv
    with torch.no_grad():
        y = F.conv2d(x.double(), c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        y = inf.act(inf.attn(activation_torch(c.activation, y) if c.activation else y))
        ref = t64(x.double())
    assert (y - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    # fp32: the inference module runs one tunerd conv (activation in its epilogue when nothing is between)
    t32 = train.float()
    inf32 = reparameterize(t32)
    assert type(inf32.conv).__module__ == "tunerd.nn"
    if type(inf32.attn) is torch.nn.Identity and not isinstance(t32.act, torch.nn.Identity):
        assert inf32.conv.activation is not None
    with torch.no_grad():
        ref32, y32 = t32(x), inf32(x)
    assert (y32 - ref32).abs().max().item() <= 1e-5 * max(1.0, ref32.abs().max().item())


def test_reparameterize_walks_a_model_and_keeps_the_original():
    from tunerd.blocks import RepConv2d, reparameterize

    blocks = _timm_blocks()
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = torch.nn.Sequential(blocks["repvgg"](), torch.nn.Sequential(blocks["mobileone"](), blocks["replk_7_3"]()))
    _randomize_bn(model, g)
    model.eval()
    x = torch.randn(1, 12, 6, 5, generator=g)
    inf = reparameterize(model)
    assert isinstance(inf[0], RepConv2d) and isinstance(inf[1][0], RepConv2d) and isinstance(inf[1][1], RepConv2d)
    assert not isinstance(model[0], RepConv2d)  # a copy unless inplace
    with torch.no_grad():
        assert (inf(x) - model(x)).abs().max().item() <= 1e-5 * max(1.0, model(x).abs().max().item())
    assert reparameterize(model, inplace=True) is model and isinstance(model[0], RepConv2d)


def test_reparam_math_dilated_branches_and_errors():
    """UniRepLKNet-style: a 7x7 kernel + dilated 3x3 (d=2, d=3) + 1x1, each with BN, as one 7x7 conv (float64)."""
    g = torch.Generator().manual_seed(2)
    d = torch.float64
    x = torch.randn(2, 6, 11, 10, generator=g, dtype=d)
    specs = [((7, 7), (1, 1), (3, 3)), ((3, 3), (2, 2), (2, 2)), ((3, 3), (3, 3), (3, 3)), ((1, 1), (1, 1), (0, 0))]
    ref = 0
    branches = []
    for ks, dil, pad in specs:
        w = torch.randn(6, 1, *ks, generator=g, dtype=d)
        bn = torch.nn.BatchNorm2d(6).double().eval()
        _randomize_bn(bn, g)
        ref = ref + bn(F.conv2d(x, w, None, 1, pad, dil, 6))
        branches.append(reparam.bn_branch(w, None, bn, dil, pad))
    w, b, pad = reparam.merge(branches)
    assert tuple(w.shape) == (6, 1, 7, 7) and pad == (3, 3)
    assert torch.allclose(F.conv2d(x, w, b, 1, pad, 1, 6), ref, rtol=0, atol=1e-12)
    ident = reparam.identity_weight(6, 3, x)
    assert torch.equal(F.conv2d(x, ident, groups=3), x)
    with pytest.raises(SpecError, match="centred"):
        reparam.merge([branches[0], reparam.Branch(branches[1].weight, None, (1, 1), (0, 0))])
    with pytest.raises(SpecError, match="channels"):
        reparam.merge([branches[0], reparam.Branch(torch.zeros(6, 2, 3, 3, dtype=d), None, (1, 1), (1, 1))])


def test_reparameterize_refuses_nonlinear_branches():
    from tunerd.blocks import merge_block

    blk = _timm_blocks()["repvgg"]()
    blk.conv_kxk.bn.act = torch.nn.ReLU()
    with pytest.raises(SpecError, match="not linear"):
        merge_block(blk)
    with pytest.raises(SpecError, match="not a re-parameterizable"):
        merge_block(torch.nn.Conv2d(3, 3, 3))


def test_tuning_an_inception_block():
    from tunerd.schedules.blocks import BlockHarness, predict, space, tune_block
    from tunerd.schedules.device import DeviceLimits

    big = B.inception_dw(n=8, c=192, in_size=(28, 28), dtype="bfloat16")
    fs = fused.FusedSpec(big, P.best(big).steps[0])
    cands = space(fs, None)
    assert cands[0] == fused.default_schedule(fs) and len(set(cands)) == len(cands) > 8
    h100 = DeviceLimits.h100()
    assert predict(fs, Schedule(block_m=64, block_n=32, num_warps=8), h100) < predict(
        fs, Schedule(block_m=16, block_n=64, num_warps=4), h100
    )  # 24-channel slices padded to 64
    blk = B.inception_dw(n=1, c=19, in_size=(5, 6), band_kernel=5, dtype="bfloat16")
    with BlockHarness(reps=1, timeout_s=120) as h:
        res = tune_block(blk, budget_trials=3, harness=h, max_plans=1)
    assert res.best is not None and res.statuses == {"ok": len(res.trials)}
    assert {t.plan for t in res.trials} == {P.best(blk), P.unfused(blk)}
