"""Channel-slice views: x, the residual and the output addressed in place with a pixel stride (no copy).

A channel slice of a channels-last buffer (x[:, 24:56] of 80 channels, a torch.split chunk) is read by the
forward kernels with the buffer's pixel stride, and `out=` may be one branch of a wider concat buffer. Each case
compares with float64 torch on fresh random inputs, the output region NaN-poisoned, checks that the kernel got
the caller's own storage (no copy), and that the buffer's other channels are untouched. Misaligned slices fall
back to a copy (dense kernel). Spec keys, limits and trust handle the new pixel-stride fields.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunerd.kernels import conv as kconv
from tunerd.kernels import generator, limits, runtime, trust
from tunerd.kernels.autograd import conv as autograd_conv
from tunerd.kernels.reference import rel_error, tolerance
from tunerd.kernels.spec import BlockSpec, Epilogue, SpecError, conv_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _cl(n: int, c: int, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.fixture
def launches(monkeypatch):
    """Every forward launch's (variant, args), poisoned kernel outputs."""
    seen: list[tuple[generator.Variant, dict]] = []
    real = runtime.launch

    def spy(variant, args, device):
        seen.append((variant, dict(args)))
        real(variant, args, device)

    monkeypatch.setattr(runtime, "launch", spy)
    monkeypatch.setattr(kconv, "POISON_OUTPUTS", True)
    return seen


def _poisoned_out(n: int, h: int, w: int, total: int, lo: int, hi: int, dtype=torch.float32):
    """A NaN-filled [N, H, W, total] concat buffer and its channel slice lo:hi (the out= view)."""
    buf = torch.full((n, h, w, total), float("nan"), dtype=dtype)
    return buf, buf[..., lo:hi]


def _rest_untouched(buf: torch.Tensor, lo: int, hi: int) -> bool:
    return bool(buf[..., :lo].isnan().all() and buf[..., hi:].isnan().all())


def _in_place(args: dict, name: str, t: torch.Tensor) -> bool:
    return args[name].data_ptr() == t.data_ptr() and args[name].untyped_storage().data_ptr() == (
        t.untyped_storage().data_ptr()
    )


@pytest.mark.parametrize(
    "name,c_total,lo,hi,k,kernel,stride,pad,groups",
    [
        ("dense_3x3", 80, 24, 56, 16, 3, 1, 1, 1),
        ("pointwise_1x1", 80, 24, 56, 24, 1, 1, 0, 1),
        ("grouped_3x3_s2", 40, 8, 32, 12, 3, 2, 1, 3),
        ("depthwise_7x7", 80, 24, 56, 32, 7, 1, 3, 32),
    ],
)
def test_channel_slices_are_read_and_written_in_place(launches, name, c_total, lo, hi, k, kernel, stride, pad, groups):
    buf = _cl(2, c_total, 7, 6)
    x = buf[:, lo:hi]
    c = hi - lo
    w = torch.randn(k, c // groups, kernel, kernel) * (c // groups * kernel * kernel) ** -0.5
    bias = torch.randn(k)
    ho, wo = (7 + 2 * pad - kernel) // stride + 1, (6 + 2 * pad - kernel) // stride + 1
    obuf, out = _poisoned_out(2, ho, wo, k + 24, 8, 8 + k)
    before = buf.clone()
    y = kconv.conv_forward(x, w, 2, stride, pad, 1, groups, kconv.EpilogueArgs(bias=bias, activation="silu"), out=out)
    ref = F.silu(F.conv2d(x.double(), w.double(), bias.double(), stride, pad, 1, groups))
    assert rel_error(y, ref) < tolerance("float32"), rel_error(y, ref)
    assert y.data_ptr() == out.data_ptr() and _rest_untouched(obuf, 8, 8 + k)
    assert torch.equal(buf, before)  # the input buffer is only read
    ((variant, args),) = launches
    assert variant.spec.kind == ("depthwise" if groups == c else "conv")
    assert (variant.spec.x_pixel_stride, variant.spec.out_pixel_stride) == (c_total, k + 24)
    assert _in_place(args, "x_ptr", x) and _in_place(args, "out_ptr", out)  # no copy either way


def test_residual_view_and_save_z_beside_a_strided_output(launches):
    """A residual that is a channel slice ('pre', relu) and an out= slice with another pixel stride; z (saved for
    backward) stays a dense buffer of its own."""
    x = _cl(2, 12, 5, 6)  # dense input: only the residual and the output are views
    w = torch.randn(8, 12, 3, 3) * 0.3
    rbuf = _cl(2, 20, 5, 6)
    residual = rbuf[:, 4:12]
    obuf, out = _poisoned_out(2, 5, 6, 16, 4, 12)
    ep = kconv.EpilogueArgs(residual=residual, residual_mode="pre", activation="relu")
    spec = kconv.make_spec(x, w, 2, 1, 1, 1, 1, ep, save_z=True)
    res = kconv.run_forward(spec, x, w, ep, out=out)
    z_ref = F.conv2d(x.double(), w.double(), None, 1, 1)
    assert rel_error(res.y, torch.relu(z_ref + residual.double())) < tolerance("float32")
    assert res.z is not None and res.z.is_contiguous()
    assert rel_error(res.z, z_ref.permute(0, 2, 3, 1)) < tolerance("float32")
    assert _rest_untouched(obuf, 4, 12)
    ((variant, args),) = launches
    s = variant.spec
    assert (s.x_pixel_stride, s.out_pixel_stride, s.res_pixel_stride) == (None, 16, 20)
    assert _in_place(args, "res_ptr", residual) and _in_place(args, "out_ptr", out)


def test_misaligned_slices_fall_back_to_a_copy(launches):
    """A slice whose base is not 16-byte aligned (channel offset 1 of fp32) runs the dense kernel on a copy; an
    out= slice like that is computed densely and copied in, the rest of its buffer untouched."""
    buf = _cl(2, 80, 5, 6)
    x = buf[:, 1:33]
    assert kconv.pixel_stride(x) == 80 and kconv.view_stride(x) is None
    w = torch.randn(16, 32, 3, 3) * 0.1
    obuf, out = _poisoned_out(2, 5, 6, 20, 1, 17)
    y = kconv.conv_forward(x, w, 2, 1, 1, out=out)
    assert rel_error(y, F.conv2d(x.double(), w.double(), None, 1, 1)) < tolerance("float32")
    assert _rest_untouched(obuf, 1, 17) and y.data_ptr() == out.data_ptr()
    ((variant, args),) = launches
    assert not variant.spec.is_view and variant.spec == variant.spec.dense()
    assert args["x_ptr"].is_contiguous() and not _in_place(args, "x_ptr", x)
    assert args["out_ptr"].untyped_storage().data_ptr() != obuf.untyped_storage().data_ptr()
    # a pixel stride that breaks 16-byte rows (81 fp32 channels) copies too
    assert kconv.view_stride(_cl(2, 81, 5, 6)[:, 16:48]) is None


def test_tma_pointwise_reads_a_view_through_its_descriptor(launches):
    """1x1 fp16 by TMA: the descriptor takes the slice's pixel stride (16-byte aligned, as TMA requires)."""
    from dataclasses import replace

    buf = _cl(2, 96, 5, 6, torch.float16)
    x = buf[:, 32:64]
    w = (torch.randn(16, 32, 1, 1) * 0.2).half()
    spec = kconv.make_spec(x, w, 2, 1, 0, 1, 1, kconv.EpilogueArgs())
    tma = replace(generator.render(spec).schedule, tma=True)
    obuf, out = _poisoned_out(2, 5, 6, 48, 16, 32, torch.float16)
    y = kconv.conv_forward(x, w, 2, out=out, schedule=tma)
    assert rel_error(y, F.conv2d(x.double(), w.double())) < tolerance("float16")
    assert _rest_untouched(obuf, 16, 32)
    ((variant, args),) = launches
    assert variant.schedule.tma and variant.spec.x_pixel_stride == 96 and _in_place(args, "x_ptr", x)
    assert "strides=[X_PIX, 1]" in variant.source


def test_a_view_without_its_own_tuning_runs_its_dense_layers_schedule(launches):
    from tunerd.kernels.schedule import Schedule

    tuned = Schedule(block_m=32, block_n=16, block_k=16, num_warps=2)
    asked = []

    def lookup(spec, device):
        asked.append(spec)
        return None if spec.is_view else tuned

    x = _cl(2, 48, 5, 6)[:, 16:32]
    w = torch.randn(16, 16, 3, 3) * 0.2
    kconv.set_schedule_lookup(lookup)
    try:
        y = kconv.conv_forward(x, w, 2, 1, 1)
    finally:
        kconv.set_schedule_lookup(None)
    assert rel_error(y, F.conv2d(x.double(), w.double(), None, 1, 1)) < tolerance("float32")
    ((variant, _),) = launches
    assert [s.is_view for s in asked] == [True, False] and asked[1] == variant.spec.dense()
    assert (
        variant.spec.x_pixel_stride == 48 and variant.schedule == kconv.generator.render(variant.spec, tuned).schedule
    )


def test_the_harness_feeds_a_view_spec_views():
    """The tuner's fwd binding gives a view spec channel slices of wider buffers (its kernel reads exactly them),
    so a tuned view kernel is gated against float64 like a dense one."""
    from tunerd.schedules import ops

    spec = conv_spec(n=2, c=16, k=16, in_size=(5, 5), kernel=3, padding=1, epilogue=Epilogue(residual="post"))
    view = spec.with_(x_pixel_stride=40, out_pixel_stride=24, res_pixel_stride=32)
    b, v = ops.binding("fwd"), generator.render(view)
    inp = b.make_inputs(view, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert kconv.pixel_stride(inp["x"]) == 40 and kconv.pixel_stride(inp["residual"]) == 32
    out = b.output(v, inp)
    runtime.launch(v, b.kernel_args(v, inp, out), torch.device("cpu"))
    assert out.stride()[-2] == 24 and rel_error(b.result(v, inp, out), b.reference(view, inp)) < tolerance("float32")


@pytest.mark.parametrize("op", ["dgrad", "wgrad"])
def test_the_harness_feeds_a_dy_view_spec_a_dy_slice(op):
    """The tuner's dgrad / wgrad bindings give a dy-view spec dy as a slice of a wider gradient (wgrad also x as
    a slice where its spec says so), gated against float64 like a dense one."""
    from tunerd.schedules import ops

    spec = conv_spec(n=2, c=16, k=16, in_size=(5, 7), kernel=3, padding=1, stride=2 if op == "dgrad" else 1, op=op)
    view = spec.with_(dy_pixel_stride=40, **({"x_pixel_stride": 24} if op == "wgrad" else {}))
    b, v = ops.binding(op), generator.render(view)
    inp = b.make_inputs(view, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert kconv.pixel_stride(inp["dy"]) == 40
    assert op == "dgrad" or kconv.pixel_stride(inp["x"]) == 24
    out = b.output(v, inp)
    runtime.launch(v, b.kernel_args(v, inp, out), torch.device("cpu"))
    assert rel_error(b.result(v, inp, out), b.reference(view, inp)) < tolerance("float32")


def test_bad_outputs_get_clear_errors():
    buf = _cl(2, 48, 5, 6)
    x = buf[:, :16]
    w = torch.randn(16, 16, 1, 1)
    nhwc = buf.permute(0, 2, 3, 1)
    with pytest.raises(SpecError, match="overlaps the input"):
        kconv.conv_forward(x, w, 2, out=nhwc[..., 8:24])
    kconv.conv_forward(x, w, 2, out=nhwc[..., 32:48])  # another slice of the buffer x is read from: fine
    with pytest.raises(SpecError, match="shape"):
        kconv.conv_forward(x, w, 2, out=torch.empty(2, 5, 6, 8))
    with pytest.raises(SpecError, match="overlapping elements"):
        kconv.conv_forward(x, w, 2, out=torch.empty(2, 5, 1, 16).expand(2, 5, 6, 16))
    with pytest.raises(SpecError, match="pixel stride"):  # a view spec never runs on a tensor of another layout
        spec = kconv.make_spec(x, w, 2, 1, 0, 1, 1, kconv.EpilogueArgs()).with_(x_pixel_stride=48)
        kconv.forward_args(spec, x.contiguous(), w, kconv.EpilogueArgs(), torch.empty(2, 5, 6, 16))


def test_gradients_of_a_view_input_land_in_its_slice():
    """Autograd through a channel-slice input (wgrad reads it in place, dgrad writes a dense dx): the input buffer's
    gradient is the float64 one inside the slice and zero outside it."""
    base = _cl(2, 40, 5, 6).requires_grad_()
    w = (torch.randn(12, 16, 3, 3) * 0.2).requires_grad_()
    lo, hi = 8, 24
    y = autograd_conv(base[:, lo:hi], w, None, 1, 1, ndim=2, activation="gelu")
    base64, w64 = base.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.gelu(F.conv2d(base64[:, lo:hi], w64, None, 1, 1))
    assert rel_error(y, ref) < tolerance("float32")
    dy = torch.randn(ref.shape, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (base, w), dy.float())
    rx, rw = torch.autograd.grad(ref, (base64, w64), dy)
    assert rel_error(gx, rx) < tolerance("float32") and rel_error(gw, rw) < tolerance("float32")
    assert gx[:, :lo].eq(0).all() and gx[:, hi:].eq(0).all()


@pytest.mark.parametrize(
    "groups, k, dtype, act",
    [(1, 12, torch.float32, "gelu"), (2, 12, torch.bfloat16, None), (16, 16, torch.float32, "relu")],
    ids=["conv-gelu", "grouped-bf16", "depthwise-relu"],
)
def test_wgrad_reads_a_view_input_in_place(launches, groups, k, dtype, act):
    """The weight gradient of a conv over a channel slice: the wgrad kernel addresses x in the wider buffer with its
    pixel stride (spec x_pixel_stride, no copy of x) and matches float64."""
    base = _cl(2, 40, 5, 7, dtype)
    x = base[:, 8:24]  # 16 of 40 channels
    w = (torch.randn(k, 16 // groups, 3, 3) * 0.2).to(dtype).requires_grad_()
    y = autograd_conv(x, w, None, 1, 1, 1, groups, ndim=2, activation=act)
    x64, w64 = x.detach().double(), w.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, None, 1, 1, 1, groups)
    ref = {"gelu": F.gelu, "relu": F.relu, None: lambda t: t}[act](ref)
    dy = torch.randn(ref.shape, dtype=torch.float64)
    (gw,) = torch.autograd.grad(y, (w,), dy.to(dtype))
    (rw,) = torch.autograd.grad(ref, (w64,), dy)
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    assert rel_error(gw, rw) < tolerance(name)
    (variant, args), *_ = [(v, a) for v, a in launches if v.spec.op == "wgrad"]
    assert variant.spec.x_pixel_stride == 40 and args["x_ptr"].data_ptr() == x.data_ptr()  # in place
    dense = generator.render(variant.spec.with_(x_pixel_stride=None), variant.schedule).source
    assert variant.source != dense and "X_PIX" not in dense
    assert ("X_PIX: tl.constexpr = 40" in variant.source) == (groups != 16)  # depthwise kernels take literals


def test_pixel_strides_in_spec_keys_limits_and_trust():
    dense = conv_spec(n=2, c=32, k=16, in_size=(7, 6), kernel=3, padding=1)
    assert "pixel_stride" not in dense.to_json()
    view = dense.with_(x_pixel_stride=80, out_pixel_stride=40)
    assert view.key != dense.key and view.dense() == dense and BlockSpec.from_json(view.to_json()) == view
    assert dense.with_(x_pixel_stride=32) == dense  # the dense stride is no view: one spec, one key
    assert "pixel-strides x/80,out/40" in view.describe()
    v = generator.render(view)
    assert "X_PIX: tl.constexpr = 80" in v.source and "OUT_PIX: tl.constexpr = 40" in v.source
    assert v.id != generator.render(dense).id
    assert trust.verify(view, v.schedule, v.source).source == v.source  # re-rendering accepts it
    with pytest.raises(trust.UntrustedSource):
        trust.verify(view, v.schedule, generator.render(dense).source)
    for bad, match in [
        (dict(x_pixel_stride=16), "smaller than the 32 channels"),
        (dict(out_pixel_stride=True), "must be an int"),
        (dict(res_pixel_stride=64), "needs an epilogue with a residual"),
        (dict(x_pixel_stride=80, op="dgrad"), "forward option"),
        (dict(out_pixel_stride=80, op="wgrad"), "forward option"),
    ]:
        with pytest.raises(SpecError, match=match):
            dense.with_(**bad)
    with pytest.raises(limits.LimitExceeded, match="pixel-strided view"):
        limits.check(dense.with_(x_pixel_stride=2**27))
    big = dense.with_(n=1, in_size=(64, 64), x_pixel_stride=2**19)  # 2**31 elements spanned: int64 offsets
    assert generator.batch_range(big).i64 and not generator.batch_range(big.dense()).i64
    with pytest.raises(SpecError, match="stats_only needs stats"):
        Epilogue(stats_only=True)


def test_stats_only_epilogue_writes_no_output(launches):
    x = torch.randn(2, 5, 6, 7)
    w = torch.randn(12, 5, 3, 3)
    mean, var = kconv.conv_stats(x, w, 2, 1, 1)
    z = F.conv2d(x.double(), w.double(), None, 1, 1)
    var_ref, mean_ref = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    assert rel_error(mean, mean_ref) < tolerance("float32") and rel_error(var, var_ref) < tolerance("float32")
    # depthwise, on a channel slice
    xs = _cl(2, 48, 6, 7)[:, 16:48]
    wd = torch.randn(32, 1, 5, 5)
    mean_d, var_d = kconv.conv_stats(xs, wd, 2, 1, 2, 1, 32)
    var_ref, mean_ref = torch.var_mean(F.conv2d(xs.double(), wd.double(), None, 1, 2, 1, 32), (0, 2, 3), False)
    assert rel_error(mean_d, mean_ref) < tolerance("float32") and rel_error(var_d, var_ref) < tolerance("float32")
    (variant, args), (dw, dw_args) = launches
    assert variant.spec.epilogue.stats_only and "out_ptr" not in args and "out_ptr" not in variant.source
    assert dw.spec.kind == "depthwise" and dw.spec.x_pixel_stride == 48 and "out_ptr" not in dw_args
    assert Epilogue(stats=True).to_dict() == {**Epilogue().to_dict(), "stats": True}  # default keys unchanged


@pytest.mark.slow
def test_view_and_stats_only_variants_compile_for_sm90():
    """The real compiler (sm_90, ptxas) accepts a bf16 3x3 conv on aligned channel-slice views and keeps its
    16-byte cp.async copies, and a stats_only conv; a dgrad reading a dy slice compiles to the dense one's
    registers and main loop (dy's row offset is hoisted: only its constant differs)."""
    from tunerd.kernels.backward import grad_spec
    from tunerd.kernels.validate import compile_check

    spec = conv_spec(n=8, c=64, k=64, in_size=(14, 14), kernel=3, padding=1, dtype="bfloat16")
    view = spec.with_(x_pixel_stride=192, out_pixel_stride=128)
    stats = conv_spec(n=8, c=64, k=96, in_size=(14, 14), kernel=3, padding=1, dtype="bfloat16",
                      epilogue=Epilogue(stats=True, stats_only=True))  # fmt: skip
    dgrad = generator.render(grad_spec(spec, "dgrad"))
    dgrad_view = generator.render(grad_spec(spec, "dgrad", 192), dgrad.schedule)
    variants = [generator.render(view), generator.render(stats), dgrad, dgrad_view]
    results = compile_check(variants, arch=90)
    assert all(r["ok"] for r in results), [r["error"] for r in results]
    assert results[0]["cp_async"] > 0 and results[0]["max_copy_bytes"] == 16
    assert all(r["spill_bytes"] == 0 for r in results)
    dense, dy_view = results[2:]
    assert dy_view["max_copy_bytes"] == dense["max_copy_bytes"] == 16
    assert (dy_view["regs"], dy_view["loop_sass"], dy_view["loop_mma"]) == (
        dense["regs"], dense["loop_sass"], dense["loop_mma"]
    ), (dense, dy_view)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,groups", [(3, 1), (1, 1), (7, 64)])
def test_views_on_the_gpu_read_and_write_in_place(kernel, groups):
    """Compiled (not interpreted) bf16 kernels on aligned channel slices: the JIT specializes the views' pointers
    like dense ones, the outputs match float64 and the concat buffer's other channels stay NaN."""
    dev = torch.device("cuda")
    buf = torch.randn(4, 192, 14, 14, device=dev).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x = buf[:, 64:128]
    w = (torch.randn(64, 64 // groups, kernel, kernel, device=dev) * (64 // groups * kernel**2) ** -0.5).bfloat16()
    obuf = torch.full((4, 14, 14, 128), float("nan"), device=dev, dtype=torch.bfloat16)
    out = obuf[..., 32:96]
    y = kconv.conv_forward(x, w, 2, 1, kernel // 2, 1, groups, out=out)
    ref = F.conv2d(x.double(), w.double(), None, 1, kernel // 2, 1, groups)
    assert rel_error(y, ref) < tolerance("bfloat16") and y.data_ptr() == out.data_ptr()
    assert _rest_untouched(obuf, 32, 96)


# ---- dy as a channel slice: the backward of a concat (each branch's gradient is a slice of the concat's) -------
def _dy_slice(shape: tuple[int, ...], total: int, lo: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """dy [N, K, *S] (float64 values) and the same values as channels lo:lo+K of a NaN-filled channels-last
    [N, *S, total] gradient buffer, seen as [N, K, *S]: a kernel that reads a wrong channel gets NaN."""
    n, k, *size = shape
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    buf = torch.full((n, *size, total), float("nan"), dtype=dtype)
    view = buf[..., lo : lo + k].permute(0, len(shape) - 1, *range(1, len(shape) - 1))
    return dy, view.copy_(dy)


@pytest.mark.parametrize(
    "c,k,kernel,stride,pad,groups,dtype,chain,total,lo",
    [
        (12, 20, 3, 1, 1, 1, torch.float32, "relu", 36, 8),  # z read at K beside dy at 36
        (12, 12, 3, 2, 1, 3, torch.float32, "bias", 20, 4),  # grouped, stride-2 phases
        (24, 24, (1, 11), 1, (0, 5), 24, torch.bfloat16, "bias", 96, 24),  # InceptionNeXt's band branch
        (16, 16, 3, 2, 1, 16, torch.float32, "gelu", 48, 16),  # depthwise phases, z apart
        (8, 8, 3, 1, 1, 1, torch.float32, "bn-res-relu", 24, 16),  # residual 'pre' read at K, d residual
        (8, 12, 3, 1, 1, 1, torch.float32, "relu", 20, 1),  # misaligned slice: copied, dense kernels
    ],
    ids=["conv-relu", "grouped-s2", "dw-band-bf16", "dw-s2-gelu", "res-pre", "misaligned"],
)
def test_backward_reads_a_dy_slice_in_place(launches, c, k, kernel, stride, pad, groups, dtype, chain, total, lo):
    """dgrad and wgrad of a conv whose dy is a channel slice of a wider gradient (odd sizes 7 x 5): every gradient
    matches float64 torch with dx / dw poisoned, and an aligned slice is read in place (spec dy_pixel_stride)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = _cl(2, c, 7, 5, dtype).requires_grad_()
    w = (torch.randn(k, c // groups, kh, kw) * (c // groups * kh * kw) ** -0.5).to(dtype).requires_grad_()
    kwargs: dict = {}
    if chain == "bias":
        kwargs = dict(bias=torch.randn(k).to(dtype).requires_grad_())
    elif chain in ("relu", "gelu"):
        kwargs = dict(activation=chain)
    elif chain == "bn-res-relu":
        ho, wo = 7 + 2 * pad - kh + 1, 5 + 2 * pad - kw + 1
        kwargs = dict(
            scale=(torch.rand(k) + 0.5).requires_grad_(),
            shift=torch.randn(k).requires_grad_(),
            residual=_cl(2, k, ho, wo).requires_grad_(),
            residual_mode="pre",
            activation="relu",
        )
    y = autograd_conv(x, w, stride=stride, padding=pad, groups=groups, ndim=2, **kwargs)
    leaves = [x, w, *(t for t in kwargs.values() if isinstance(t, torch.Tensor))]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_kw = dict(zip([n for n, t in kwargs.items() if isinstance(t, torch.Tensor)], ref_leaves[2:]))
    ref = F.conv2d(ref_leaves[0], ref_leaves[1], ref_kw.get("bias"), stride, pad, 1, groups)
    if "scale" in ref_kw:
        ref = ref * ref_kw["scale"][:, None, None] + ref_kw["shift"][:, None, None] + ref_kw["residual"]
    ref = {"relu": F.relu, "gelu": F.gelu}.get(kwargs.get("activation", ""), lambda t: t)(ref)
    dy64, dy = _dy_slice(tuple(ref.shape), total, lo, dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    refs = torch.autograd.grad(ref, ref_leaves, dy64)
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    for g, r in zip(grads, refs):
        assert rel_error(g, r) < tolerance(name), (rel_error(g, r), g.shape)
    back = [(v, a) for v, a in launches if v.spec.op != "fwd"]
    assert sorted(v.spec.op for v, _ in back) == ["dgrad", "wgrad"]
    aligned = lo * dy.element_size() % 16 == 0
    for v, a in back:
        assert v.spec.dy_pixel_stride == (total if aligned else None)
        assert _in_place(a, "dy_ptr", dy) == aligned  # the caller's gradient itself, else a dense copy
        assert ("DY_PIX" in v.source) == (aligned and v.spec.kind == "conv")  # depthwise kernels take literals
        assert v.source != generator.render(v.spec.dense(), v.schedule).source or not aligned


def test_dy_pixel_stride_in_spec_keys_and_trust():
    """dy_pixel_stride: a backward field, absent from dense keys (stored ids unchanged), named DY_PIX in conv
    sources, re-rendered by trust, counted by the int64 rule."""
    dgrad = conv_spec(n=2, c=32, k=16, in_size=(7, 6), kernel=3, padding=1, op="dgrad")
    assert "pixel_stride" not in dgrad.to_json()
    view = dgrad.with_(dy_pixel_stride=40)
    assert view.key != dgrad.key and view.dense() == dgrad and BlockSpec.from_json(view.to_json()) == view
    assert dgrad.with_(dy_pixel_stride=16) == dgrad and "pixel-strides dy/40" in view.describe()
    v = generator.render(view)
    assert "DY_PIX: tl.constexpr = 40" in v.source and "DY_PIX" not in generator.render(dgrad).source
    assert trust.verify(view, v.schedule, v.source).source == v.source
    with pytest.raises(trust.UntrustedSource):
        trust.verify(view, v.schedule, generator.render(dgrad).source)
    wgrad = dgrad.with_(op="wgrad", x_pixel_stride=48, dy_pixel_stride=24)
    assert "pixel-strides x/48,dy/24" in wgrad.describe()
    for bad, match in [
        (dict(op="fwd", dy_pixel_stride=40), "backward option"),
        (dict(dy_pixel_stride=8), "smaller than the 16 channels"),
        (dict(dy_pixel_stride=40.0), "must be an int"),
    ]:
        with pytest.raises(SpecError, match=match):
            dgrad.with_(**bad)
    big = dgrad.with_(n=1, in_size=(64, 64), dy_pixel_stride=2**19)  # 2**31 elements spanned: int64 offsets
    assert generator.batch_range(big).i64 and not generator.batch_range(big.dense()).i64


@pytest.mark.parametrize(
    "kernel,stride,pad,extra",
    [
        (3, 2, 1, dict(split_k=2)),
        (3, 2, 1, dict(stream_k=5)),
        (3, 2, 1, dict(k_order="flat")),
        ((5, 13), 1, (2, 6), dict(k_order="tap", block_k=32, block_m=128)),  # 65 taps: per-step index math, no tap bits
    ],
    ids=["split", "stream", "flat", "taps-65"],
)
def test_dgrad_variants_read_a_dy_slice(launches, kernel, stride, pad, extra):
    """The dgrad variants with a ranged reduction (split-K, stream-K, over stride-2 phases), the flattened order and
    per-step tap math on a dy slice, gelu's z read densely beside it."""
    from dataclasses import replace

    from tunerd.kernels import backward

    x = _cl(2, 16, 9, 7)
    w = torch.randn(24, 16, *((kernel, kernel) if isinstance(kernel, int) else kernel)) * 0.1
    ep = kconv.EpilogueArgs(activation="gelu")
    spec = kconv.make_spec(x, w, 2, stride, pad, 1, 1, ep, save_z=True)
    z = kconv.to_channels_last(F.conv2d(x, w, None, stride, pad))  # what the forward saves (its test is elsewhere)
    dy64, dy = _dy_slice((2, 24, *spec.out_size), 40, 8, torch.float32)
    sched = replace(generator.render(backward.grad_spec(spec, "dgrad", 40)).schedule, **{"block_k": 16, **extra})
    g = backward.conv_backward(dy, x, w, spec, ep, z, backward.Needs(weight=False), schedules={"dgrad": sched})
    x64 = x.double().requires_grad_()
    (rx,) = torch.autograd.grad(F.gelu(F.conv2d(x64, w.double(), None, stride, pad)), (x64,), dy64)
    assert rel_error(g.input, rx) < tolerance("float32")
    ((v, a),) = [(v, a) for v, a in launches if v.spec.op == "dgrad"]
    assert v.spec.dy_pixel_stride == 40 and _in_place(a, "dy_ptr", dy) and v.schedule == sched
    assert ("tap_ok" in v.source) == (stride == 2 and "k_order" not in extra)  # which reduction form ran


def test_cat_backward_of_patched_convs_reads_each_branch_in_place(launches):
    """torch.cat of three patched conv branches (an InceptionNeXt-like token mixer): autograd's cat backward hands
    each branch a channel slice of the concat's gradient; the aligned ones are read in place, the misaligned one
    (channel offset 18 of fp32) is copied, and every gradient equals float64 torch's."""
    from tunerd import patch

    class Mixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(16, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(16, 10, 3, padding=1, groups=2)
            self.dw = torch.nn.Conv2d(14, 14, (1, 5), padding=(0, 2), groups=14)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), self.b(x), self.dw(x[:, 2:])], dim=1)

    torch.manual_seed(5)
    ref = Mixer().double()
    ours = Mixer()
    ours.load_state_dict(ref.state_dict())
    patch(ours)
    x = _cl(2, 16, 7, 5)
    g = _cl(2, 32, 7, 5)
    xs, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    got = torch.autograd.grad((ours(xs) * g).sum(), [xs, *ours.parameters()])
    want = torch.autograd.grad((ref(x64) * g.double()).sum(), [x64, *ref.parameters()])
    for a, b in zip(got, want):
        assert rel_error(a, b) < tolerance("float32")
    strides = sorted(str(v.spec.dy_pixel_stride) for v, _ in launches if v.spec.op == "dgrad")
    assert strides == ["32", "32", "None"]  # a and b in place (offsets 0, 8), dw (offset 18) copied
