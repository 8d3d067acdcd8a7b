"""Block compiler: descriptions, the planner, fused templates (numerics on the interpreter against a float64
reference with NaN-poisoned outputs, compile-validity for sm_90) and tuning over plan x schedule."""

import json

import pytest
import torch
from blockcheck import check_plan

from tunerd.kernels import block as B
from tunerd.kernels import block_reference, fused, reference
from tunerd.kernels import plan as P
from tunerd.kernels.schedule import Schedule, ScheduleError, is_pow2
from tunerd.kernels.spec import SpecError


# ---- descriptions --------------------------------------------------------------------------------
def test_block_round_trips_and_keys_canonically():
    for blk in (
        B.separable(n=2, c=19, k=23, in_size=(7, 9), stride=2),
        B.convnext(n=1, c=20, in_size=(6, 5)),
        B.mbconv(n=1, c=12, k=16, in_size=(5, 6), expansion=4, stride=2),
    ):
        again = B.Block.from_json(blk.to_json())
        assert again == blk and hash(again) == hash(blk) and again.key == blk.key
        assert json.loads(blk.to_json())["kind"] == "block"
        # field order in the JSON does not matter, the key is canonical
        d = json.loads(blk.to_json())
        shuffled = {k: d[k] for k in reversed(list(d))}
        assert B.Block.from_dict(shuffled).key == blk.key
    assert B.convnext(n=1, c=20, in_size=(6, 5)).key != B.convnext(n=1, c=20, in_size=(6, 5), eps=1e-5).key


def test_block_shapes_and_params():
    blk = B.mbconv(n=2, c=12, k=16, in_size=(9, 7), expansion=6, stride=2)
    assert blk.output == B.Shape(16, (5, 4))
    ps = blk.param_shapes()
    assert ps["expand.weight"] == (72, 12, 1, 1) and ps["dw.weight"] == (72, 1, 3, 3)
    assert ps["se.w1"] == (3, 72) and ps["se.w2"] == (72, 3) and ps["project_bn.scale"] == (16,)
    assert not any(nd.op == "add" for nd in blk.nodes)  # stride 2: no residual
    assert [nd.op for nd in B.mbconv(n=1, c=8, k=8, in_size=(4, 4), expansion=1, se_ratio=None).nodes] == [
        "conv",
        "bn",
        "act",
        "conv",
        "bn",
        "add",
    ]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(extra=1), "unknown block fields"),
        (lambda d: d.pop("nodes"), "missing block fields"),
        (lambda d: d["nodes"][0].update(foo=1), "unknown conv fields"),
        (lambda d: d["nodes"][0].pop("out"), "needs field 'out'"),
        (lambda d: d["nodes"][1].update(op="norm"), "unknown op"),
        (lambda d: d["nodes"][1].update(inputs=["nope"]), "not an earlier node"),
        (lambda d: d["nodes"][1].update(name="dw"), "duplicate node name"),
        (lambda d: d["nodes"][1].update(eps=0), "eps must be a float"),
        (lambda d: d["nodes"][3].update(fn="swish"), "activation 'swish'"),
        (lambda d: d["nodes"][4].update(out=7), "add of mismatched shapes"),
        (lambda d: d["nodes"][0].update(groups=7), "divisible by groups"),
        (lambda d: d["nodes"][-1].update(inputs=["gamma"]), "takes 2 input"),
        (lambda d: d.update(in_size=[5]), "blocks are 2-D"),
        (lambda d: d["nodes"][2].update(inputs=["dw"]), "never used"),
    ],
)
def test_block_errors_are_specific(mutate, message):
    d = json.loads(B.convnext(n=1, c=20, in_size=(6, 5)).to_json())
    mutate(d)
    with pytest.raises(SpecError, match=message):
        B.Block.from_dict(d)


def test_split_concat_shapes():
    nodes = (
        B.node("a", "split", ["x"], start=0, size=5),
        B.node("b", "split", ["x"], start=5, size=3),
        B.node("bb", "act", ["b"], fn="relu"),
        B.node("cat", "concat", ["a", "bb"]),
    )
    blk = B.Block(n=1, c=8, in_size=(3, 3), nodes=nodes)
    assert blk.output.c == 8
    with pytest.raises(SpecError, match="exceed"):
        B.Block(n=1, c=8, in_size=(3, 3), nodes=(B.node("a", "split", ["x"], start=4, size=5),))
    # split/concat run as ops; the plan is every node alone
    assert [s.kind for s in P.best(blk).steps] == ["op"] * 4
    x = torch.randn(1, 8, 3, 3)
    y = fused.run_plan(blk, {}, x)
    assert torch.equal(y, torch.cat([x[:, :5], torch.relu(x[:, 5:])], 1))


# ---- planner --------------------------------------------------------------------------------------
def test_planner_enumerates_legal_plans():
    conv = B.convnext(n=1, c=20, in_size=(6, 5))
    plans = P.plans(conv)
    descr = {p.describe() for p in plans}
    assert P.unfused(conv) in plans
    assert "convnext[dw+ln+pw1+act+pw2+gamma+res]" in descr
    assert "conv[dw] | mlp[ln+pw1+act+pw2+gamma+res]" in descr
    assert len(descr) == len(plans)
    for p in plans:
        P.check(conv, p)
        assert [n for s in p.steps for n in s.nodes] == [nd.name for nd in conv.nodes]
    ranked = P.rank(conv)
    assert ranked[0].plan.describe() == "convnext[dw+ln+pw1+act+pw2+gamma+res]"
    assert ranked[0].bytes <= 0.5 * P.cost(conv, P.unfused(conv)).bytes
    # too wide to keep a row on chip: no mlp / convnext step
    wide = B.convnext(n=1, c=384, in_size=(4, 4))
    assert not any(s.kind in ("mlp", "convnext") for p in P.plans(wide) for s in p.steps)
    sep = B.separable(n=1, c=19, k=23, in_size=(7, 9), stride=2)
    assert P.best(sep).describe() == "separable[dw+dw_bn+dw_act+pw+pw_bn+pw_act]"
    mb = B.mbconv(n=1, c=12, k=12, in_size=(5, 6), expansion=4)
    assert P.best(mb).describe() == (
        "expand_dw[expand+expand_bn+expand_act+dw+dw_bn+dw_act] | se_pw[se+project+project_bn+res]"
    )


def test_plan_json_is_checked():
    conv = B.convnext(n=1, c=20, in_size=(6, 5))
    p = P.best(conv)
    assert P.Plan.from_dict(conv, json.loads(p.to_json())) == p
    with pytest.raises(SpecError, match="cover the block's nodes"):
        P.Plan.from_dict(conv, {"steps": [{"kind": "conv", "nodes": ["dw"]}]})
    bad = {
        "steps": [
            {"kind": "separable", "nodes": ["dw", "ln", "pw1"]},
            {"kind": "op", "nodes": ["act"]},
            {"kind": "conv", "nodes": ["pw2", "gamma", "res"]},
        ]
    }
    with pytest.raises(SpecError, match="not a legal separable"):
        P.Plan.from_dict(conv, bad)
    with pytest.raises(SpecError, match="plan must be"):
        P.Plan.from_dict(conv, {"steps": "all"})


# ---- numerics -------------------------------------------------------------------------------------
ODD_BLOCKS = {
    "separable_s2": lambda dt: B.separable(n=2, c=19, k=23, in_size=(7, 9), stride=2, dtype=dt),
    "separable_res": lambda dt: B.separable(
        n=1, c=17, k=17, in_size=(5, 3), kernel=5, act="relu6", pw_act=None, residual=True, dtype=dt
    ),
    "convnext": lambda dt: B.convnext(n=1, c=20, in_size=(6, 5), dtype=dt),
    "mbconv_se": lambda dt: B.mbconv(n=1, c=12, k=12, in_size=(5, 6), expansion=4, dtype=dt),
    "mbconv_s2": lambda dt: B.mbconv(
        n=1, c=10, k=14, in_size=(7, 5), expansion=6, stride=2, se_ratio=None, act="relu6", dtype=dt
    ),
}


@pytest.mark.parametrize("name", sorted(ODD_BLOCKS))
def test_every_plan_matches_float64_fp32(name):
    blk = ODD_BLOCKS[name]("float32")
    plans = P.plans(blk)
    if not any(p.fused for p in plans) or len(plans) > 24:
        # conv/op plans only, or many plans: the planner's favourites, the cheapest plan using each step kind
        # (every fused kind keeps a test) and the unfused plan
        ranked = [c.plan for c in P.rank(blk)]
        kinds = {s.kind for p in ranked for s in p.steps}
        plans = ranked[:3] + [next(p for p in ranked if any(s.kind == k for s in p.steps)) for k in sorted(kinds)]
        plans.append(P.unfused(blk))
    for plan in dict.fromkeys(plans):
        check_plan(blk, plan)


@pytest.mark.parametrize(
    "name, dtype",
    [(n, "bfloat16") for n in sorted(ODD_BLOCKS)] + [("convnext", "float16"), ("separable_s2", "float16")],
)
def test_fused_and_unfused_plans_16bit(name, dtype):
    blk = ODD_BLOCKS[name](dtype)
    plans = [P.best(blk), P.unfused(blk)]
    for plan in dict.fromkeys(plans):
        check_plan(blk, plan, seed=1)


def test_mlp_step_and_schedules_bf16():
    blk = B.convnext(n=2, c=24, in_size=(5, 3), expansion=4, dtype="bfloat16")
    two = P.Plan(steps=(P.Step("conv", ("dw",)), P.Step("mlp", tuple(nd.name for nd in blk.nodes[1:]))))
    P.check(blk, two)
    check_plan(blk, two)
    g = torch.Generator().manual_seed(3)
    params = fused.random_params(blk, "cpu", g)
    x = torch.randn((blk.n, blk.c, *blk.in_size), generator=g).to(torch.bfloat16)
    ref = block_reference.block(blk, params, x)
    # several hidden chunks and pixel tiles: chunked accumulation of the project GEMM
    for s in (Schedule(block_m=16, block_n=16, block_k=16, num_warps=4), Schedule(block_m=32, block_k=32)):
        y = fused.run_plan(blk, params, x, P.best(blk), {0: s}, poison=True)
        assert reference.rel_error(y, ref) < reference.tolerance("bfloat16")


def test_inputs_and_schedules_are_validated():
    blk = B.convnext(n=1, c=20, in_size=(6, 5))
    params = fused.random_params(blk)
    x = torch.randn(1, 20, 6, 5)
    with pytest.raises(SpecError, match="shape"):
        fused.run_plan(blk, params, torch.randn(1, 20, 6, 6))
    with pytest.raises(SpecError, match="dtype"):
        fused.run_plan(blk, params, x.to(torch.bfloat16))
    with pytest.raises(SpecError, match="missing"):
        fused.run_plan(blk, {k: v for k, v in params.items() if k != "ln.bias"}, x)
    fs = fused.FusedSpec(blk, P.best(blk).steps[0])
    with pytest.raises(ScheduleError, match="power of two"):
        fused.render(fs, Schedule(block_m=48))
    with pytest.raises(ScheduleError, match="minimum of 16"):
        fused.render(fs, Schedule(block_m=8))
    with pytest.raises(SpecError, match="not a fused step kind"):
        fused.FusedSpec(blk, P.Step("conv", ("dw",)))


# ---- compile-validity --------------------------------------------------------------------------------
def test_fused_sources_are_static_pow2():
    import re

    for blk in (
        B.separable(n=8, c=96, k=192, in_size=(56, 56), dtype="bfloat16"),
        B.convnext(n=8, c=96, in_size=(56, 56), dtype="bfloat16"),
        B.convnext(n=8, c=192, in_size=(28, 28), dtype="float32"),
    ):
        for plan in P.plans(blk):
            for v in fused.variants(blk, plan):
                for m in re.finditer(r"tl\.arange\(0, (\d+)\)", v.source):
                    assert is_pow2(int(m.group(1)))
                for m in re.finditer(r"tl\.zeros\(\((\d+), (\d+)\)", v.source):
                    assert is_pow2(int(m.group(1))) and is_pow2(int(m.group(2)))
                if "tl.dot" in v.source:
                    assert min(v.schedule.block_m, v.schedule.block_k) >= 16


@pytest.mark.slow
def test_fused_defaults_compile_for_sm90_without_spills():
    items = []
    for blk in (
        B.separable(n=8, c=96, k=192, in_size=(56, 56), dtype="bfloat16"),
        B.convnext(n=8, c=96, in_size=(56, 56), dtype="bfloat16"),
    ):
        items.append((blk, P.best(blk), 0, None))
    fp32 = B.convnext(n=8, c=96, in_size=(56, 56), dtype="float32")
    items.append((fp32, P.best(fp32), 0, None))
    results = fused.compile_check(items)
    for (blk, plan, i, _), r in zip(items, results):
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0, (plan.steps[i].kind, blk.dtype, r)
        assert r["mma"] == ("fma" if blk.dtype == "float32" else "wgmma")


# ---- tuning -------------------------------------------------------------------------------------
def test_tuning_picks_a_plan():
    from tunerd.schedules.blocks import BlockHarness, tune_block

    blk = B.separable(n=1, c=19, k=23, in_size=(5, 6), dtype="bfloat16")
    seen = []
    with BlockHarness(reps=1, timeout_s=120) as h:
        res = tune_block(blk, budget_trials=5, harness=h, max_plans=2, on_trial=seen.append)
    assert res.best is not None and res.best.trial.ok
    assert res.statuses == {"ok": len(res.trials)} and seen == res.trials
    plans = {t.plan for t in res.trials}
    assert P.unfused(blk) in plans and P.best(blk) in plans
    assert res.best.trial.cost == min(t.trial.cost for t in res.trials)
    d = res.to_dict()
    assert d["plan"] == res.best.plan.describe() and d["best"]["modelled_bytes"] > 0
    assert all(t.trial.rel_error < reference.tolerance("bfloat16") for t in res.trials)


def test_fused_space_and_prior():
    from tunerd.schedules.blocks import predict, space
    from tunerd.schedules.device import DeviceLimits

    h100 = DeviceLimits.h100()
    sep = B.separable(n=8, c=96, k=192, in_size=(56, 56), dtype="bfloat16")
    fs = fused.FusedSpec(sep, P.best(sep).steps[0])
    cands = space(fs, None)
    assert cands[0] == fused.default_schedule(fs) and len(set(cands)) == len(cands) > 20
    for s in cands:
        fused.check_schedule(fs, s)
    narrow, wide = (Schedule(block_m=64, block_n=bn, block_k=32, num_warps=4) for bn in (16, 128))
    assert predict(fs, narrow, h100) > predict(fs, wide, h100)  # 12 output tiles recompute the depthwise 12x
    cnx = B.convnext(n=8, c=192, in_size=(28, 28), dtype="bfloat16")
    fc = fused.FusedSpec(cnx, P.best(cnx).steps[0])
    assert all(s.block_m * 256 <= 128 * 256 for s in space(fc, None))
