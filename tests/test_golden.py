"""The generator's output under review: golden Triton sources of representative specs, and its template registry.

A template change shows up as a diff of tests/golden/*.py. After an intended change, regenerate them with

    TUNERD_UPDATE_GOLDEN=1 python -m pytest -q -p no:cacheprovider tests/test_golden.py

and commit the new files with the change (bump GENERATOR_VERSION when kernels change; see CONTRIBUTING.md).
Explicit schedules keep these sources independent of the default heuristic.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from tunerd.kernels import generator
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import Epilogue, SpecError, conv_spec

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TUNERD_UPDATE_GOLDEN") == "1"

FULL_CHAIN = Epilogue(bias=True, affine=True, activation="relu", residual="pre", layer_scale=True)
CASES = {
    # ResNet 3x3 with the whole epilogue chain, bf16
    "conv2d_fwd_3x3_chain_bf16": (
        conv_spec(n=2, c=64, k=64, in_size=(14, 14), kernel=3, padding=1, dtype="bfloat16", epilogue=FULL_CHAIN),
        Schedule(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3),
    ),
    # 1x1 pointwise fast path, fp32 tf32
    "conv2d_fwd_1x1_gelu_tf32": (
        conv_spec(n=2, c=96, k=384, in_size=(7, 7), kernel=1, precision="tf32", epilogue=Epilogue(activation="gelu")),
        Schedule(block_m=32, block_n=128, block_k=32),
    ),
    # RGB stem 7x7 stride 2, flattened reduction
    "conv2d_fwd_stem_7x7s2_flat_fp16": (
        conv_spec(n=1, c=3, k=64, in_size=(32, 32), kernel=7, stride=2, padding=3, dtype="float16"),
        Schedule(block_m=64, block_n=64, block_k=32, k_order="flat"),
    ),
    # grouped, dilated conv2d
    "conv2d_fwd_grouped_dilated": (
        conv_spec(n=1, c=64, k=64, in_size=(16, 16), kernel=3, padding=2, dilation=2, groups=4),
        Schedule(block_m=32, block_n=16, block_k=16),
    ),
    # ConvNeXt depthwise 7x7 with layer scale + residual
    "depthwise2d_fwd_7x7_layerscale": (
        conv_spec(
            n=1,
            c=96,
            k=96,
            in_size=(14, 14),
            kernel=7,
            padding=3,
            groups=96,
            epilogue=Epilogue(layer_scale=True, residual="post"),
        ),
        Schedule(block_m=32, block_n=32),
    ),
    # Mamba causal short conv1d
    "depthwise1d_fwd_causal_k4_silu": (
        conv_spec(
            n=2,
            c=64,
            k=64,
            in_size=(32,),
            kernel=4,
            padding=((3, 0),),
            groups=64,
            epilogue=Epilogue(bias=True, activation="silu"),
        ),
        Schedule(block_m=32, block_n=64),
    ),
    # video conv3d
    "conv3d_fwd_3x3x3": (
        conv_spec(n=1, c=16, k=32, in_size=(4, 8, 8), kernel=3, padding=1),
        Schedule(block_m=32, block_n=32, block_k=16),
    ),
    # dgrad through a stride-2 conv (phase decomposition) with an activation gradient
    "conv2d_dgrad_s2_relu": (
        conv_spec(
            n=1,
            c=32,
            k=64,
            in_size=(16, 16),
            kernel=3,
            stride=2,
            padding=1,
            op="dgrad",
            epilogue=Epilogue(activation="relu"),
        ),
        Schedule(block_m=32, block_n=32, block_k=32),
    ),
    # wgrad split-K with bias gradient
    "conv2d_wgrad_splitk_bias": (
        conv_spec(n=2, c=32, k=32, in_size=(8, 8), kernel=3, padding=1, op="wgrad", epilogue=Epilogue(bias=True)),
        Schedule(block_m=32, block_n=32, block_k=32, split_k=4),
    ),
    # depthwise wgrad
    "depthwise2d_wgrad_3x3": (
        conv_spec(n=2, c=32, k=32, in_size=(8, 8), kernel=3, padding=1, groups=32, op="wgrad"),
        Schedule(block_m=32, block_n=32, block_k=16, split_k=2),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_source(name):
    spec, schedule = CASES[name]
    source = generator.render(spec, schedule).source
    path = GOLDEN / f"{name}.py"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(source)
    assert path.exists(), f"no golden file {path}: run with TUNERD_UPDATE_GOLDEN=1"
    assert source == path.read_text(), (
        f"{name}: the rendered source differs from {path}; if the template change is "
        f"intended, regenerate with TUNERD_UPDATE_GOLDEN=1 and review the diff"
    )


def test_no_stale_golden_files():
    stale = sorted(p.name for p in GOLDEN.glob("*.py") if p.stem not in CASES)
    if UPDATE:
        for name in stale:
            (GOLDEN / name).unlink()
        stale = []
    assert not stale, f"golden files without a case: {stale}"


def test_register_replaces_a_template_and_clears_the_render_cache():
    spec, schedule = CASES["conv3d_fwd_3x3x3"]
    original = generator.TEMPLATES[("conv", "fwd")]
    before = generator.render(spec, schedule)
    seen = []

    def context(s, sch):
        seen.append(s)
        return original.context(s, sch)

    try:
        generator.register("conv", "fwd", replace(original, context=context, grid=lambda s, sch: (7, 1)))
        after = generator.render(spec, schedule)  # not the cached variant: the new template ran
        assert seen == [spec] and after.grid == (7, 1) and after.source == before.source
    finally:
        generator.register("conv", "fwd", original)
    assert generator.render(spec, schedule).grid == before.grid


def test_a_missing_template_is_a_clear_error(monkeypatch):
    spec, schedule = CASES["depthwise2d_wgrad_3x3"]
    monkeypatch.delitem(generator.TEMPLATES, ("depthwise", "wgrad"))
    with pytest.raises(SpecError, match="no generator for kind='depthwise' op='wgrad'"):
        generator.render(spec, schedule)
