"""MBConv with squeeze-excite or ECA on the block compiler: the expand_dw (pointwise expand recomputed per depthwise
tap, gate pool partial sums in the epilogue), se_pw (gate applied in the project GEMM's prologue) and mbconv (the
whole attention-free block in one launch) steps. Numerics against float64 with NaN-poisoned outputs and pool
buffers, on odd sizes, in three dtypes; planner choices and modelled bytes; sm_90 compile-validity; tuning."""

import pytest
import torch
from blockcheck import check_plan, inputs

from tunerd.kernels import block as B
from tunerd.kernels import block_reference, fused
from tunerd.kernels import plan as P
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import SpecError

NEW_KINDS = ("expand_dw", "mbconv", "se_pw")

# C not a multiple of 16, H*W not a multiple of any tile, stride-2 depthwise, expansion 1/4/6, with and without
# SE / ECA and residual
CASES = {
    "e6_se_res": dict(n=2, c=10, k=10, in_size=(7, 5), expansion=6),
    "e4_se_s2": dict(n=1, c=12, k=18, in_size=(9, 7), expansion=4, stride=2),
    "e1_se": dict(n=2, c=17, k=20, in_size=(5, 6), expansion=1),
    "e6_eca_res_k5": dict(n=1, c=10, k=10, in_size=(6, 7), expansion=6, kernel=5, attention="eca"),
    "e4_eca_s2": dict(n=2, c=9, k=12, in_size=(7, 7), expansion=4, stride=2, attention="eca", act="hardswish"),
    "e6_none_res_relu6": dict(n=2, c=10, k=10, in_size=(7, 5), expansion=6, se_ratio=None, act="relu6"),
    "e4_none_s2": dict(n=1, c=12, k=20, in_size=(9, 7), expansion=4, stride=2, attention=None),
}


def _block(name, dtype):
    return B.mbconv(**CASES[name], dtype=dtype)


def _new_kind_plans(blk):
    """The cheapest modelled plan that uses each new step kind, plus the planner's favourite."""
    ranked = [c.plan for c in P.rank(blk)]
    out = [ranked[0]]
    for kind in NEW_KINDS:
        out += [p for p in ranked if any(s.kind == kind for s in p.steps)][:1]
    return list(dict.fromkeys(out))


# ---- description and planner -------------------------------------------------------------------------------
def test_eca_node_and_constructor():
    blk = _block("e6_eca_res_k5", "float32")
    assert [nd.op for nd in blk.nodes][6] == "eca" and blk.node("eca")["kernel"] == B.adaptive_eca_kernel(60) == 3
    assert blk.param_shapes()["eca.weight"] == (3,)
    assert B.Block.from_json(blk.to_json()) == blk
    assert B.mbconv(n=1, c=8, k=8, in_size=(4, 4), attention="eca", eca_kernel=5).node("eca")["kernel"] == 5
    assert [B.adaptive_eca_kernel(c) for c in (64, 256, 512, 2048)] == [3, 5, 5, 7]  # timm EcaModule's sizes
    with pytest.raises(SpecError, match="eca kernel must be odd"):
        B.mbconv(n=1, c=8, k=8, in_size=(4, 4), attention="eca", eca_kernel=4)
    with pytest.raises(SpecError, match="attention must be"):
        B.mbconv(n=1, c=8, k=8, in_size=(4, 4), attention="cbam")


def test_gate_reference_is_timm_eca_and_se():
    """block_reference.gate is what timm's EcaModule and SqueezeExcite compute."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 5, 3, dtype=torch.float64, generator=g)
    eca = B.node("eca", "eca", ["x"], kernel=5)
    w = torch.randn(5, dtype=torch.float64, generator=g)
    want = x * torch.sigmoid(
        torch.nn.functional.conv1d(x.mean((2, 3)).view(2, 1, -1), w.view(1, 1, 5), padding=2)
    ).view(2, -1, 1, 1)
    assert torch.allclose(block_reference.apply_node(eca, [x], {"eca.weight": w}), want, rtol=0, atol=1e-14)
    se = B.node("se", "se", ["x"], hidden=6, act="silu")
    p = {
        "se.w1": torch.randn(6, 24, dtype=torch.float64, generator=g),
        "se.b1": torch.randn(6, dtype=torch.float64, generator=g),
        "se.w2": torch.randn(24, 6, dtype=torch.float64, generator=g),
        "se.b2": torch.randn(24, dtype=torch.float64, generator=g),
    }
    s = torch.nn.functional.silu(x.mean((2, 3)) @ p["se.w1"].t() + p["se.b1"])
    want = x * torch.sigmoid(s @ p["se.w2"].t() + p["se.b2"])[:, :, None, None]
    assert torch.allclose(block_reference.apply_node(se, [x], p), want, rtol=0, atol=1e-14)


def test_planner_picks_fused_mbconv_plans():
    se = B.mbconv(n=8, c=24, k=24, in_size=(56, 56), dtype="bfloat16")
    best = P.rank(se)[0]
    assert best.plan.describe() == (
        "expand_dw[expand+expand_bn+expand_act+dw+dw_bn+dw_act] | se_pw[se+project+project_bn+res]"
    )
    assert best.launches == 3  # expand_dw, the gate's map, the gated GEMM
    assert best.bytes <= 0.5 * P.cost(se, P.unfused(se)).bytes
    eca = B.mbconv(n=8, c=24, k=24, in_size=(56, 56), attention="eca", dtype="bfloat16")
    assert [s.kind for s in P.best(eca).steps] == ["expand_dw", "se_pw"]
    v2 = B.mbconv(n=8, c=24, k=24, in_size=(56, 56), se_ratio=None, act="relu6", dtype="bfloat16")
    assert P.best(v2).describe() == "mbconv[expand+expand_bn+expand_act+dw+dw_bn+dw_act+project+project_bn+res]"
    assert P.rank(v2)[0].bytes <= 0.1 * P.cost(v2, P.unfused(v2)).bytes
    # the expand_dw step's pool is what makes se_pw cheap: without it the gate re-reads the depthwise output
    conv_first = P.Plan(
        steps=(
            P.Step("conv", ("expand", "expand_bn", "expand_act")),
            P.Step("conv", ("dw", "dw_bn", "dw_act")),
            P.Step("se_pw", ("se", "project", "project_bn", "res")),
        )
    )
    pooled = P.Plan(
        steps=(P.Step("conv", conv_first.steps[0].nodes), P.Step("expand_dw", conv_first.steps[1].nodes))
        + conv_first.steps[2:]
    )
    hid = 8 * 144 * 56 * 56 * 2
    assert P.cost(se, conv_first).steps[2].bytes - P.cost(se, pooled).steps[2].bytes == hid


def test_step_legality():
    blk = _block("e6_se_res", "float32")
    assert P.matches(blk, P.Step("expand_dw", ("dw", "dw_bn", "dw_act")))  # feeds the gate: pools
    assert P.matches(blk, P.Step("expand_dw", ("expand", "expand_bn", "expand_act", "dw", "dw_bn")))  # act apart
    assert not P.matches(blk, P.Step("expand_dw", ("expand", "expand_bn", "expand_act")))  # no depthwise
    assert not P.matches(blk, P.Step("expand_dw", ("expand", "expand_act", "dw")))  # not a chain
    assert not P.matches(blk, P.Step("mbconv", ("expand", "expand_bn", "expand_act", "dw", "dw_bn", "dw_act")))
    assert not P.matches(blk, P.Step("se_pw", ("se", "project", "res")))  # skips the BN: not a chain
    plain = _block("e6_none_res_relu6", "float32")
    assert not P.matches(plain, P.Step("expand_dw", ("dw", "dw_bn", "dw_act")))  # no gate, no expand: just a conv
    assert not P.matches(plain, P.Step("mbconv", ("dw", "dw_bn", "dw_act", "project", "project_bn", "res")))
    e1 = B.mbconv(n=1, c=8, k=8, in_size=(4, 4), expansion=1, se_ratio=None)
    assert not any(s.kind == "mbconv" for p in P.plans(e1) for s in p.steps)  # that is a separable step


# ---- numerics ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_plans_match_float64(name, dtype):
    blk = _block(name, dtype)
    plans = _new_kind_plans(blk)
    assert any(s.kind in NEW_KINDS for p in plans for s in p.steps)
    for plan in plans:
        check_plan(blk, plan, seed=len(name))


def test_pool_partials_across_tiles_and_schedules(dtype="bfloat16"):
    """Several pixel tiles per image (the last one partial) and narrow channel tiles: the pool's partial sums,
    the chunked hidden loop and the gated GEMM's K loop all take more than one step."""
    blk = _block("e6_se_res", dtype)  # 35 pixels per image, 60 hidden channels
    plan = P.best(blk)
    assert [s.kind for s in plan.steps] == ["expand_dw", "se_pw"]
    s0, s1 = Schedule(block_m=16, block_k=32, num_warps=4), Schedule(block_m=32, block_n=16, block_k=16)
    check_plan(blk, plan, seed=5, schedules={0: s0, 1: s1})
    v2 = _block("e6_none_res_relu6", dtype)
    assert [s.kind for s in P.best(v2).steps] == ["mbconv"]
    check_plan(v2, P.best(v2), seed=6, schedules={0: Schedule(block_m=64, block_n=16, block_k=16, num_warps=4)})


def test_pool_buffer_is_required_and_written():
    blk = _block("e6_se_res", "float32")
    fs = fused.FusedSpec(blk, P.best(blk).steps[0])
    assert fused.pooled_output(fs)
    params, x = inputs(blk, 0)
    with pytest.raises(SpecError, match="pool_buffer"):
        fused.fused_args(fs, params, {"x": x}, torch.empty(0))
    s = fused.resolve(fs, Schedule(block_m=16, block_k=16, num_warps=4))
    pool = fused.pool_buffer(fs, s, x.device).fill_(float("nan"))
    h = torch.full((blk.n, 7, 5, 60), float("nan"))
    fused.runtime.launch(fused.render(fs, s), fused.fused_args(fs, params, {"x": x}, h, pool), x.device)
    assert pool.shape == (2, 3, 60) and torch.isfinite(pool).all() and torch.isfinite(h).all()
    # the partial sums are the output's per-image channel sums
    assert torch.allclose(pool.sum(1), h.sum((1, 2)), rtol=1e-5, atol=1e-4)


# ---- compile-validity -----------------------------------------------------------------------------------
def _audit_items():
    """Default schedules of every new step at EfficientNet-B0 / MobileNetV2 sizes (also steps the planner does not
    pick first, e.g. fp32 expand_dw whose recomputed expand runs on CUDA cores)."""
    items = []
    for dt in ("bfloat16", "float32"):
        for blk in (
            B.mbconv(n=8, c=24, k=24, in_size=(56, 56), dtype=dt),
            B.mbconv(n=8, c=40, k=40, in_size=(28, 28), kernel=5, attention="eca", dtype=dt),
            B.mbconv(n=8, c=32, k=16, in_size=(112, 112), expansion=1, dtype=dt),
            B.mbconv(n=8, c=24, k=24, in_size=(56, 56), se_ratio=None, act="relu6", dtype=dt),
            B.mbconv(n=8, c=40, k=40, in_size=(28, 28), kernel=5, se_ratio=None, act="hardswish", dtype=dt),
        ):
            ranked = [c.plan for c in P.rank(blk)]
            with_expand = [p for p in ranked if p.steps[0].kind in ("expand_dw", "mbconv")][:1]
            for plan in _new_kind_plans(blk) + with_expand:
                for i, s in enumerate(plan.steps):
                    if s.kind in NEW_KINDS and not any(s == it[1].steps[it[2]] and blk == it[0] for it in items):
                        items.append((blk, plan, i, None))
    return items


@pytest.mark.slow
def test_new_step_defaults_compile_for_sm90_without_spills():
    items = _audit_items()
    assert {it[1].steps[it[2]].kind for it in items} == set(NEW_KINDS)
    for (blk, plan, i, _), r in zip(items, fused.compile_check(items)):
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0, (plan.steps[i].kind, blk.describe(), r)
        fs = fused.FusedSpec(blk, plan.steps[i])
        gemm = fs.step.kind != "expand_dw" or fs.parts()["expand"] is not None  # a depthwise alone has no dot
        assert r["mma"] == ("wgmma" if gemm and blk.dtype != "float32" else "fma"), (plan.steps[i].kind, r)


# ---- tuning ---------------------------------------------------------------------------------------------
def test_space_and_prior_cover_the_new_steps():
    from tunerd.schedules.blocks import predict, searched_step, space
    from tunerd.schedules.device import DeviceLimits

    h100 = DeviceLimits.h100()
    se = B.mbconv(n=8, c=24, k=24, in_size=(56, 56), dtype="bfloat16")
    # the search varies the costlier launch: expand_dw (writes the 6x hidden) rather than the gated GEMM
    assert searched_step(P.best(se)) == 0 and searched_step(P.best(se), se) == 0
    swapped = P.Plan(steps=(P.Step("conv", P.best(se).steps[0].nodes), P.best(se).steps[1]))
    assert searched_step(swapped, se) == 1
    v2 = B.mbconv(n=8, c=24, k=24, in_size=(56, 56), se_ratio=None, dtype="bfloat16")
    for blk, i in ((se, 0), (se, 1), (v2, 0)):
        fs = fused.FusedSpec(blk, P.best(blk).steps[i])
        cands = space(fs, None)
        assert cands[0] == fused.default_schedule(fs) and len(set(cands)) == len(cands) > 8
        for s in cands:
            fused.check_schedule(fs, s)
            assert predict(fs, s, h100) > 0
    fs = fused.FusedSpec(se, P.best(se).steps[1])  # the gated GEMM: 16-wide output tiles re-read the input
    narrow, wide = (Schedule(block_m=64, block_n=bn, block_k=32, num_warps=4) for bn in (16, 32))
    assert predict(fs, narrow, h100) > predict(fs, wide, h100)


def test_tuning_searches_mbconv_plans():
    from tunerd.schedules.blocks import BlockHarness, tune_block

    blk = B.mbconv(n=1, c=10, k=10, in_size=(5, 6), expansion=4, dtype="bfloat16")
    with BlockHarness(reps=1, timeout_s=300) as h:
        res = tune_block(blk, budget_trials=6, harness=h, max_plans=2)
    assert res.best is not None and res.statuses == {"ok": len(res.trials)}
    kinds = {s.kind for t in res.trials for s in t.plan.steps}
    assert {"expand_dw", "se_pw"} <= kinds and P.unfused(blk) in {t.plan for t in res.trials}
    per_plan: dict = {}
    for t in res.trials:  # the schedule search ran over a fused step
        per_plan.setdefault(t.plan, set()).add(tuple(sorted((i, s.to_json()) for i, s in t.schedules.items())))
    assert max(len(v) for v in per_plan.values()) > 1


# ---- GPU twins -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_plans_match_float64_cuda(name, dtype):
    blk = _block(name, dtype)
    for plan in _new_kind_plans(blk):
        check_plan(blk, plan, seed=len(name), device="cuda")


@pytest.mark.gpu
def test_efficientnet_b0_blocks_cuda():
    for dt in ("bfloat16", "float16"):
        for blk in (
            B.mbconv(n=8, c=24, k=24, in_size=(56, 56), dtype=dt),
            B.mbconv(n=8, c=40, k=40, in_size=(28, 28), kernel=5, dtype=dt),
            B.mbconv(n=8, c=24, k=24, in_size=(56, 56), se_ratio=None, act="relu6", dtype=dt),
            B.mbconv(n=8, c=40, k=40, in_size=(28, 28), kernel=5, se_ratio=None, act="hardswish", dtype=dt),
        ):
            ranked = [c.plan for c in P.rank(blk)]
            with_expand = [p for p in ranked if p.steps[0].kind in ("expand_dw", "mbconv")][:1]
            for plan in _new_kind_plans(blk) + with_expand:
                check_plan(blk, plan, device="cuda")


def test_tuning_refines_every_fused_step_of_the_winning_plan():
    """Coordinate descent after the plan search: the winner's other fused steps are searched too, each with
    the steps already tuned held at their best (a harness whose timings make one schedule per step best)."""
    from tunerd.schedules.blocks import tune_block
    from tunerd.schedules.trial import Trial

    blk = B.mbconv(n=1, c=10, k=10, in_size=(5, 6), expansion=4, attention="se", dtype="bfloat16")
    two = P.best(blk)
    fused_steps = [i for i, s in enumerate(two.steps) if s.kind in P.FUSED]
    assert len(fused_steps) == 2
    defaults = {i: fused.default_schedule(fused.FusedSpec(blk, two.steps[i])) for i in fused_steps}

    class Harness:  # fused plans beat the unfused one; any non-default schedule of a step saves 1 ms
        reps, device_name = 1, "fake"
        seen: list = []

        def measure(self, block, plan, schedules, reps):
            self.seen.append((plan, dict(schedules)))
            ms = 10.0 if plan == P.unfused(block) else 5.0
            ms -= sum(1.0 for i, s in schedules.items() if s != defaults.get(i))
            sched = next(iter(schedules.values()), Schedule())
            return Trial(sched, f"v{len(self.seen)}", "", "ok", median_ms=ms, reps=reps, rel_error=0.0, max_error=0.0)

        def close(self):
            pass

    h = Harness()
    res = tune_block(blk, budget_trials=4, harness=h, max_plans=1, refine_trials=2)
    assert res.best is not None and res.best.plan == two
    assert sorted(res.best.schedules) == fused_steps  # both steps carry a tuned schedule
    assert all(res.best.schedules[i] != defaults[i] for i in fused_steps) and res.best.trial.median_ms == 3.0
    assert tune_block(blk, budget_trials=4, harness=Harness(), max_plans=1, refine_trials=0).best.trial.median_ms == 4.0
