"""DeepLabV3 ASPP on the block compiler: the 1x1 and dilated 3x3 branches and the image pooling broadcast written
into the concat by one launch (one program per pixel tile x branch channel tile). Numerics against float64 with
NaN-poisoned outputs on odd sizes in three dtypes, planner and modelled bytes, sm_90 compile-validity, tuning."""

import pytest
import torch
import torch.nn.functional as F
from blockcheck import check_plan, inputs

from tunerd.kernels import block as B
from tunerd.kernels import block_reference, fused
from tunerd.kernels import plan as P
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import SpecError


def _aspp_plan(blk):
    return next(c.plan for c in P.rank(blk) if any(s.kind == "aspp" for s in c.plan.steps))


# ---- description -----------------------------------------------------------------------------------------
def test_aspp_block_is_torchvision_aspp():
    """The block's float64 reference equals torchvision's ASPP (eval BN folded) on the same weights."""
    blk = B.aspp(n=2, c=12, in_size=(9, 7), k=20, rates=(2, 3, 5))
    assert blk.output.c == 20 and blk.shapes["cat"].c == 5 * 20 and B.Block.from_json(blk.to_json()) == blk
    params, x = inputs(blk, 0)
    xd = x.double()
    p = {k: v.double() for k, v in params.items()}

    def branch(name, t, **kw):
        y = F.conv2d(t, p[f"{name}.weight"], **kw)
        return torch.relu(y * p[f"{name}_bn.scale"].view(1, -1, 1, 1) + p[f"{name}_bn.shift"].view(1, -1, 1, 1))

    outs = [branch("b0", xd)] + [branch(f"b{i}", xd, padding=r, dilation=r) for i, r in enumerate((2, 3, 5), 1)]
    pooled = branch("pool_conv", F.adaptive_avg_pool2d(xd, 1))
    outs.append(F.interpolate(pooled, size=(9, 7), mode="bilinear", align_corners=False))
    want = branch("project", torch.cat(outs, 1))
    assert torch.allclose(block_reference.block(blk, params, x), want, rtol=1e-12, atol=1e-12)


def test_aspp_errors_and_legality():
    with pytest.raises(SpecError, match="rates"):
        B.aspp(n=1, c=8, in_size=(5, 5), rates=(0,))
    with pytest.raises(SpecError, match="1 x 1 input"):
        B.Block(n=1, c=4, in_size=(3, 3), nodes=(B.node("b", "broadcast", ["x"], size=(3, 3)),))
    blk = B.aspp(n=1, c=8, in_size=(5, 5), k=16, rates=(2,), project=False)
    names = [nd.name for nd in blk.nodes]
    i = names.index("b0")
    assert P.matches(blk, P.Step("aspp", tuple(names[i:])))
    assert not P.matches(blk, P.Step("aspp", tuple(names[i:-1])))  # no concat
    # a strided branch changes the size: no aspp step
    nodes = (
        B.node("a", "conv", ["x"], out=8, kernel=1),
        B.node("b", "conv", ["x"], out=8, kernel=3, padding=1, stride=2),
        B.node("cat", "concat", ["a", "b"]),
    )
    with pytest.raises(SpecError, match="concat of different spatial sizes"):
        B.Block(n=1, c=8, in_size=(5, 5), nodes=nodes)
    grouped = (
        B.node("a", "conv", ["x"], out=8, kernel=1),
        B.node("b", "conv", ["x"], out=8, kernel=3, padding=1, groups=2),
        B.node("cat", "concat", ["a", "b"]),
    )
    g = B.Block(n=1, c=8, in_size=(5, 5), nodes=grouped)
    assert not P.matches(g, P.Step("aspp", ("a", "b", "cat")))  # dense branches only


def test_planner_and_modelled_bytes():
    """DeepLabV3 (ResNet-50, output stride 8): one launch writes the concat, the input is read once."""
    blk = B.aspp(n=8, c=2048, in_size=(64, 64), k=256, dtype="bfloat16")
    best = P.rank(blk)[0]
    assert [s.kind for s in best.plan.steps] == ["op", "conv", "aspp", "conv"]
    u = P.cost(blk, P.unfused(blk))
    assert best.bytes <= 0.5 * u.bytes and best.launches == 4 < u.launches
    aspp = next(s for s in best.steps if s.step.kind == "aspp")
    pix = 8 * 64 * 64
    # the input once, the concat once, the weights, BN vectors and the pooled 1 x 1 map
    assert aspp.bytes == (pix * 2048 + pix * 5 * 256) * 2 + 2048 * 256 * (1 + 3 * 9) * 2 + 4 * 2 * 256 * 4 + 8 * 256 * 2


# ---- numerics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_aspp_matches_float64(dtype):
    """C = 12 (not a multiple of 16), 20 output channels per branch, 9 x 7 pixels, rates that cross the border."""
    blk = B.aspp(n=2, c=12, in_size=(9, 7), k=20, rates=(2, 3, 5), dtype=dtype)
    check_plan(blk, _aspp_plan(blk), seed=1)


def test_aspp_schedules_and_no_pooling():
    blk = B.aspp(n=1, c=20, in_size=(6, 5), k=24, rates=(1, 4), pooling=False, project=False, dtype="bfloat16")
    plan = _aspp_plan(blk)
    assert plan.describe().startswith("aspp[") and plan.launches == 1
    # several pixel tiles, 16-wide channel tiles (two per branch), two input-channel steps
    check_plan(blk, plan, seed=2, schedules={0: Schedule(block_m=16, block_n=16, block_k=16, num_warps=4)})


# ---- compile-validity ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_aspp_defaults_compile_for_sm90_without_spills():
    items = []
    for dt in ("bfloat16", "float32"):
        for blk in (
            B.aspp(n=8, c=2048, in_size=(64, 64), k=256, dtype=dt),  # ResNet-50 backbone, output stride 8
            B.aspp(n=8, c=960, in_size=(32, 32), k=256, rates=(12, 24, 36), dtype=dt),  # MobileNetV3, stride 16
        ):
            plan = _aspp_plan(blk)
            items.append((blk, plan, next(i for i, s in enumerate(plan.steps) if s.kind == "aspp"), None))
    for (blk, _, _, _), r in zip(items, fused.compile_check(items)):
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0, (blk.describe(), r)
        assert r["mma"] == ("fma" if blk.dtype == "float32" else "wgmma")


def test_space_and_prior():
    from tunerd.schedules.blocks import predict, space
    from tunerd.schedules.device import DeviceLimits

    h100 = DeviceLimits.h100()
    blk = B.aspp(n=8, c=2048, in_size=(64, 64), k=256, dtype="bfloat16")
    plan = _aspp_plan(blk)
    fs = fused.FusedSpec(blk, plan.steps[next(i for i, s in enumerate(plan.steps) if s.kind == "aspp")])
    cands = space(fs, None)
    assert cands[0] == fused.default_schedule(fs) and len(set(cands)) == len(cands) > 8
    for s in cands:
        fused.check_schedule(fs, s)
    # compute-bound: the modelled time is the tensor-core time of 28 taps x 2048 x 256 per pixel, in waves
    flops = 8 * 64 * 64 * 2 * 2048 * 256 * (1 + 3 * 9)
    assert flops / h100.fp16_flops < predict(fs, cands[0], h100) < 2 * flops / h100.fp16_flops


# ---- GPU twins -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_aspp_matches_float64_cuda(dtype):
    for blk in (
        B.aspp(n=2, c=12, in_size=(9, 7), k=20, rates=(2, 3, 5), dtype=dtype),
        B.aspp(n=2, c=256, in_size=(33, 33), k=256, dtype=dtype),
    ):
        check_plan(blk, _aspp_plan(blk), seed=1, device="cuda")
