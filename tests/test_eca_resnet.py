"""ECA (and SE) after a plain conv, timm's ECA-ResNet Bottleneck, on the block compiler.

kernels.plan: conv3 + bn3 writes its output's per-image partial pool sums (pw_pool) and one step applies
y * gate + shortcut -> act (gate_ep), the gate's map once per image; modelled bytes against the pool-less and the
unfused plans. kernels.fused: the forward against float64 with every buffer NaN-poisoned (the pool sums too), three
dtypes, odd channels and sizes, tiles that split an image and its channels; gradients through block_autograd.
tunerd.patch: timm's ecaresnet26t blocks fuse in eval mode (stride-2 blocks, whose shortcut average-pools, say why
not), the patched eval forward matches, and three SGD steps of a narrow ECA-ResNet stage match the unpatched. The
new steps compile for sm_90 without spills.
"""

from __future__ import annotations

import copy

import models_zoo  # noqa: F401  (timm and torchvision after tunerd, with torchvision's ops declared)
import pytest
import timm
import torch
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
    """Odd channel counts and sizes: an identity-shortcut ECA block, a stride-2 one with a downsample, an SE one."""
    return {
        "eca": B.bottleneck(n=2, c=20, k=20, width=7, in_size=(7, 9), eca_kernel=5, dtype=dtype),
        "eca_s2": B.bottleneck(n=2, c=12, k=20, width=5, in_size=(9, 7), stride=2, dtype=dtype),
        "se": B.bottleneck(n=2, c=20, k=20, width=7, in_size=(7, 9), attention="se", se_hidden=3, dtype=dtype),
    }


def _steps(plan: P.Plan) -> dict[str, int]:
    return {s.kind: i for i, s in enumerate(plan.steps)}


# ---- the planner ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["eca", "eca_s2", "se"])
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


# ---- numerics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["eca", "eca_s2", "se"])
def test_fused_gate_matches_float64(name, dtype):
    blk = _blocks(dtype)[name]
    plan = P.rank(blk)[0].plan
    at = _steps(plan)
    check_plan(blk, plan, seed=1)
    # 16-pixel tiles split each image (the pool sums several partials per image) and the 20 channels in two tiles
    check_plan(blk, plan, seed=2, schedules={at["pw_pool"]: SMALL_TILES, at["gate_ep"]: SMALL_TILES})


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_ep_without_a_pooling_step_pools_itself(dtype):
    blk = _blocks(dtype)["eca_s2"]
    plan = next(c.plan for c in P.rank(blk) if "gate_ep" in _steps(c.plan) and "pw_pool" not in _steps(c.plan))
    check_plan(blk, plan, seed=3)


@pytest.mark.parametrize("name", ["eca_s2", "se"])
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
def test_patch_fuses_ecaresnet26t_blocks_and_matches_in_eval():
    model = timm.create_model("ecaresnet26t", pretrained=False, num_classes=10).eval()
    report = patch(copy.deepcopy(model))
    assert sorted(n for n, _ in report.blocks) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    why = dict((n, w) for n, w in report.left if "eval mode" in w)
    assert sorted(why) == ["layer2.0", "layer3.0", "layer4.0"]
    assert all("AvgPool2d downsample.0 has no block node" in w for w in why.values())
    # the stem and layer1 at a small input: both blocks run the fused gate, the output matches float64
    head = torch.nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = copy.deepcopy(head).double()(x.double())
        ours = copy.deepcopy(head)
        patch(ours)
        got = ours(x)
    assert reference.rel_error(got, want) < 1e-5
    for blk_module in ours[4]:
        blk, plan = last_plan(blk_module)
        assert [s.kind for s in plan.steps][-2:] == ["pw_pool", "gate_ep"], plan.describe()


def _eca_resnet_stage() -> torch.nn.Module:
    """ecaresnet26t's first stage, narrow: timm's ResNet with its deep-tiered, average-down, ECA settings."""
    model = ResNet(
        block=Bottleneck,
        layers=(2, 1, 1, 1),
        channels=(8, 8, 8, 8),
        stem_width=8,
        stem_type="deep_tiered",
        avg_down=True,
        block_args=dict(attn_layer="eca"),
        num_classes=10,
    )
    return model.layer1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_three_sgd_steps_of_an_eca_resnet_stage_match_unpatched(training):
    check_three_sgd_steps(_eca_resnet_stage, (2, 16, 5, 5), (2, 32, 5, 5), training)


def test_ecaresnet50d_suite_is_timms_blocks():
    """The suite's blocks are ecaresnet50d's at 224 x 224 (shapes from forward hooks on the meta device), but for the
    stride-2 blocks whose shortcut average-pools."""
    with torch.device("meta"):
        model = timm.create_model("ecaresnet50d", pretrained=False).eval()
    found = []

    def hook(mod, args, _out):
        if not any(isinstance(m, torch.nn.AvgPool2d) for m in mod.modules()):
            x = args[0]
            found.append(
                (x.shape[1], mod.conv3.out_channels, mod.conv1.out_channels, mod.se.conv.kernel_size[0], x.shape[2])
            )

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Bottleneck)]
    model(torch.empty(1, 3, 224, 224, device="meta"))
    for h in handles:
        h.remove()
    want = []
    for e in block_suite("ecaresnet50d", batch=1):
        b = e.block
        shape = (b.c, b.output.c, b.node("conv1")["out"], b.node("attn")["kernel"], b.in_size[0])
        want += [shape] * e.count
    assert sorted(found) == sorted(want) and len(found) == 13


# ---- tuning ----------------------------------------------------------------------------------------------
def test_the_tuner_space_and_prior_cover_the_new_steps():
    from tunerd.schedules.blocks import predict, space
    from tunerd.schedules.device import DeviceLimits

    blk = _blocks()["eca_s2"]
    plan = P.rank(blk)[0].plan
    for kind, i in _steps(plan).items():
        if kind not in ("pw_pool", "gate_ep"):
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
    """Default schedules at ResNet-50 stage 1 and stage 4 sizes (batch 8), 16-bit (wgmma) and fp32 (CUDA cores)."""
    items = []
    for dt in ("bfloat16", "float32"):
        for c, width, size in ((256, 64, 56), (2048, 512, 7)):
            blk = B.bottleneck(n=8, c=c, k=c, width=width, in_size=(size, size), dtype=dt)
            plan = P.rank(blk)[0].plan
            items += [(blk, plan, i, None) for i, s in enumerate(plan.steps) if s.kind in ("pw_pool", "gate_ep")]
    assert len(items) == 8
    for (blk, plan, i, _), r in zip(items, fused.compile_check(items)):
        kind = plan.steps[i].kind
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0, (kind, blk.describe(), r)
        assert r["mma"] == ("wgmma" if kind == "pw_pool" and blk.dtype != "float32" else "fma"), (kind, r)
