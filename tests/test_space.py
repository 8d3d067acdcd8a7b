"""Schedule spaces: constraint pruning, dedupe, caps, and the cost model's consistency."""

from dataclasses import replace

import pytest

from tunerd.kernels import generator
from tunerd.kernels import schedule as ks
from tunerd.kernels.schedule import Schedule, is_pow2, next_pow2
from tunerd.kernels.spec import conv_spec
from tunerd.schedules import cost, space
from tunerd.schedules.device import DeviceLimits
from tunerd.schedules.suites import suite

H100 = DeviceLimits.h100()
INTERP = DeviceLimits.interpreter()

SPECS = [
    conv_spec(n=32, c=64, k=64, in_size=(56, 56), kernel=3, padding=1, dtype="bfloat16"),
    conv_spec(n=32, c=256, k=512, in_size=(56, 56), kernel=1, stride=2, dtype="bfloat16"),
    conv_spec(n=32, c=3, k=64, in_size=(224, 224), kernel=7, stride=2, padding=3, dtype="float32"),
    conv_spec(n=32, c=128, k=128, in_size=(28, 28), kernel=3, padding=1, groups=32, dtype="float16"),
    conv_spec(n=32, c=96, k=96, in_size=(56, 56), kernel=7, padding=3, groups=96, dtype="bfloat16"),
    conv_spec(n=8, c=1536, k=1536, in_size=(2048,), kernel=4, padding=((3, 0),), groups=1536, dtype="bfloat16"),
    conv_spec(n=8, c=64, k=64, in_size=(8, 28, 28), kernel=(3, 1, 1), padding=(1, 0, 0), dtype="bfloat16"),
    conv_spec(n=1, c=16, k=16, in_size=(8, 8), kernel=3, padding=1),  # tiny
]


def _ids(specs):
    return [s.describe() for s in specs]


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
@pytest.mark.parametrize("limits", [H100, INTERP], ids=["h100", "interpreter"])
def test_every_candidate_is_legal_canonical_and_fits(spec, limits):
    cands = space.space(spec, limits)
    assert 1 <= len(cands) <= space.DEFAULT_MAX_CANDIDATES
    assert len(set(cands)) == len(cands)
    m, n, _ = spec.gemm_shape()
    for s in cands:
        ks.check(spec, s)  # powers of two, tl.dot >= 16, tile bound
        assert ks.canonical(spec, s) == s
        assert cost.smem_bytes(spec, s) <= limits.smem_per_block
        assert cost.registers_per_thread(spec, s) <= limits.max_regs_per_thread
        assert all(is_pow2(v) for v in (s.block_m, s.block_n, s.block_k, s.num_warps))
        if spec.kind == "conv":  # no tile larger than the problem
            assert s.block_m <= max(16, next_pow2(m)) and s.block_n <= max(16, next_pow2(n))
            assert s.block_k <= max(16, next_pow2(spec.cg * (spec.taps if s.k_order == "flat" else 1)))
        else:
            assert s.block_m <= max(8, next_pow2(spec.out_pixels)) and s.block_n <= max(8, next_pow2(spec.k))


def test_interpreter_space_holds_one_variant_per_tile_shape():
    spec = SPECS[0]
    gpu, cpu = space.build(spec, H100, max_candidates=None), space.build(spec, INTERP, max_candidates=None)
    tiles = {(s.block_m, s.block_n, s.block_k, s.k_order) for s in gpu.candidates}
    assert len(cpu) == len(tiles) < len(gpu)
    assert cpu.pruned["duplicate"] > 0


def test_small_shared_memory_limit_prunes():
    spec = SPECS[1]
    full = space.build(spec, H100, max_candidates=None)
    small = space.build(spec, replace(H100, smem_per_block=16 * 1024), max_candidates=None)
    assert small.pruned["smem"] > full.pruned["smem"]
    assert 0 < len(small) < len(full)
    assert all(cost.smem_bytes(spec, s) <= 16 * 1024 for s in small.candidates)
    assert set(small.candidates) < set(full.candidates)


def test_register_limit_prunes_big_tiles():
    spec = SPECS[1]
    tight = space.build(spec, replace(H100, max_regs_per_thread=96), max_candidates=None)
    full = space.build(spec, H100, max_candidates=None)
    assert tight.pruned["registers"] > full.pruned["registers"] and len(tight) < len(full)
    assert max(s.block_m * s.block_n for s in tight.candidates) < max(s.block_m * s.block_n for s in full.candidates)


def test_cap_keeps_every_tile_shape_then_the_cost_models_best():
    spec = SPECS[0]
    full = space.space(spec, H100, max_candidates=None)
    capped = space.build(spec, H100, max_candidates=80)
    kept = set(capped.candidates)
    assert len(capped) == 80 and capped.pruned["cap"] == len(full) - 80
    shapes = {space.tile_shape(s) for s in full}
    assert {space.tile_shape(s) for s in capped.candidates} == shapes  # 45 tilings, all represented
    # each tiling by its best-predicted launch knobs
    representatives = {
        min((s for s in full if space.tile_shape(s) == sh), key=lambda s: cost.predict(spec, s, H100)) for sh in shapes
    }
    assert representatives <= kept
    worst_fill = max(cost.predict(spec, s, H100) for s in kept - representatives)
    assert all(cost.predict(spec, d, H100) >= worst_fill for d in full if d not in kept)  # the rest: best first
    assert [s for s in full if s in kept] == capped.candidates  # enumeration order kept
    tiny = space.build(spec, H100, max_candidates=10)  # fewer slots than tilings: the best tilings
    assert len({space.tile_shape(s) for s in tiny.candidates}) == 10
    with pytest.raises(ValueError, match="max_candidates"):
        space.space(spec, H100, max_candidates=0)


def test_knob_variety_and_rules():
    spec = SPECS[2]  # RGB stem: C/g = 3, so the flat reduction order is in the space
    cands = space.space(spec, H100, max_candidates=None)
    assert {s.k_order for s in cands} == {"tap", "flat"}
    assert {s.num_warps for s in cands} == {2, 4, 8} and {s.num_stages for s in cands} == {2, 3, 4}
    assert {s.group_m for s in cands} == {1, 8}
    pointwise = conv_spec(n=2, c=64, k=64, in_size=(8, 8), kernel=1)  # one tap: tap order only, 1 step
    pw = space.space(pointwise, H100, max_candidates=None)
    assert {s.k_order for s in pw} == {"tap"}
    assert all(s.split_k == 1 or space.split_candidate(pointwise, s, H100) for s in pw)  # splits: small grids
    assert all(s.num_stages <= cost.reduction_steps(pointwise, s) + 1 for s in pw)


def test_wgrad_space_varies_split_k():
    spec = conv_spec(n=32, c=64, k=64, in_size=(28, 28), kernel=3, padding=1, dtype="bfloat16", op="wgrad")
    cands = space.space(spec, H100)
    assert len({s.split_k for s in cands}) > 1
    for s in cands:
        ks.check(spec, s)


@pytest.mark.parametrize(
    "name", ["resnet50", "mobilenetv2", "convnext_t", "replknet31b", "mamba_short_conv", "video_2plus1d", "quick"]
)
def test_suite_spaces_are_sane_and_render(name):
    specs = suite(name)
    for spec in specs[:: max(1, len(specs) // 4)]:
        cands = space.space(spec, H100)
        least = 2 if name == "quick" else 10  # quick's specs are a few tiles wide
        assert least <= len(cands) <= space.DEFAULT_MAX_CANDIDATES, (spec.describe(), len(cands))
        for s in cands[:: max(1, len(cands) // 3)]:
            v = generator.render(spec, s)
            assert v.schedule == s  # already canonical: the space's schedule is the one measured


def test_cost_model_is_bounded_by_the_roofline():
    for spec in SPECS[:-1]:
        floor = cost.roofline_seconds(spec, H100)
        for s in space.space(spec, H100)[::7]:
            t = cost.predict(spec, s, H100)
            assert t >= floor
            assert 0 < cost.roofline_fraction(spec, t, H100) <= 1
    with pytest.raises(ValueError, match="positive"):
        cost.roofline_fraction(SPECS[0], 0.0, H100)


def test_cost_model_prefers_sane_tiles():
    spec = SPECS[0]
    tiny = Schedule(block_m=16, block_n=16, block_k=16, num_warps=2, num_stages=2)
    good = Schedule(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3)
    assert cost.predict(spec, good, H100) < cost.predict(spec, tiny, H100)
    # interpreter: time grows with programs x steps, as measured
    assert cost.predict(spec, good, INTERP) < cost.predict(spec, tiny, INTERP)
    e = cost.estimate(spec, good, H100)
    assert e.programs == -(-spec.out_pixels // 128) and e.padded_flops >= spec.flops


def test_limits_profiles():
    assert DeviceLimits.detect().interpreted  # this CPU box runs the interpreter
    assert INTERP.smem_per_block == H100.smem_per_block and not H100.interpreted
    with pytest.raises(RuntimeError, match="no CUDA"):
        DeviceLimits.from_cuda()
