"""Patched real models (timm, torchvision) train like the unpatched ones.

Each model runs three ways from the same weights: float64 torch (the reference), float32 torch and
float32 patched by tunerd (default bn_mode='train'). For the train-mode output, every gradient, every
buffer after the step, one SGD step with momentum and weight decay, and the eval-mode output after it,
tunerd's error against float64 must stay within a small factor of torch's own float32 error (some
train-mode quantities are badly conditioned at batch 2, and torch's error shows how badly).
Adversarial inputs (large channel offsets, raw pixels, 1x1 maps, constant channels) run on small
conv -> BatchNorm stacks. `python tests/test_train_models.py` prints the per-model error table.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import models_zoo as zoo
import pytest
import torch
from torch import nn

from tunerd.blocks import is_fusable_block
from tunerd.kernels.reference import rel_error
from tunerd.patching import patch, unpatch

FACTOR = 4.0  # tunerd's error may be this many times torch's float32 error ...
FLOOR = 2e-6  # ... or this (relative), when torch happens to be nearly exact
MOMENTUM_NONE = {"tv_regnet", "timm_starnet"}  # BatchNorms with cumulative running averages


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """BatchNorm affine and running statistics away from their init (zero-init gammas would hide grads)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), cloned."""
    state = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    return state


def _assert_same_state(before: dict[str, torch.Tensor], model: nn.Module, what: str) -> None:
    after = _snapshot(model)
    assert after.keys() == before.keys(), what
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{what} changed {changed[:5]}"


@dataclass
class Step:
    """What one training step of a model produced."""

    y_train: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]  # parameter after the SGD step minus before
    y_eval: torch.Tensor


def _step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Step:
    model.train()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, weight_decay=0.1)
    y = model(x)
    (y * dy).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    opt.step()
    update = {n: p.detach() - before[n] for n, p in params.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    return Step(y.detach(), grads, buffers, update, y_eval)


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in ts]) if ts else torch.zeros(1, dtype=torch.float64)


def compare_model(
    name: str, size: int | None = None, offset: float = 0.0, scale: float = 1.0
) -> dict[str, tuple[float, float]]:
    """Train one step three ways; assert tunerd's errors; return {quantity: (tunerd error, torch error)}.

    The input is offset + scale * randn (0-255 pixels: offset 127.5, scale 60).
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    base = zoo.build(name)
    _randomize(base, gen)
    if name in MOMENTUM_NONE:
        for m in base.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
    ref, plain, ours = copy.deepcopy(base).double(), copy.deepcopy(base), copy.deepcopy(base)
    size = size or zoo.MODELS[name][1]
    x = offset + scale * torch.randn(2, 3, size, size, generator=gen)

    before, rng = _snapshot(ours), torch.get_rng_state()
    report = patch(ours)
    assert report.swapped, str(report)
    if any(is_fusable_block(m) for m in base.modules()):  # ConvNeXt, InceptionNeXt, separable, MBConv blocks
        assert report.blocks, str(report)
    _assert_same_state(before, ours, "patch()")
    assert torch.equal(rng, torch.get_rng_state()), "patch() drew random numbers"

    dy = torch.randn(2, zoo.CLASSES, generator=gen, dtype=torch.float64)
    r, t, o = _step(ref, x.double(), dy), _step(plain, x, dy.float()), _step(ours, x, dy.float())
    errors: dict[str, tuple[float, float]] = {}
    worst: list[str] = []

    def judge(what: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
        eo, et = rel_error(a, c), rel_error(b, c)
        if not eo <= max(FACTOR * et, FLOOR):
            worst.append(f"{what}: tunerd {eo:.3g} vs torch {et:.3g}")
        return eo, et

    errors["y train"] = judge("y train", o.y_train, t.y_train, r.y_train)
    missing = [n for n, g in r.grads.items() if g is not None and o.grads[n] is None]
    assert not missing, f"parameters left without a gradient: {missing}"
    with_grad = [n for n, g in r.grads.items() if g is not None]
    grad_norm = _cat([r.grads[n] for n in with_grad]).norm().item()
    for n in with_grad:
        if r.grads[n].norm() < 1e-6 * grad_norm:  # zero in exact arithmetic (a bias a train-mode BN cancels):
            if (o.grads[n].double() - r.grads[n]).norm() > FLOOR * grad_norm:  # fp32 noise, small in absolute terms
                worst.append(f"grad {n}: {o.grads[n].norm():.3g} should vanish against {grad_norm:.3g}")
            continue
        judge(f"grad {n}", o.grads[n], t.grads[n], r.grads[n])
    errors["grads"] = (
        rel_error(_cat([o.grads[n] for n in with_grad]), _cat([r.grads[n] for n in with_grad])),
        rel_error(_cat([t.grads[n] for n in with_grad]), _cat([r.grads[n] for n in with_grad])),
    )
    floats = [n for n, b in r.buffers.items() if b.is_floating_point()]
    for n, b in r.buffers.items():
        if b.is_floating_point():
            judge(f"buffer {n}", o.buffers[n], t.buffers[n], b)
        else:
            assert torch.equal(o.buffers[n], b), f"buffer {n}: {o.buffers[n]} != {b}"
    errors["buffers"] = (
        rel_error(_cat([o.buffers[n] for n in floats]), _cat([r.buffers[n] for n in floats])),
        rel_error(_cat([t.buffers[n] for n in floats]), _cat([r.buffers[n] for n in floats])),
    )
    for n in r.update:
        judge(f"step {n}", o.update[n], t.update[n], r.update[n])
    names = list(r.update)
    errors["step"] = (
        rel_error(_cat([o.update[n] for n in names]), _cat([r.update[n] for n in names])),
        rel_error(_cat([t.update[n] for n in names]), _cat([r.update[n] for n in names])),
    )
    errors["y eval"] = judge("y eval", o.y_eval, t.y_eval, r.y_eval)
    assert not worst, f"{name}: tunerd's error above {FACTOR}x torch's float32 error (or {FLOOR}): {worst[:6]}"

    before = _snapshot(ours)
    assert unpatch(ours) > 0
    _assert_same_state(before, ours, "unpatch()")
    return errors


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_patched_model_trains_like_torch(name):
    compare_model(name)


def test_raw_pixels_through_a_model():
    # 0-255 inputs: the stem's BatchNorm sees channel means of hundreds
    compare_model("tv_mobilenet_v3", offset=127.5, scale=60.0)


# ---- adversarial BatchNorm statistics on small conv -> BN stacks -------------------------------------
def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the issue's measure)."""
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _conv_bn(conv: nn.Conv2d, x: torch.Tensor, train: bool = True) -> dict[str, tuple[float, float]]:
    """conv -> BatchNorm2d three ways; (tunerd, torch) max errors of y, running_mean and running_var."""
    bn = nn.BatchNorm2d(conv.out_channels)
    base = nn.Sequential(conv, bn).train(train)
    ref, plain, ours = copy.deepcopy(base).double(), copy.deepcopy(base), copy.deepcopy(base)
    assert patch(ours).fused
    out = {}
    y64, y32, y = ref(x.double()), plain(x), ours(x)
    out["y"] = (max_error(y, y64), max_error(y32, y64))
    for name in ("running_mean", "running_var"):
        r = getattr(ref[1], name)
        if not train:
            assert torch.equal(getattr(ours[1], name), getattr(plain[1], name))
            continue
        out[name] = (max_error(getattr(ours[1], name), r), max_error(getattr(plain[1], name), r))
    if train:
        dy = torch.randn(y64.shape, dtype=torch.float64)
        gr = torch.autograd.grad(y64, list(ref.parameters()), dy)
        gt = torch.autograd.grad(y32, list(plain.parameters()), dy.float())
        go = torch.autograd.grad(y, list(ours.parameters()), dy.float())
        for i, n in enumerate(n for n, _ in ref.named_parameters()):
            out[f"grad {n}"] = (rel_error(go[i], gr[i]), rel_error(gt[i], gr[i]))
    return out


@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_large_channel_means_keep_torch_precision(offset):
    # the case: identity 1x1 conv, BN train mode on 1000 + randn; E[z^2] - E[z]^2 gave 0.38
    conv = nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
    errs = _conv_bn(conv, offset + torch.randn(2, 4, 8, 8))
    for what in ("y", "running_var", "running_mean"):
        ours, theirs = errs[what]
        assert ours <= 2 * theirs + 1e-7, (what, ours, theirs)
    for what in ("grad 0.weight", "grad 1.weight", "grad 1.bias"):
        ours, theirs = errs[what]
        assert ours <= FACTOR * theirs + FLOOR, (what, ours, theirs)


def test_raw_pixel_range_stem():
    # 3x3 conv with positive weights on 0-255 pixels: channel means ~ 10^3 times their spread
    conv = nn.Conv2d(3, 16, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.uniform_(0.0, 0.2)
    x = torch.randint(0, 256, (2, 3, 16, 16)).float()
    for what, (ours, theirs) in _conv_bn(conv, x).items():
        assert ours <= FACTOR * theirs + FLOOR, (what, ours, theirs)


@pytest.mark.parametrize("n", [1, 2])
def test_one_by_one_maps(n):
    # batch 2 on a 1x1 map is the worst-conditioned batch statistic BN allows; batch 1 only in eval
    conv = nn.Conv2d(256, 256, 1)
    x = torch.randn(n, 256, 1, 1)
    if n == 1:
        ours = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(256)).train()
        plain = copy.deepcopy(ours)
        patch(ours)
        with pytest.raises(ValueError, match="more than 1 value per channel") as theirs:
            plain(x)
        with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
            ours(x)
        assert torch.equal(ours[1].num_batches_tracked, plain[1].num_batches_tracked)
        errs = _conv_bn(conv, x, train=False)
    else:
        errs = _conv_bn(conv, x)
    for what, (o, t) in errs.items():
        assert o <= FACTOR * t + FLOOR, (what, o, t)


def test_constant_channels():
    # zero variance: normalised output is the BN bias; gradients stay finite like torch's
    conv = nn.Conv2d(4, 8, 1, bias=False)
    x = torch.randn(2, 4, 6, 6)
    x[:, 1:3] = 3.0
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:4, 1:3] = 0.5  # output channels 0-3 constant, 4-7 zero, none varying
        conv.weight[6:, 0] = 1.0  # ... except 6 and 7
    for what, (o, t) in _conv_bn(conv, x).items():
        assert o <= FACTOR * t + FLOOR, (what, o, t)


if __name__ == "__main__":  # the per-model error table
    torch.set_num_threads(1)
    cols = ("y train", "grads", "buffers", "step", "y eval")
    print(f"{'model':20s}" + "".join(f" | {c + ' tunerd / torch':>28s}" for c in cols))
    for model in zoo.MODELS:
        e = compare_model(model)
        print(f"{model:20s}" + "".join(f" | {e[c][0]:12.2e} / {e[c][1]:9.2e}   " for c in cols), flush=True)
