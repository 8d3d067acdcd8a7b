"""Measurement harness: planted crash, hang, wrong-answer and compile-error kernels run for real in the
isolated worker; each failure is recorded and the next candidate is still measured. Also tune() and resume."""

import json

import pytest

from tunerd.kernels import reference
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import Epilogue, SpecError, conv_spec
from tunerd.schedules.device import INTERPRETER_NAME, DeviceLimits
from tunerd.schedules.harness import Harness, Interrupted, guard, resident_bytes
from tunerd.schedules.space import space
from tunerd.schedules.trial import COMPILE_ERROR, CRASH, OK, TIMEOUT, WRONG, Trial
from tunerd.schedules.tuner import tune

PLANT_SPEC = conv_spec(n=1, c=16, k=16, in_size=(8, 8), kernel=3, padding=1, epilogue=Epilogue(bias=True))
STORE = "tl.store(out_ptr + out_offs, acc.to("
PLANTS = {  # block_m -> how the planted variant's source is broken
    16: lambda src: src.replace(STORE, "tl.store(out_ptr + out_offs, (acc + 0.5).to("),  # wrong values
    32: lambda src: src.replace("mask=mask)", "mask=mask & (offs_m[:, None] > 0))"),  # leaves a row unwritten
    128: lambda src: src + "\nimport os\nos._exit(3)\n",  # dies
    256: lambda src: src + "\nimport ctypes\nctypes.string_at(0)\n",  # segfaults
    8: None,  # below tl.dot's minimum: rejected before anything runs
}
GOOD = Schedule(block_m=64, block_n=16, block_k=16)
TIMEOUT_S = 6.0


def plant(variant):
    if variant.spec != PLANT_SPEC:
        return None
    s = variant.schedule
    if s.group_m == 2:  # loops forever
        return variant.source + "\nwhile True:\n    pass\n"
    if s.group_m == 3:  # a syntax error
        return variant.source.replace("def ", "def def ", 1)
    if s.group_m == 5:  # the module has no kernel of the expected name
        return variant.source.replace(f"def {variant.kernel_name}(", "def renamed(")
    if s.group_m == 6:  # raises at run time inside the interpreter
        return variant.source.replace("acc = tl.zeros", "acc = tl.no_such_function")
    if s.group_m == 7:  # grabs far more memory than the worker may use, touching every page
        return variant.source + "\nhog = bytearray(1 << 36)\n"
    if s.group_m == 9:  # slow: a minute before the kernel is even defined
        return "import time\ntime.sleep(60)\n" + variant.source
    fn = PLANTS.get(s.block_m)
    return fn(variant.source) if fn else None


@pytest.fixture(scope="module")
def harness():
    with Harness(timeout_s=TIMEOUT_S, source_hook=plant) as h:
        yield h


def assert_good(h, spec=PLANT_SPEC, schedule=GOOD) -> Trial:
    t = h.measure(spec, schedule)
    assert t.status == OK, t.error
    return t


def test_ok_trial_is_complete(harness):
    t = assert_good(harness)
    assert t.median_ms > 0 and t.p10_ms <= t.median_ms <= t.p90_ms and t.spread_ms >= 0
    assert t.reps == harness.reps == 3 and t.device == INTERPRETER_NAME
    assert t.rel_error < reference.tolerance(PLANT_SPEC.dtype) and t.max_error is not None
    assert t.variant_id == harness.variant(PLANT_SPEC, GOOD).id and "@triton.jit" in t.source
    d = t.to_dict()
    json.dumps(d)
    assert Trial.from_dict(d) == t


@pytest.mark.parametrize("block_m,why", [(16, "exceeds"), (32, "exceeds")], ids=["garbage", "unwritten-row"])
def test_wrong_answers_are_caught(harness, block_m, why):
    t = harness.measure(PLANT_SPEC, Schedule(block_m=block_m, block_n=16, block_k=16))
    assert t.status == WRONG and why in t.error and t.median_ms is None
    assert t.rel_error >= reference.tolerance(PLANT_SPEC.dtype)
    if block_m == 32:  # the NaN poison shows through where the kernel wrote nothing
        assert t.rel_error == float("inf")
    assert_good(harness)


@pytest.mark.parametrize("block_m,why", [(128, "exit code 3"), (256, "SIGSEGV")], ids=["os._exit", "segfault"])
def test_crashes_kill_only_the_worker(harness, block_m, why):
    t = harness.measure(PLANT_SPEC, Schedule(block_m=block_m, block_n=16, block_k=16))
    assert t.status == CRASH and why in t.error
    assert_good(harness)  # a fresh worker measures the next candidate


def test_hang_times_out(harness):
    t = harness.measure(PLANT_SPEC, Schedule(block_m=64, block_n=16, block_k=16, group_m=2))
    assert t.status == TIMEOUT and t.seconds >= TIMEOUT_S
    assert_good(harness)


@pytest.mark.parametrize(
    "group_m,status,why",
    [
        (3, COMPILE_ERROR, "SyntaxError"),
        (5, COMPILE_ERROR, "has no attribute 'tunerd_conv2d_fwd'"),
        (6, CRASH, "no_such_function"),
    ],
    ids=["syntax", "missing-kernel", "runtime-error"],
)
def test_bad_sources(harness, group_m, status, why):
    t = harness.measure(PLANT_SPEC, Schedule(block_m=64, block_n=16, block_k=16, group_m=group_m))
    assert t.status == status and why in t.error, t.error
    assert_good(harness)


def test_invalid_schedule_is_a_compile_error(harness):
    t = harness.measure(PLANT_SPEC, Schedule(block_m=8, block_n=16, block_k=16))
    assert t.status == COMPILE_ERROR and "below tl.dot's minimum of 16" in t.error and t.variant_id == ""


def test_epilogues_and_depthwise_pass_the_gate(harness):
    full = conv_spec(
        n=2,
        c=16,
        k=16,
        in_size=(5, 5),
        kernel=3,
        padding=1,
        epilogue=Epilogue(bias=True, affine=True, residual="pre", activation="starrelu", layer_scale=True),
    )
    assert_good(harness, full, Schedule(block_m=64, block_n=16, block_k=16))
    dw = conv_spec(
        n=1,
        c=16,
        k=16,
        in_size=(6, 6),
        kernel=3,
        padding=1,
        groups=16,
        dtype="bfloat16",
        epilogue=Epilogue(layer_scale=True, residual="post"),
    )
    assert_good(harness, dw, Schedule(block_m=64, block_n=16))


class Counting:
    """A harness wrapper that records which variants were really measured."""

    def __init__(self, h):
        self.h, self.measured = h, []
        self.reps, self.device_name = h.reps, h.device_name

    def variant(self, spec, s):
        return self.h.variant(spec, s)

    def prefetch(self, spec, schedules):
        self.h.prefetch(spec, schedules)

    def measure(self, spec, s, reps=None):
        t = self.h.measure(spec, s, reps)
        self.measured.append(t.variant_id)
        return t


def test_tune_reports_and_resumes(harness):
    spec = conv_spec(n=1, c=16, k=16, in_size=(6, 6), kernel=3, padding=1)
    counting, logged, progress = Counting(harness), [], []
    r = tune(
        spec,
        strategy="random",
        budget_trials=3,
        seed=4,
        harness=counting,
        on_trial=logged.append,
        on_progress=progress.append,
    )
    assert r.default_trial.ok and r.best is not None and r.best.ok
    assert r.best.cost <= r.default_trial.cost and r.speedup_vs_default >= 1.0
    assert r.roofline_fraction is None and r.device == INTERPRETER_NAME  # no roofline on the interpreter
    assert len(r.trials) == 3 and r.candidates == len(space(spec, DeviceLimits.interpreter()))
    assert [t.variant_id for t in logged] == counting.measured and r.measured == len(logged)
    assert [p.done for p in progress] == [1, 2, 3] and progress[-1].total == 3 and progress[-1].eta_s == 0
    json.dumps(r.to_dict())
    # resume with a bigger budget: the same seeded proposals come first and are not measured again
    known = {t.variant_id: t for t in logged}
    counting.measured.clear()
    r2 = tune(spec, strategy="random", budget_trials=5, seed=4, harness=counting, known=known)
    assert [t.variant_id for t in r2.trials[:3]] == [t.variant_id for t in r.trials]
    assert not set(counting.measured) & set(known) and r2.measured == len(counting.measured) <= 2


def test_compile_pool_and_prefetch():
    """The parallel compile stage (on CPU it loads the source): a hang or a syntax error is caught there."""
    spec = PLANT_SPEC
    with Harness(timeout_s=TIMEOUT_S, source_hook=plant, compile_workers=1) as h:
        hang, bad = (Schedule(block_m=64, block_n=16, block_k=16, group_m=g) for g in (2, 3))
        h.prefetch(spec, [hang, bad, GOOD])
        t = h.measure(spec, hang)
        assert t.status == TIMEOUT and "killed" in t.error
        t = h.measure(spec, bad)
        assert t.status == COMPILE_ERROR and "SyntaxError" in t.error
        assert h.measure(spec, GOOD).status == OK  # compiled by a respawned pool worker, timed by the timing one


def test_backward_ops_are_gated(harness):
    for op, sched in (
        ("dgrad", Schedule(block_m=16, block_n=16, block_k=16)),
        ("wgrad", Schedule(block_m=16, block_n=16, block_k=16, split_k=2)),
    ):
        spec = conv_spec(n=1, c=16, k=16, in_size=(6, 6), kernel=3, padding=1, stride=2, op=op)
        t = harness.measure(spec, sched)
        assert t.status == OK and t.rel_error < 1e-5, t.error
    dw = conv_spec(n=1, c=16, k=16, in_size=(6, 6), kernel=3, padding=1, groups=16, op="wgrad")
    assert harness.measure(dw, Schedule(block_m=16, block_n=16, block_k=4, split_k=2)).status == OK
    with pytest.raises(SpecError, match="plain"):  # a fused chain needs arguments the harness does not bind
        harness.measure(dw.with_(epilogue=Epilogue(bias=True)), Schedule(block_m=16, block_n=16, block_k=4))


def test_tune_rejects_bad_input_before_measuring(harness):
    counting = Counting(harness)
    spec = conv_spec(n=1, c=16, k=16, in_size=(6, 6), kernel=3, padding=1)
    with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
        tune(spec, strategy="fastest", harness=counting)
    with pytest.raises(ValueError, match="budget trials"):
        tune(spec, budget_trials=0, harness=counting)
    with pytest.raises(SpecError, match="plain|cannot measure op"):
        tune(spec.with_(op="wgrad", epilogue=Epilogue(bias=True)), harness=counting)
    assert counting.measured == []


def test_memory_limit_stops_a_hog_and_the_next_candidate_runs(harness):
    """The worker caps its own address space (CPU) and the parent kills it past memory_bytes resident."""
    t = harness.measure(PLANT_SPEC, Schedule(block_m=64, block_n=16, block_k=16, group_m=7))
    assert t.status in (COMPILE_ERROR, CRASH) and ("MemoryError" in t.error or "memory" in t.error), t.error
    assert_good(harness)
    big = conv_spec(n=4096, c=256, k=256, in_size=(64, 64), kernel=3, padding=1)  # ~100 GiB to measure
    t = harness.measure(big, GOOD)
    assert t.status == CRASH and "measurement memory limit" in t.error  # refused before any worker runs


def test_resident_memory_sampling_kills_the_worker():
    import os

    with Harness(timeout_s=TIMEOUT_S, source_hook=plant, memory_bytes=64 << 20) as h:
        assert resident_bytes(os.getpid()) > 0
        t = h.measure(PLANT_SPEC, GOOD)  # torch alone is resident past 64 MiB: the sampler kills it
        assert t.status in (CRASH, COMPILE_ERROR), t.error
        assert "memory" in t.error.lower() or "MemoryError" in t.error, t.error


def test_cancel_and_deadline_kill_the_running_trial_within_a_second(harness):
    import threading
    import time

    slow = Schedule(block_m=64, block_n=16, block_k=16, group_m=9)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted, match="cancelled"), guard(cancel=stop):
        harness.measure(PLANT_SPEC, slow)
    assert time.monotonic() - t0 < 3.0
    t0 = time.monotonic()
    with pytest.raises(Interrupted, match="deadline"), guard(deadline=time.monotonic() + 1.0):
        harness.measure(PLANT_SPEC, slow)
    assert time.monotonic() - t0 < 3.0
    assert_good(harness)  # a fresh worker measures the next candidate


def test_budget_seconds_stops_the_running_trial():
    """tune()'s budget_seconds ends the search in time even when a candidate would run far longer."""
    import time

    spec = PLANT_SPEC
    cands = [
        GOOD,
        Schedule(block_m=64, block_n=16, block_k=16, group_m=9),
        Schedule(block_m=32, block_n=16, block_k=16),
    ]
    with Harness(timeout_s=120.0, source_hook=plant) as h:
        t0 = time.monotonic()
        res = tune(spec, strategy="exhaustive", budget_seconds=4.0, candidates=cands, harness=h)
        assert time.monotonic() - t0 < 30.0  # the default trial, then at most 4 s of search
    assert res.default_trial.ok and all(t.schedule.group_m != 9 for t in res.trials)
