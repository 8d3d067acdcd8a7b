"""kernels.capture: the host-sync guard finds what a CUDA graph capture cannot hold, and patched timm models run
forward and backward under it in training and eval (on the interpreter: the CUDA launch path's logic, with only
the interpreter's own workspace check exempted, by name)."""

from __future__ import annotations

import copy

import models_zoo  # noqa: F401  (timm after tunerd, with torchvision's ops declared)
import pytest
import torch
from test_eca_resnet import _eca_resnet
from timm.models.convnext import ConvNeXt

import tunerd
from tunerd.kernels import capture, reference
from tunerd.kernels.autograd import conv
from tunerd.nn import ConvBNAct

pytestmark = pytest.mark.usefixtures("one_thread")

SYNCS = {
    "item": lambda t: t.sum().item(),
    "bool": lambda t: bool(t.sum() > 0),
    "float": lambda t: float(t.sum()),
    "tolist": lambda t: t.tolist(),
    "cpu": lambda t: t.cpu(),
    "numpy": lambda t: t.numpy(),
    "nonzero": lambda t: t.nonzero(),
    "mask": lambda t: t[t > 0],
    "unique": lambda t: torch.unique(t),
    "from host data": lambda t: torch.tensor([1.0, 2.0], device=t.device),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_guard_raises_on_every_host_sync(name):
    t = torch.randn(4, 3)
    SYNCS[name](t)  # fine without the guard
    with pytest.raises(capture.HostSyncError, match="not capturable"), capture.no_host_sync():
        SYNCS[name](t)


def test_guard_passes_device_work_and_counts_named_exemptions():
    t = torch.randn(4, 3)
    with capture.no_host_sync() as g:
        y = (t * 2).relu().sum(0).to(torch.float64)  # device-side work, a dtype change: no sync
        with capture.allow_host_sync("test: CPU only"):
            assert bool(y.sum() > -1e9)
    assert g.exempted == {"test: CPU only": 1} and not g.found
    with capture.no_host_sync(record=True) as g:
        t.sum().item()
        t.nonzero()
    assert len(g.found) == 2 and "host" in g.found[0] and "nonzero" in g.found[1]


def test_guard_sees_inside_custom_ops():
    """A sync inside a custom op's implementation (the torch.compile path runs tunerd's ops) is found too."""
    lib = torch.library.Library("tunerd_capture_test", "FRAGMENT")
    lib.define("scaled(Tensor x) -> Tensor")
    lib.impl("scaled", lambda x: x * x.max().item(), "CompositeExplicitAutograd")
    x = torch.randn(5)
    with pytest.raises(capture.HostSyncError, match="reads a tensor value"), capture.no_host_sync():
        torch.ops.tunerd_capture_test.scaled(x)


def test_conv_under_the_guard_takes_the_eager_path_and_matches():
    """The guard only observes: tunerd's conv still takes its eager (no custom-op) path, forward and backward."""
    x = torch.randn(2, 8, 6, 6, dtype=torch.float32, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    s, b = torch.rand(8, requires_grad=True), torch.randn(8, requires_grad=True)
    with capture.no_host_sync():
        y = conv(x, w, None, 1, 1, ndim=2, scale=s, shift=b, activation="relu")
        y.backward(torch.randn_like(y))
    xd, wd, sd, bd = (t.detach().double().requires_grad_() for t in (x, w, s, b))
    want = torch.relu(torch.nn.functional.conv2d(xd, wd, padding=1) * sd[:, None, None] + bd[:, None, None])
    assert reference.rel_error(y, want) < 1e-5
    assert x.grad is not None and s.grad is not None and b.grad is not None


def test_cumulative_batchnorm_counts_on_the_device():
    """momentum=None (cumulative averages): the factor 1/num_batches_tracked stays a device tensor."""
    torch.manual_seed(3)
    ours = ConvBNAct(4, 8, 3, padding=1, momentum=None)
    ref = copy.deepcopy(ours)
    tunerd.unpatch(ref)
    x = torch.randn(2, 4, 5, 5)
    for _ in range(2):
        with capture.no_host_sync():
            ours(x).sum().backward()
        torch.nn.functional.relu(ref.bn(ref.conv(x))).sum().backward()
    assert reference.rel_error(ours.bn.running_mean, ref.bn.running_mean.double()) < 1e-5
    assert reference.rel_error(ours.bn.running_var, ref.bn.running_var.double()) < 1e-5


def _head(model: torch.nn.Module, *names: str) -> torch.nn.Module:
    return torch.nn.Sequential(*(model.get_submodule(n) for n in names))


# a real model's first layers (each kind of patched module: fused conv + BN, fused blocks), small input
MODELS = {
    "timm_resnet": (lambda: _head(models_zoo.build("timm_resnet"), "conv1", "bn1", "act1", "layer1"), (2, 3, 8, 8)),
    "ecaresnet": (lambda: _head(_eca_resnet((1, 1, 1, 1)), "layer2"), (2, 32, 6, 6)),  # ResNet-D shortcut, ECA
    "convnext": (lambda: _head(ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)), "stem", "stages.0"), (2, 3, 16, 16)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_models_run_without_host_syncs(name):
    """Forward and backward in training mode (BatchNorm on batch statistics), eval with gradients, and eval
    without: nothing a capture cannot hold, and the launches ran under the guard (it saw their workspace check)."""
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make()
    report = tunerd.patch(model)
    assert report.fused or report.blocks, str(report)
    x = torch.randn(shape)
    for training in (True, False):
        model.train(training)
        with capture.no_host_sync() as g:
            model(x).sum().backward()
        assert g.exempted["interpreter workspace check"] > 0
    with torch.no_grad(), capture.no_host_sync():
        model(x)
