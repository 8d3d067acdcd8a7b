"""Schedule option l1_load (issue 13, item 3): the A operand of multi-tap implicit-GEMM fwd and dgrad loaded
L1-allocating (cp.async.ca) instead of L2-only (.cg). Stored schedules keep their keys and ids; the option is
canonical only where it means something; numerics on the interpreter against float64 torch on NaN-poisoned
outputs; the sm_90 build (Triton 3.9) emits LDGSTS.E for A (LDGSTS.E.BYPASS without the option)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
from convcases import Case, run_case
from test_backward import RESNET, _assert_ok, grad_errors

from tunerd.kernels import conv, generator, reference
from tunerd.kernels.backward import Needs
from tunerd.kernels.schedule import Schedule, ScheduleError, canonical, check, default
from tunerd.kernels.spec import conv_spec
from tunerd.schedules import space
from tunerd.schedules.device import DeviceLimits

L1 = Schedule(block_m=16, block_n=16, block_k=16, l1_load=True)
SPEC = conv_spec(n=32, c=64, k=64, in_size=(56, 56), kernel=3, padding=1, dtype="bfloat16")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv, "POISON_OUTPUTS", True)


def test_flag_is_left_out_of_stored_schedules_unless_set():
    s = default(SPEC)
    assert "l1_load" not in s.to_dict() and "l1_load" not in s.to_json()
    on = replace(s, l1_load=True)
    assert Schedule.from_json(on.to_json()) == on and on.to_dict()["l1_load"] is True and on.describe().endswith(" l1")
    with pytest.raises(ScheduleError, match="l1_load must be a bool"):
        Schedule.from_dict({**s.to_dict(), "l1_load": 1})
    # the default rendering is unchanged; the option adds the modifier to the A loads only
    base, l1 = generator.render(SPEC, s).source, generator.render(SPEC, on).source
    assert 'cache_modifier=".ca"' not in base
    assert l1.count('cache_modifier=".ca"') == 1 and l1.count('"l1_load":true,') == 1  # the load, the header
    assert l1.replace(', cache_modifier=".ca"', "").replace('"l1_load":true,', "") == base


def test_canonical_only_where_taps_reread_rows():
    for spec in (
        SPEC.with_(kernel=(1, 1), padding=((0, 0), (0, 0))),  # one tap
        SPEC.with_(op="wgrad"),
        conv_spec(n=2, c=16, k=16, in_size=(8, 8), kernel=3, padding=1, groups=16),  # depthwise
        conv_spec(n=2, c=16, k=16, in_size=(8, 8), kernel=2, stride=2, op="dgrad"),  # one tap per stride phase
    ):
        assert not canonical(spec, L1).l1_load, spec.describe()
        with pytest.raises(ScheduleError, match="l1_load"):
            check(spec, L1)
    assert canonical(SPEC.with_(op="dgrad"), L1).l1_load
    stem = conv_spec(n=2, c=3, k=16, in_size=(16, 16), kernel=7, stride=2, padding=3)
    assert canonical(stem, replace(L1, space_to_depth=True)).l1_load  # the folded 4x4 conv


@pytest.mark.parametrize(
    "case",
    [
        Case(2, 16, 24, (9, 11), 3, padding=1),  # hoisted tap order, tap-validity bits
        Case(2, 20, 16, (7, 9), 3, stride=2, padding=1),  # partial channel block (k mask)
        Case(2, 3, 16, (11, 11), 5, padding=2),  # flat (tap, channel) order
    ],
    ids=str,
)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_forward_matches_float64(case, device):
    sched = replace(L1, k_order="flat" if case.c < 16 else "tap")
    assert run_case(case, "float32", device, schedule=sched) < reference.tolerance("float32")


@pytest.mark.parametrize("epilogue", [{}, RESNET], ids=["plain", "chain"])
def test_dgrad_matches_float64(epilogue):
    case = Case(2, 16, 16, (9, 9), 3, stride=2, padding=1, epilogue=epilogue)
    errs = grad_errors(case, needs=Needs(input=True, weight=False), schedules={"dgrad": L1})
    _assert_ok(errs, "float32")


def test_space_offers_it_for_multi_tap_fwd_and_dgrad_where_triton_keeps_it():
    h100 = DeviceLimits.h100()
    for op in ("fwd", "dgrad"):
        cands = space.space(SPEC.with_(op=op), h100, max_candidates=None)
        assert any(s.l1_load for s in cands) == space.l1_load_honored()
        assert all(canonical(SPEC.with_(op=op), s) == s for s in cands)
    assert not any(s.l1_load for s in space.space(SPEC.with_(op="wgrad"), h100))
    assert not any(s.l1_load for s in space.space(SPEC.with_(kernel=(1, 1), padding=((0, 0), (0, 0))), h100))
    # the interpreter runs l1_load variants exactly as their twins: one per tile shape
    assert not any(s.l1_load for s in space.space(SPEC, DeviceLimits.interpreter()))


_SASS = r"""
import json, sys
from tunerd.kernels import generator, runtime, sass
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import BlockSpec
from tunerd.kernels.validate import example_args
out = []
for line in sys.stdin:
    d = json.loads(line)
    spec, s = BlockSpec.from_dict(d["spec"]), Schedule.from_dict(d["schedule"])
    k = runtime.aot_compile(generator.render(spec, s), example_args(spec), arch=90)
    ops = [i.opcode for i in sass.disassemble(k.asm["cubin"]) if i.base == "LDGSTS"]
    out.append({"bypass": sum(".BYPASS" in o for o in ops), "l1": sum(".BYPASS" not in o for o in ops)})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sm90_build_allocates_the_a_operand_in_l1():
    pairs = [(SPEC.with_(op=op), default(SPEC.with_(op=op))) for op in ("fwd", "dgrad")]
    pairs = [(spec, s2) for spec, s in pairs for s2 in (s, replace(s, l1_load=True))]
    lines = "".join(json.dumps({"spec": p.to_dict(), "schedule": s.to_dict()}) + "\n" for p, s in pairs)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run(
        [sys.executable, "-c", _SASS], input=lines, capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    for base, l1 in (got[0:2], got[2:4]):
        assert base["l1"] == 0 and base["bypass"] > 0  # every copy .cg: L2 only
        if space.l1_load_honored():  # Triton 3.9: the A copies become L1-allocating, B stays .cg
            assert l1["l1"] > 0 and 0 < l1["bypass"] < base["bypass"] and l1["l1"] + l1["bypass"] == base["bypass"]
        else:  # Triton 3.6 drops the modifier: the same copies
            assert l1 == base
