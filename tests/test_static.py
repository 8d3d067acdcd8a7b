"""The static sm_90 audit: resources read from real compiles, the findings it flags, defaults that stay
in registers where the first audit found spills."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import static
from tunerd.kernels import generator
from tunerd.kernels.schedule import Schedule, default, vector_rows
from tunerd.kernels.spec import BlockSpec, conv_spec
from tunerd.kernels.validate import compile_check
from tunerd.schedules import cost
from tunerd.schedules.device import DeviceLimits
from tunerd.schedules.suites import suite

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_audit_writes_rows_summary_and_report(tmp_path):
    doc = static.main(
        ["--suites", "quick", "--passes", "fwd,wgrad", "--top", "1", "--blocks", "", "--out", str(tmp_path)]
    )
    data = json.loads((tmp_path / "static.json").read_text())
    assert data["rows"] == doc["rows"] and data["arch"] == 90
    n_specs = len(suite("quick"))
    assert len(data["rows"]) >= 2 * n_specs + 1  # defaults of both passes, plus model picks
    for r in data["rows"]:
        assert r["ok"], r["error"]
        assert 16 <= r["regs"] <= 255 and r["spill_bytes"] >= 0 and r["occupancy"] >= 1
        assert r["estimate"]["shared"] >= r["shared"]  # the model's bound holds
        assert r["mma"] in ("wgmma", "mma.sync", "fma", "direct")
    assert {r["which"] for r in data["rows"]} >= {"default", "model#1"}
    md = (tmp_path / "static.md").read_text()
    assert "compile only, no GPU timings" in md and "| all fwd |" in md


@pytest.mark.slow
def test_audit_compiles_the_fused_block_steps_of_the_planners_plans():
    rows = static.block_rows(["convnext_t"], ["bfloat16"], 90)
    assert [r["where"] for r in rows] == [f"convnext_t#stage{i}" for i in (1, 2, 3, 4)]
    for r in rows:
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0 and r["loop_sass"]
        if r["where"] in ("convnext_t#stage3", "convnext_t#stage4"):  # 384+ channels: the norm in the depthwise
            assert r["step"] == "dw_ln[dw+ln]" and r["mma"] == "fma"
        else:
            assert r["step"].startswith("convnext[") and r["mma"] in ("wgmma", "mma.sync") and r["loop_mma"]
    md = static.markdown({"arch": 90, "triton": "x", "rows": [], "elapsed_s": 0, "blocks": rows, "summary": {
        "groups": {}, "model": {"regs_estimate_over_actual": None, "shared_upper_bound_holds": 0, "variants": 0,
        "occupancy_exact": 0, "occupancy_over": 0}}})  # fmt: skip
    assert "| convnext_t#stage1 | bfloat16 | convnext[" in md


def test_flags_name_what_costs_speed():
    aligned = conv_spec(n=8, c=64, k=64, in_size=(56, 56), kernel=3, padding=1, dtype="bfloat16")
    clean = dict(spill_bytes=0, mma="wgmma", max_load_bytes=0, cp_async=12)
    assert static.flags(aligned, clean) == []
    bad = dict(spill_bytes=344, mma="fma", max_load_bytes=2, cp_async=0)
    assert static.flags(aligned, bad) == ["spills 344 B", "dot on CUDA cores", "scalar loads on aligned rows"]
    # a C=3 stem cannot vectorize: scalar loads there are expected, not flagged
    stem = conv_spec(n=8, c=3, k=64, in_size=(224, 224), kernel=7, stride=2, padding=3, dtype="bfloat16")
    assert not vector_rows(stem) and static.flags(stem, dict(bad, spill_bytes=0)) == ["dot on CUDA cores"]


def test_blocks_per_sm_allocates_registers_per_warp():
    h100 = DeviceLimits.h100()
    # 168 registers x 128 threads: 3 blocks fit in 64K registers; 255 (rounded to 256): 2
    assert cost.blocks_per_sm(168, 0, 4, h100) == 3
    assert cost.blocks_per_sm(255, 0, 4, h100) == 2
    assert cost.blocks_per_sm(64, 100_000, 4, h100) == 2  # shared memory binds
    assert cost.blocks_per_sm(32, 0, 1, h100) == h100.max_blocks_per_sm


def _find(name, pred, op="fwd"):
    return next(s for s in suite(name, dtype="bfloat16") if pred(s)).with_(op=op)


@pytest.mark.slow
def test_defaults_that_spilled_in_the_first_audit_stay_in_registers():
    # Before: the C=3 stems (flat gathers at 128x64x64, 4 warps), the unaligned C=921/45 video layers
    # (scalar loads at 64x128x64) and the 13x13 depthwise on 7x7 spilled 32..1072 bytes on sm_90.
    # Triton 3.6 (the GPU boxes' version) also spilled the stem's wgrad; both versions are audited.
    specs = [
        _find("resnet50", lambda s: s.c == 3),
        _find("resnet50", lambda s: s.c == 3, op="wgrad"),  # spilled 720 B under Triton 3.6
        _find("video_2plus1d", lambda s: s.c == 3),
        _find("video_2plus1d", lambda s: s.c == 45),
        _find("video_2plus1d", lambda s: s.c == 921 and s.in_size[1] == 7),
        _find("video_2plus1d", lambda s: s.c == 256 and s.k == 921, op="dgrad"),
        _find("replknet31b", lambda s: s.kernel == (13, 13)),
        # the 2026-12-01 audit under Triton 3.9 (ptxas 12.9): 8 bytes (values live across the main loop) in
        # the depthwise wgrad of few channels (one program of channels and taps) at 4 warps, now 2, and the
        # 14-wide k11x1 depthwise fwd at two groups of 8 per row, now one of 16
        _find("mobilenetv2", lambda s: s.kind == "depthwise" and s.c == 32, op="wgrad"),
        _find("inceptionnext_t", lambda s: s.kind == "depthwise" and s.c == 12 and s.kernel == (1, 11), op="wgrad"),
        _find("inceptionnext_t", lambda s: s.kind == "depthwise" and s.c == 48 and s.kernel == (11, 1)),
    ]
    assert [default(s).num_warps for s in specs[-3:]] == [2, 2, 2] and default(specs[-1]).block_k == 16
    results = compile_check([generator.render(s) for s in specs], arch=90)
    for s, r in zip(specs, results):
        assert r["ok"], (s.describe(), r["error"])
        assert r["spill_bytes"] == 0, (s.describe(), r)
    # the check can fail: the old stem schedule still spills
    old = generator.render(
        specs[0], Schedule(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3, k_order="flat")
    )
    assert compile_check([old], arch=90)[0]["spill_bytes"] > 0


def test_issue_model_follows_the_committed_audit():
    """cost.gemm_loop_sass (the model's instruction-issue term) against the SASS the compiler emitted for
    the committed audit's implicit-GEMM rows: refit it when the templates change. Rows whose reduction the
    compiler unrolled whole (loop_unrolled: a small constant trip count) are left out: with every step's address
    math folded they issue about half of what the loop does, and the model keeps the loop's (conservative) cost."""
    newest = max((ROOT / "benchmarks" / "results").glob("*-static-sm90-triton*/static.json"))
    audit = json.loads(newest.read_text())
    errors = []
    for r in audit["rows"]:
        spec = BlockSpec.from_json(r["spec_key"])
        if not r.get("ok") or not r.get("loop_sass") or r.get("loop_unrolled") or spec.kind != "conv":
            continue
        predicted = cost.gemm_loop_sass(spec, Schedule.from_dict(r["schedule"]))
        errors.append(abs(predicted - r["loop_sass"]) / r["loop_sass"])
    assert len(errors) > 200
    assert statistics.median(errors) < 0.15
    assert statistics.quantiles(errors, n=10)[-1] < 0.35
