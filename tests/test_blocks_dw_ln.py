"""Wide ConvNeXt blocks: the depthwise 7 x 7 with LayerNorm in its epilogue (plan step dw_ln, issue 11).

The step alone against float64 torch (NaN-poisoned output) for channel counts that are no power of two and pixel
counts that are no tile multiple, in three dtypes; the planner's choice for ConvNeXt-T stages 3-4 and its modelled
bytes; the forced dw_ln plan against timm's ConvNeXtBlock; gradients through block_autograd's recompute; schedule
legality; sm_90 compiles of the ConvNeXt-T defaults without spills.
"""

from __future__ import annotations

import models_zoo  # noqa: F401  (timm after tunerd, with torchvision's ops declared)
import pytest
import torch
import torch.nn.functional as F
from blockcheck import check_gradients
from timm.models.convnext import ConvNeXtBlock

from tunerd.kernels import block as B
from tunerd.kernels import block_reference, fused, reference, runtime
from tunerd.kernels import plan as P
from tunerd.kernels.schedule import Schedule, ScheduleError
from tunerd.kernels.spec import SpecError

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIDE = "dw_ln[dw+ln] | conv[pw1+act] | conv[pw2+gamma+res]"


def _forced(blk: B.Block) -> P.Plan:
    plan = P.Plan(
        steps=(P.Step("dw_ln", ("dw", "ln")), P.Step("conv", ("pw1", "act")), P.Step("conv", ("pw2", "gamma", "res")))
    )
    P.check(blk, plan)
    return plan


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n, c, size, block_m", [(2, 40, (5, 7), None), (1, 136, (3, 5), 4)])
def test_dw_ln_step_matches_float64(dtype, n, c, size, block_m):
    """C = 40 / 136 (rows padded to 64 / 256), 70 / 15 pixels in partial pixel tiles of 32 / 4."""
    blk = B.convnext(n=n, c=c, in_size=size, eps=1e-5, dtype=dtype)
    fs = fused.FusedSpec(blk, P.Step("dw_ln", ("dw", "ln")))
    s = None if block_m is None else fused.dw_ln_schedule(fs, block_m)
    g = torch.Generator().manual_seed(c)
    params = fused.random_params(blk, "cpu", g)
    x = torch.randn((blk.n, c, *size), generator=g).to(DT[dtype]).contiguous(memory_format=torch.channels_last)
    out = torch.full((blk.n, *size, c), float("nan"), dtype=DT[dtype])
    v = fused.render(fs, s)
    assert v.schedule.block_n == fused.next_pow2(c) and v.grid == (-(-blk.n * size[0] * size[1] // v.schedule.block_m),)
    runtime.launch(v, fused.fused_args(fs, params, {"x": x}, out), x.device)
    d = {k: t.double() for k, t in params.items()}
    y = F.conv2d(x.double(), d["dw.weight"], d["dw.bias"], padding=3, groups=c)
    want = F.layer_norm(y.permute(0, 2, 3, 1), (c,), d["ln.weight"], d["ln.bias"], 1e-5)
    assert not out.isnan().any()
    err = reference.rel_error(out, want)
    assert err < reference.tolerance(dtype), (dtype, c, err)


def test_dw_ln_strided_without_bias():
    """A 3 x 3 stride-2 depthwise without bias, then the norm: the block's only (and best) fused step."""
    nodes = (
        B.node("dw", "conv", ["x"], out=24, kernel=3, stride=2, padding=1, groups=24),
        B.node("ln", "ln", ["dw"], eps=1e-6),
    )
    blk = B.Block(n=1, c=24, in_size=(7, 6), nodes=nodes, dtype="float32")
    plan = P.best(blk)
    assert plan.describe() == "dw_ln[dw+ln]"
    g = torch.Generator().manual_seed(3)
    params = fused.random_params(blk, "cpu", g)
    x = torch.randn((1, 24, 7, 6), generator=g)
    got = fused.run_plan(blk, params, x, plan, poison=True)
    assert got.shape == (1, 24, 4, 3)
    assert reference.rel_error(got, block_reference.block(blk, params, x.double())) < 1e-5


def test_planner_fuses_the_norm_into_the_depthwise_for_wide_stages():
    """ConvNeXt-T stages 3-4 (C = 384 / 768, too wide for the one-launch convnext step): dw_ln saves the
    depthwise output's write and the norm's read, 2 bytes x 2 per element in bf16, and a launch. Plans only."""
    for c, s in ((384, 14), (768, 7)):
        blk = B.convnext(n=8, c=c, in_size=(s, s), dtype="bfloat16")
        best = P.rank(blk)[0]
        assert best.plan.describe() == WIDE and best.launches == 3
        steps = [("conv", ["dw"]), ("op", ["ln"]), ("conv", ["pw1", "act"]), ("conv", ["pw2", "gamma", "res"])]
        old = P.cost(blk, P.Plan.from_dict(blk, {"steps": [{"kind": k, "nodes": n} for k, n in steps]}))
        assert old.bytes - best.bytes == 2 * 8 * c * s * s * 2 and old.seconds > best.seconds
        step = best.steps[0]  # x in, the normed tensor out, the 7 x 7 weights, dw bias and the norm's affine
        assert step.bytes == 2 * 8 * c * s * s * 2 + c * 49 * 2 + c * 4 + 2 * c * 4
    for c in (20, 96, 192):  # narrow rows still take the whole block in one launch
        assert P.best(B.convnext(n=8, c=c, in_size=(14, 14), dtype="bfloat16")).describe().startswith("convnext[")


def test_dw_ln_legality_and_schedules():
    blk = B.convnext(n=1, c=768, in_size=(4, 4))
    step = P.Step("dw_ln", ("dw", "ln"))
    assert P.matches(blk, step) and not P.matches(blk, P.Step("dw_ln", ("dw", "ln", "pw1")))
    assert not P.matches(blk, P.Step("dw_ln", ("ln", "pw1")))
    assert not P.matches(B.convnext(n=1, c=2100, in_size=(2, 2)), step)  # a row of 4096 padded channels
    with pytest.raises(SpecError, match="not a legal dw_ln"):
        P.Plan.from_dict(
            blk,
            {
                "steps": [
                    {"kind": "dw_ln", "nodes": ["dw"]},
                    {"kind": "op", "nodes": ["ln"]},
                    *_forced(blk).to_dict()["steps"][1:],
                ]
            },
        )
    fs = fused.FusedSpec(blk, step)
    s = fused.render(fs).schedule
    assert (s.block_m, s.block_n, s.num_warps) == (2, 1024, 4)
    assert fused.resolve(fs, Schedule(block_m=2, block_n=16, block_k=64, num_warps=4)).block_n == 1024
    too_big = (64, 8), (4, 4), (8, 16)  # 256 / 32 elements a thread, 16 warps
    for bad in (Schedule(block_m=m, block_n=16, block_k=16, num_warps=w) for m, w in too_big):
        with pytest.raises(ScheduleError, match="dw_ln"):
            fused.resolve(fs, bad)
    from tunerd.schedules import blocks as SB

    space = SB.space(fs)
    assert space[0] == s and len(space) == len(set(space)) >= 4
    for cand in space:
        fused.check_schedule(fs, cand)


def _timm_params(m: ConvNeXtBlock) -> dict[str, torch.Tensor]:
    w = {k: t.detach() for k, t in m.named_parameters()}
    return {
        "dw.weight": w["conv_dw.weight"],
        "dw.bias": w["conv_dw.bias"],
        "ln.weight": w["norm.weight"],
        "ln.bias": w["norm.bias"],
        "pw1.weight": w["mlp.fc1.weight"][:, :, None, None],
        "pw1.bias": w["mlp.fc1.bias"],
        "pw2.weight": w["mlp.fc2.weight"][:, :, None, None],
        "pw2.bias": w["mlp.fc2.bias"],
        "gamma.gamma": w["gamma"],
    }


def test_forced_dw_ln_plan_matches_timm_convnext_block():
    """timm's ConvNeXtBlock(136) (LayerNorm with random affine, layer scale 0.5 +- noise) on a 4 x 5 input."""
    m = ConvNeXtBlock(136, ls_init_value=0.5).eval()
    with torch.no_grad():
        for t in (m.norm.weight, m.norm.bias, m.gamma):
            t.add_(torch.randn_like(t) * 0.5)
    x = torch.randn(2, 136, 4, 5)
    blk = B.convnext(n=2, c=136, in_size=(4, 5))
    params = _timm_params(m)
    with torch.no_grad():
        got = fused.run_plan(blk, params, x, _forced(blk), poison=True)
        want = m.double()(x.double())
    err = reference.rel_error(got, want)
    assert err < 1e-5, err


def test_dw_ln_gradients_match_float64():
    blk = B.convnext(n=1, c=40, in_size=(4, 3), expansion=2)
    check_gradients(blk, _forced(blk), seed=7)


@pytest.mark.slow
def test_convnext_t_wide_stages_compile_for_sm90_without_spills():
    from tunerd.schedules.block_suites import block_suite

    items = []
    for dt in ("bfloat16", "float32"):
        for e in block_suite("convnext_t", 32, dt)[2:]:  # stages 3-4: C = 384 / 768
            plan = P.best(e.block)
            assert plan.describe() == WIDE
            items.append((e.block, plan, 0, None))
    for (blk, _, _, _), r in zip(items, fused.compile_check(items)):
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0, (blk.describe(), r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dw_ln_plan_matches_float64_cuda(dtype):
    for c, s in ((136, 9), (384, 14), (768, 7)):
        blk = B.convnext(n=2, c=c, in_size=(s, s), dtype=dtype)
        g = torch.Generator(device="cuda").manual_seed(c)
        params = fused.random_params(blk, "cuda", g)
        x = torch.randn((2, c, s, s), generator=g, device="cuda").to(DT[dtype])
        got = fused.run_plan(blk, params, x, _forced(blk), poison=True)
        err = reference.rel_error(got, block_reference.block(blk, params, x))
        assert err < reference.tolerance(dtype), (c, dtype, err)
