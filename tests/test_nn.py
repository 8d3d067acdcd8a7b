"""tunerd.nn modules and tunerd.patch: drop-in behaviour, fusion, state_dict, training end to end."""

import copy

import pytest
import torch
from torch import nn
from toy_blocks import BasicBlock, ConvNeXtBlock, InvertedResidual

import tunerd.nn as tnn
from tunerd.patching import patch, unpatch


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)


@pytest.mark.parametrize(
    "ndim,cls,tcls", [(1, nn.Conv1d, tnn.Conv1d), (2, nn.Conv2d, tnn.Conv2d), (3, nn.Conv3d, tnn.Conv3d)]
)
def test_drop_in_state_dict_round_trip(ndim, cls, tcls):
    kw = dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=2)
    ours, theirs = tcls(**kw), cls(**kw)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn((2, 4) + (5,) * ndim)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs2 = cls(**kw)
    theirs2.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    torch.testing.assert_close(theirs2(x), theirs(x))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_modes(mode):
    torch_conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)
    ours = tnn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)
    ours.load_state_dict(torch_conv.state_dict())
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(ours(x), torch_conv(x), rtol=1e-5, atol=1e-5)


def test_patch_fuses_exclusive_chains_and_reports():
    model = nn.Sequential(BasicBlock(), InvertedResidual())
    report = patch(model)
    fused = dict(report.fused)
    assert fused["0.conv1"] == "0.bn1"  # relu is shared in BasicBlock: not fused
    assert fused["1.conv.0"] == "1.conv.1 + 1.conv.2" and fused["1.conv.6"] == "1.conv.7"
    assert len(report.swapped) == 5 and "5 convolutions swapped" in str(report)


def test_patch_leaves_what_it_cannot_run():
    class WSConv(nn.Conv2d):  # weight-standardised conv: its own forward
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3).double(), WSConv(4, 4, 1).double(), nn.ConvTranspose2d(4, 4, 2))
    report = patch(model)
    reasons = dict(report.left)
    assert "float64" in reasons["0"] and "subclass" in reasons["1"] and "transposed" in reasons["2"]
    assert not report.swapped


@pytest.mark.parametrize("make", [BasicBlock, InvertedResidual, ConvNeXtBlock])
def test_patch_eval_matches_torch_and_unpatch_restores(make):
    model = make().eval()
    _randomize_bn(model)
    x = torch.randn(2, 8, 8, 8)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        patch(model)
        out = model(x)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert unpatch(model) > 0
    assert all(
        type(m).__module__.startswith("torch.") or m is model or type(m).__module__ == "toy_blocks"
        for m in model.modules()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def _train(model: nn.Module, steps: int, x: torch.Tensor, target: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make", [BasicBlock, InvertedResidual, ConvNeXtBlock])
def test_sgd_steps_patched_match_unpatched(make):
    base = make().train()
    _randomize_bn(base)
    ours = copy.deepcopy(base)
    report = patch(ours)
    assert report.swapped
    x, target = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8)
    ref_losses = _train(base, 3, x, target)
    losses = _train(ours, 3, x, target)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    for (n, p), (_, q) in zip(base.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4, msg=n)
    for (n, b), (_, c) in zip(base.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(c.float(), b.float(), rtol=1e-4, atol=1e-4, msg=n)


def test_tune_mode_folds_bn_and_freezes_stats():
    block = tnn.ConvBNAct(4, 8, 3, padding=1, activation="relu", bn_mode="tune").train()
    _randomize_bn(block)
    mean0 = block.bn.running_mean.clone()
    x = torch.randn(2, 4, 6, 6)
    y = block(x)
    # Tune mode == eval-mode BN math, with gradients through the fold
    ref = torch.relu(
        nn.functional.batch_norm(
            nn.functional.conv2d(x, block.conv.weight, None, 1, 1),
            block.bn.running_mean,
            block.bn.running_var,
            block.bn.weight,
            block.bn.bias,
            False,
            0.0,
            block.bn.eps,
        )
    )
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert block.conv.weight.grad is not None and block.bn.weight.grad is not None and block.bn.bias.grad is not None
    assert torch.equal(block.bn.running_mean, mean0)
    assert set(block.state_dict()) == {
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }


@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_mode_takes_batch_stats_from_the_conv_kernel(momentum, monkeypatch):
    from tunerd.kernels import runtime

    launched = []
    real = runtime.launch
    monkeypatch.setattr(runtime, "launch", lambda v, a, d: (launched.append(v.spec), real(v, a, d))[1])
    block = tnn.ConvBNAct(4, 8, 3, padding=1, bias=True, activation="silu", momentum=momentum).train()
    ref_conv = nn.Conv2d(4, 8, 3, padding=1)
    ref_bn = nn.BatchNorm2d(8, momentum=momentum)
    ref_conv.load_state_dict(block.conv.state_dict())
    for _ in range(2):
        x = torch.randn(3, 4, 6, 6)
        y = block(x)
        ref = nn.functional.silu(ref_bn(ref_conv(x)))
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    fwd = [s for s in launched if s.op == "fwd"]
    assert fwd and all(s.epilogue.stats for s in fwd)  # statistics from the conv epilogue itself
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(block.bn, name), getattr(ref_bn, name), rtol=1e-5, atol=1e-5)


class _CountingNorm(nn.BatchNorm2d):
    """A BatchNorm outside torch.nn (so torch.fx runs its Python while tracing), like timm's BatchNormAct2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        noise = torch.rand(1)  # concrete arguments: drawn for real even while tracing
        return (
            nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
            )
            + 0.0 * noise
        )


def test_patch_and_unpatch_change_no_state():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _CountingNorm(8), nn.ReLU(), BasicBlock(8)).train()
    _randomize_bn(model)
    tensors = model.state_dict(keep_vars=True)
    state = {k: v.detach().clone() for k, v in tensors.items()}
    rng = torch.get_rng_state()
    report = patch(model)
    assert report.fused and not any("fx" in why for _, why in report.left)
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in model.state_dict(keep_vars=True).items():
        assert v is tensors[k] and torch.equal(v, state[k]), k  # the same tensors, unchanged
    unpatch(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_conv_bias_before_fused_bn_gets_a_gradient_and_its_weight_decay():
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU()).train()
    ours = copy.deepcopy(base)
    assert patch(ours).fused
    x, dy = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 6, 6)
    for m in (base, ours):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        (m(x) * dy).sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        opt.step()
    assert torch.equal(ours[0].bias.grad, torch.zeros(8))  # BN removes the bias: exactly zero
    assert base[0].bias.grad.abs().max() < 1e-5  # torch's is zero up to rounding
    for (n, p), q in zip(base.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


def test_batch_of_one_value_per_channel_fails_like_torch():
    torch_block = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)).train()
    block = copy.deepcopy(torch_block)
    patch(block)
    x = torch.randn(1, 4, 1, 1)
    for m in (torch_block, block):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            m(x)
    assert block[1].num_batches_tracked.item() == torch_block[1].num_batches_tracked.item() == 1
    torch.testing.assert_close(block.eval()(x), torch_block.eval()(x), rtol=1e-5, atol=1e-5)
