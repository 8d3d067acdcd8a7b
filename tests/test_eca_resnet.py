"""ECA (and SE) after a plain conv, timm's ECA-ResNet Bottleneck, and ResNet-D's average-pool shortcut on the block
compiler.

kernels.plan: conv3 + bn3 writes its output's per-image partial pool sums (pw_pool) and one step applies
y * gate + shortcut -> act (gate_ep), the gate's map once per image; the shortcut's AvgPool2d(2, 2, ceil_mode,
count_include_pad=False) folds into its 1x1 GEMM's A operand (pool_pw); modelled bytes against the pool-less, the
pool-apart and the unfused plans. kernels.block: avgpool output sizes as torch's. kernels.fused: the forward against
float64 with every buffer NaN-poisoned (the pool sums too), three dtypes, odd channels and sizes (7 x 9 -> 4 x 5: edge
windows of 1 or 2 elements), tiles that split an image and its channels; gradients through block_autograd.
tunerd.patch: every Bottleneck of timm's ecaresnet26t and seresnext26d_32x4d fuses in eval mode, the patched eval
forward matches, timm's AvgPool2d anti-aliasing (create_aa) folds into conv3, and three SGD steps of narrow
ECA-ResNet stages (a stride-2 block included) match the unpatched. The new steps compile for sm_90 without spills.
"""

from __future__ import annotations

import copy
import itertools

import models_zoo  # noqa: F401  (timm and torchvision after tunerd, with torchvision's ops declared)
import pytest
import timm
import torch
import torch.nn.functional as F
from blockcheck import check_gradients, check_plan, inputs
from test_patch_blocks import check_three_sgd_steps
from timm.models.resnet import Bottleneck, ResNet

from benchmarks.blocks import eager_forward
from tunerd.blocks import last_plan
from tunerd.kernels import block as B
from tunerd.kernels import block_autograd, block_reference, fused, reference
from tunerd.kernels import plan as P
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import SpecError
from tunerd.patching import patch
from tunerd.schedules.block_suites import block_suite

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = ("float32", "float16", "bfloat16")
SMALL_TILES = Schedule(block_m=16, block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=1)


def _blocks(dtype: str = "float32") -> dict[str, B.Block]:
    """Odd channel counts and sizes: an identity-shortcut ECA block, a stride-2 one with a downsample, one with
    ResNet-D's average-pool downsample (7 x 9 -> 4 x 5), an SE one."""
    return {
        "eca": B.bottleneck(n=2, c=20, k=20, width=7, in_size=(7, 9), eca_kernel=5, dtype=dtype),
        "eca_s2": B.bottleneck(n=2, c=12, k=20, width=5, in_size=(9, 7), stride=2, dtype=dtype),
        "eca_avg": B.bottleneck(n=2, c=12, k=20, width=5, in_size=(7, 9), stride=2, avg_down=True, dtype=dtype),
        "se": B.bottleneck(n=2, c=20, k=20, width=7, in_size=(7, 9), attention="se", se_hidden=3, dtype=dtype),
    }


def _steps(plan: P.Plan) -> dict[str, int]:
    return {s.kind: i for i, s in enumerate(plan.steps)}


# ---- the planner ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["eca", "eca_s2", "eca_avg", "se"])
def test_the_planner_pools_in_conv3_and_applies_the_gate_with_the_residual(name):
    blk = _blocks("bfloat16")[name]
    ranked = P.rank(blk)
    best = ranked[0]
    kinds = [s.kind for s in best.plan.steps]
    assert kinds[-2:] == ["pw_pool", "gate_ep"], best.plan.describe()
    assert best.plan.steps[-2].nodes == ("conv3", "bn3")
    assert best.plan.steps[-1].nodes == ("attn", "add", "act3")
    # the pool in conv3's epilogue saves the gate's own pass over y; both beat the unfused plan by far
    pool_less = next(c for c in ranked if "gate_ep" in _steps(c.plan) and "pw_pool" not in _steps(c.plan))
    eager = P.cost(blk, P.unfused(blk))
    y = 2 * 20 * blk.output.size[0] * blk.output.size[1]
    assert pool_less.bytes - best.bytes > y * blk.itemsize // 2, (pool_less.bytes, best.bytes)
    assert best.bytes < 0.6 * eager.bytes and best.launches < eager.launches


def test_pw_pool_needs_a_gate_after_it_and_gate_ep_an_epilogue_chain():
    plain = B.bottleneck(n=1, c=16, k=16, width=4, in_size=(4, 4), attention=None)
    with pytest.raises(SpecError, match="not a legal pw_pool"):
        P.Plan.from_dict(
            plain,
            {
                "steps": [
                    {"kind": "conv", "nodes": ["conv1", "bn1", "act1"]},
                    {"kind": "conv", "nodes": ["conv2", "bn2", "act2"]},
                    {"kind": "pw_pool", "nodes": ["conv3", "bn3"]},
                    {"kind": "op", "nodes": ["add"]},
                    {"kind": "op", "nodes": ["act3"]},
                ]
            },
        )
    blk = _blocks()["eca"]
    assert not P.matches(blk, P.Step("gate_ep", ("attn", "add", "act3", "conv1")))
    assert not P.matches(blk, P.Step("pw_pool", ("conv2", "bn2")))  # a 3x3 conv is no pointwise GEMM
    assert not P.matches(blk, P.Step("pw_pool", ("conv3",)))  # its output feeds bn3, not the gate


def test_avgpool_nodes_size_as_torch_and_check_their_fields():
    for h, k, st, pad, ceil in itertools.product(range(1, 8), (1, 2, 3), (1, 2, 3), (0, 1), (False, True)):
        if pad > k // 2:
            continue
        nd = B.node("p", "avgpool", ["x"], kernel=k, stride=st, padding=pad, ceil_mode=ceil)
        try:
            want = tuple(F.avg_pool2d(torch.empty(1, 1, h, h + 2), k, st, pad, ceil).shape[2:])
        except RuntimeError:  # torch: output size too small
            with pytest.raises(SpecError, match="is empty"):
                B.Block(n=1, c=1, in_size=(h, h + 2), nodes=(nd,))
            continue
        assert B.Block(n=1, c=1, in_size=(h, h + 2), nodes=(nd,)).output.size == want, (h, k, st, pad, ceil)
    blk = _blocks()["eca_avg"]
    assert B.Block.from_json(blk.to_json()) == blk and blk.node("down_pool")["ceil_mode"] is True
    for bad, match in (
        (dict(kernel=2, stride=2, padding=2), "exceeds half the kernel"),
        (dict(kernel=2, stride=0), "stride must be an int >= 1"),
        (dict(kernel=2, stride=2, ceil_mode=1), "ceil_mode must be a bool"),
        (dict(kernel=2), "needs field 'stride'"),
    ):
        with pytest.raises(SpecError, match=match):
            B.node("p", "avgpool", ["x"], **bad)


def test_the_shortcut_pool_folds_into_its_gemm_and_saves_the_pooled_tensors_round_trip():
    """pool_pw against the pool as a pass of its own (op[down_pool] | conv[downsample+bn], what a standalone pooling
    kernel would move too): exactly the pooled tensor's write and read fewer bytes, one launch fewer."""
    blk = B.bottleneck(n=32, c=512, k=1024, width=256, in_size=(28, 28), stride=2, avg_down=True, dtype="bfloat16")
    ranked = P.rank(blk)
    best = ranked[0]
    assert best.plan.steps[0] == P.Step("pool_pw", ("down_pool", "downsample", "downsample_bn"))
    apart = next(c for c in ranked if c.plan.steps[0] == P.Step("op", ("down_pool",)))
    assert apart.plan.steps[1:] == (P.Step("conv", ("downsample", "downsample_bn")), *best.plan.steps[1:])
    pooled = blk.shapes["down_pool"]
    assert pooled.size == (14, 14)
    assert apart.bytes - best.bytes == 2 * 32 * 512 * 14 * 14 * 2 and apart.launches == best.launches + 1
    assert not P.matches(blk, P.Step("pool_pw", ("down_pool", "downsample", "downsample_bn", "conv1")))


# ---- numerics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["eca", "eca_s2", "eca_avg", "se"])
def test_fused_gate_matches_float64(name, dtype):
    blk = _blocks(dtype)[name]
    plan = P.rank(blk)[0].plan
    at = _steps(plan)
    assert ("pool_pw" in at) == (name == "eca_avg")
    check_plan(blk, plan, seed=1)
    # 16-pixel tiles split each image (the pool sums several partials per image) and the 20 channels in two tiles
    check_plan(blk, plan, seed=2, schedules={at[k]: SMALL_TILES for k in ("pw_pool", "gate_ep", "pool_pw") if k in at})


POOLS = {  # timm's forms: downsample_avg's (ResNet-D), create_aa's AvgPool2d(2), and a padded 3x3 counting the padding
    "resnet_d": dict(kernel=2, stride=2, ceil_mode=True, count_include_pad=False),
    "aa": dict(kernel=2, stride=2),
    "pad3": dict(kernel=3, stride=2, padding=1, ceil_mode=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", list(POOLS))
def test_pool_pw_matches_float64(form, dtype):
    """avgpool -> 1x1 -> BN -> ECA over 7 x 9 (ceil_mode windows clipped at the edges, aa's floor drops the last row
    and column), 16-pixel tiles: the folded pool, and the pool sums it writes for the gate (pool_pw | gate_ep)."""
    blk = B.Block(
        n=2,
        c=20,
        in_size=(7, 9),
        dtype=dtype,
        nodes=(
            B.node("pool", "avgpool", ["x"], **POOLS[form]),
            B.node("pw", "conv", ["pool"], out=24, kernel=1),
            B.node("bn", "bn", ["pw"]),
            B.node("attn", "eca", ["bn"], kernel=3),
        ),
    )
    plan = P.Plan((P.Step("pool_pw", ("pool", "pw", "bn")), P.Step("gate_ep", ("attn",))))
    P.check(blk, plan)
    check_plan(blk, plan, seed=9, schedules={0: SMALL_TILES})


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_ep_without_a_pooling_step_pools_itself(dtype):
    blk = _blocks(dtype)["eca_s2"]
    plan = next(c.plan for c in P.rank(blk) if "gate_ep" in _steps(c.plan) and "pw_pool" not in _steps(c.plan))
    check_plan(blk, plan, seed=3)


@pytest.mark.parametrize("name", ["eca_s2", "eca_avg", "se"])
def test_fused_gate_gradients_match_float64(name):
    blk = _blocks()[name]
    plan = P.rank(blk)[0].plan
    assert {"pw_pool", "gate_ep"} <= set(_steps(plan))
    assert any(k.startswith("attn.") for k in check_gradients(blk, plan, seed=4))  # the gate's own parameters


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_gradients_are_as_close_to_float64_as_eager_torchs(dtype):
    """block_autograd's recomputing backward in 16 bits against float64, within 4x of eager torch's in that dtype
    (F.conv2d and torch ops per node: the gate's pooled gradient and the ReLUs make bf16 ECA gradients ill-conditioned
    in both, ~0.2 relative error at conv1 here)."""
    blk = _blocks(dtype)["eca"]
    params, x = inputs(blk, seed=5)
    dy = torch.randn((blk.n, blk.output.c, *blk.output.size), generator=torch.Generator().manual_seed(6))

    def grads(fn, dt: torch.dtype) -> list[torch.Tensor]:
        leaves = [x.detach().to(dt).requires_grad_(), *(p.detach().to(dt).requires_grad_() for p in params.values())]
        y = fn(dict(zip(params, leaves[1:])), leaves[0])
        return [y, *torch.autograd.grad(y, leaves, dy.to(dt))]

    ours = grads(lambda p, x: block_autograd.block(blk, p, x, P.rank(blk)[0].plan, poison=True), x.dtype)
    eager = eager_forward(blk)
    theirs = grads(lambda p, x: eager(x, p), x.dtype)
    exact = grads(lambda p, x: block_reference.block(blk, p, x), torch.float64)
    for what, a, b, e in zip(["output", "x", *params], ours, theirs, exact):
        err, yard = reference.rel_error(a, e), reference.rel_error(b, e)
        assert err < max(4 * yard, reference.tolerance(dtype)), (what, err, yard)


# ---- patch of timm's ECA-ResNet -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ecaresnet26t", "seresnext26d_32x4d"])
def test_patch_fuses_every_resnet_d_block_and_matches_in_eval(name):
    """Every Bottleneck fuses in eval mode (before the avgpool node: the stride-2 blocks of layers 2-4 fell back);
    the stem, layer1 and layer2 at 28 x 28 match float64, layer2.0's shortcut pooling 7 x 7 -> 4 x 4 in its GEMM
    (seresnext26d_32x4d: SE and conv2 with 32 groups)."""
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    report = patch(copy.deepcopy(model))
    layers = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert sorted(n for n, _ in report.blocks) == layers
    assert not [n for n, w in report.left if "eval mode" in w], str(report)
    head = torch.nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1, model.layer2)
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = copy.deepcopy(head).double()(x.double())
        ours = copy.deepcopy(head)
        patch(ours)
        got = ours(x)
    assert reference.rel_error(got, want) < 1e-5
    for blk_module in [*ours[4], *ours[5]]:
        blk, plan = last_plan(blk_module)
        assert [s.kind for s in plan.steps][-2:] == ["pw_pool", "gate_ep"], plan.describe()
    blk, plan = last_plan(ours[5][0])
    assert blk.shapes["down_pool"].size == (4, 4) and plan.steps[0].kind == "pool_pw", plan.describe()


def test_anti_aliasing_pool_folds_into_conv3_and_its_gate_pool():
    """timm's create_aa(nn.AvgPool2d) (AvgPool2d(2) after act2, conv2 at stride 1) in a stride-2 ECA block: the pool
    folds into conv3's GEMM and the shortcut's into its own (traced order puts the shortcut last, so the residual add
    and act3 ride in its epilogue); eval matches float64, and so does the plan whose conv3 step writes the gate's
    partial sums for a gate_ep step."""
    model = ResNet(
        block=Bottleneck,
        layers=(1, 1, 1, 1),
        channels=(8, 8, 8, 8),
        stem_width=8,
        stem_type="deep",
        avg_down=True,
        aa_layer=torch.nn.AvgPool2d,
        block_args=dict(attn_layer="eca"),
        num_classes=10,
    ).eval()
    stage = model.layer2
    assert isinstance(stage[0].aa, torch.nn.AvgPool2d) and not stage[0].aa.ceil_mode
    report = patch(ours := copy.deepcopy(stage))
    assert [n for n, _ in report.blocks] == ["0"], str(report)
    x = torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = copy.deepcopy(stage).double()(x.double())
        got = ours(x)
    assert reference.rel_error(got, want) < 1e-5
    blk, plan = last_plan(ours[0])
    pools = [[blk.node(n).op for n in s.nodes] for s in plan.steps if s.kind == "pool_pw"]
    assert pools == [["avgpool", "conv", "bn"], ["avgpool", "conv", "bn", "add", "act"]], plan.describe()
    gated = next(c.plan for c in P.rank(blk) if sum(s.kind in ("pool_pw", "gate_ep") for s in c.plan.steps) == 3)
    check_plan(blk, gated, seed=10)


def test_convnext_stride_2_blocks_fuse_their_downsample_shortcut():
    """timm's ConvNeXtBlock at stride 2 (its Downsample shortcut: AvgPool2d(2, 2, ceil_mode, count_include_pad=False)
    -> 1x1), refused before the avgpool node: the pool, the 1x1 and the residual add in one pool_pw step, in train and
    eval mode (LayerNorm, no batch statistics); 7 x 9 -> 4 x 5 matches float64."""
    from timm.models.convnext import ConvNeXtBlock

    torch.manual_seed(0)
    base = ConvNeXtBlock(16, 32, stride=2).eval()
    report = patch(ours := copy.deepcopy(base))
    assert [n for n, _ in report.blocks] == [""] and not report.left, str(report)
    x = torch.randn(2, 16, 7, 9, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = copy.deepcopy(base).double()(x.double())
        got = ours(x)
    assert reference.rel_error(got, want) < 1e-5
    blk, plan = last_plan(ours)
    assert plan.steps[-1].kind == "pool_pw" and blk.node(plan.steps[-1].nodes[-1]).op == "add", plan.describe()


def _eca_resnet(layers: tuple[int, ...]) -> ResNet:
    """ecaresnet26t, narrow: timm's ResNet with its deep-tiered, average-down, ECA settings."""
    return ResNet(
        block=Bottleneck,
        layers=layers,
        channels=(8, 8, 8, 8),
        stem_width=8,
        stem_type="deep_tiered",
        avg_down=True,
        block_args=dict(attn_layer="eca"),
        num_classes=10,
    )


def _eca_resnet_stage() -> torch.nn.Module:
    return _eca_resnet((2, 1, 1, 1)).layer1


def _eca_resnet_down() -> torch.nn.Module:
    """layer1's block, then layer2's stride-2 block: ResNet-D's shortcut pools 5 x 5 -> 3 x 3 (edge windows of 1)."""
    model = _eca_resnet((1, 1, 1, 1))
    return torch.nn.Sequential(model.layer1, model.layer2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_three_sgd_steps_of_an_eca_resnet_stage_match_unpatched(training):
    check_three_sgd_steps(_eca_resnet_stage, (2, 16, 5, 5), (2, 32, 5, 5), training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_three_sgd_steps_through_a_resnet_d_stride_2_block_match_unpatched(training):
    check_three_sgd_steps(_eca_resnet_down, (2, 16, 5, 5), (2, 32, 3, 3), training)
    if not training:
        blk, plan = last_plan(_patched_probe())
        assert plan.steps[0].kind == "pool_pw", plan.describe()


def _patched_probe() -> torch.nn.Module:
    """_eca_resnet_down()'s stride-2 block, patched and run once in eval (its plan, as the SGD steps ran it)."""
    m = _eca_resnet_down().eval()
    patch(m)
    with torch.no_grad():
        m(torch.randn(2, 16, 5, 5))
    return m[1][0]


def test_ecaresnet50d_suite_is_timms_blocks():
    """The suite's blocks are ecaresnet50d's at 224 x 224 (shapes from forward hooks on the meta device), the stride-2
    blocks with their average-pool shortcut included."""
    with torch.device("meta"):
        model = timm.create_model("ecaresnet50d", pretrained=False).eval()
    found = []

    def hook(mod, args, _out):
        x = args[0]
        pool = mod.downsample[0] if mod.downsample is not None else None
        pool = (pool.kernel_size, pool.stride, pool.ceil_mode, pool.count_include_pad) if _is_avg(pool) else None
        found.append(
            (x.shape[1], mod.conv3.out_channels, mod.conv1.out_channels, mod.se.conv.kernel_size[0], x.shape[2], pool)
        )

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Bottleneck)]
    model(torch.empty(1, 3, 224, 224, device="meta"))
    for h in handles:
        h.remove()
    want = []
    for e in block_suite("ecaresnet50d", batch=1):
        b = e.block
        pool = b.node("down_pool") if "down_pool" in b.shapes else None
        pool = (pool["kernel"], pool["stride"], pool["ceil_mode"], pool["count_include_pad"]) if pool else None
        shape = (b.c, b.output.c, b.node("conv1")["out"], b.node("attn")["kernel"], b.in_size[0], pool)
        want += [shape] * e.count
    assert sorted(found, key=str) == sorted(want, key=str) and len(found) == 16
    assert sum(p is not None for *_, p in found) == 3


def _is_avg(m: torch.nn.Module | None) -> bool:
    return isinstance(m, torch.nn.AvgPool2d)


# ---- tuning ----------------------------------------------------------------------------------------------
def test_the_tuner_space_and_prior_cover_the_new_steps():
    from tunerd.schedules.blocks import predict, space
    from tunerd.schedules.device import DeviceLimits

    blk = _blocks()["eca_avg"]
    plan = P.rank(blk)[0].plan
    for kind, i in _steps(plan).items():
        if kind not in ("pw_pool", "gate_ep", "pool_pw"):
            continue
        fs = fused.FusedSpec(blk, plan.steps[i])
        cands = space(fs)
        assert cands[0] == fused.default_schedule(fs) and len(cands) > 1
        assert all(0 < predict(fs, s, DeviceLimits.h100()) < 1 for s in cands)
        # the smallest tiles the tuner may pick
        check_plan(blk, plan, seed=8, schedules={i: cands[-1]})


# ---- sm_90 -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_new_steps_compile_for_sm90_without_spills():
    """Default schedules at ResNet-50 stage 1 and stage 4 sizes (batch 8), the stride-2 blocks of stages 2 and 4
    (pool_pw), and a padded 3x3 pool_pw writing a gate's sums, 16-bit (wgmma) and fp32 (CUDA cores)."""
    items = []
    for dt in ("bfloat16", "float32"):
        blocks = [
            B.bottleneck(n=8, c=c, k=c, width=w, in_size=(s, s), dtype=dt)
            for c, w, s in ((256, 64, 56), (2048, 512, 7))
        ]
        blocks += [
            B.bottleneck(n=8, c=c, k=2 * c, width=c // 2, in_size=(s, s), stride=2, avg_down=True, dtype=dt)
            for c, s in ((256, 56), (1024, 14))
        ]
        for blk in blocks:  # the stride-2 blocks' pw_pool and gate_ep are the stride-1 blocks' kernels at other sizes
            plan = P.rank(blk)[0].plan
            kinds = ("pool_pw",) if "down_pool" in blk.shapes else ("pw_pool", "gate_ep")
            items += [(blk, plan, i, None) for i, s in enumerate(plan.steps) if s.kind in kinds]
        pooled = B.Block(
            n=8,
            c=64,
            in_size=(27, 27),
            dtype=dt,
            nodes=(
                B.node("pool", "avgpool", ["x"], kernel=3, stride=2, padding=1, ceil_mode=True),
                B.node("pw", "conv", ["pool"], out=64, kernel=1),
                B.node("bn", "bn", ["pw"]),
                B.node("attn", "eca", ["bn"], kernel=3),
            ),
        )
        items.append((pooled, P.Plan((P.Step("pool_pw", ("pool", "pw", "bn")), P.Step("gate_ep", ("attn",)))), 0, None))
    assert len(items) == 2 * (4 + 2 + 1)
    for (blk, plan, i, _), r in zip(items, fused.compile_check(items)):
        kind = plan.steps[i].kind
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0, (kind, blk.describe(), r)
        assert r["mma"] == ("wgmma" if kind != "gate_ep" and blk.dtype != "float32" else "fma"), (kind, r)
