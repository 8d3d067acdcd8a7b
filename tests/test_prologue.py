"""Weight prologue: weighted convolution's density (W (.) Phi) on the generated kernels, gradients included."""

import pytest
import torch

from tunerd import functional as F
from tunerd.kernels import conv as kconv
from tunerd.kernels import prologue


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kconv, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_density_is_the_separable_outer_product(ndim):
    alpha = torch.rand(5, dtype=torch.float64) + 0.5
    phi = prologue.density(alpha, ndim)
    assert phi.shape == (5,) * ndim
    idx = (4, 1, 3)[:ndim]
    assert phi[idx].item() == pytest.approx(float(torch.prod(alpha[list(idx)])))
    ref = alpha
    for _ in range(ndim - 1):
        ref = torch.einsum("...i,j->...ij", ref, alpha)
    torch.testing.assert_close(phi, ref, rtol=0, atol=0)


def test_apply_density_refuses_a_mismatched_shape():
    with pytest.raises(ValueError, match=r"density shape \(3, 3\) must equal the kernel shape \(5, 5\)"):
        prologue.apply_density(torch.randn(8, 4, 5, 5), torch.ones(3, 3))


def test_weighted_conv_on_the_kernels_matches_torch_with_gradients():
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    w = torch.randn(16, 4, 5, 5, requires_grad=True)
    alpha = (torch.rand(5) + 0.5).requires_grad_()
    y = F.conv2d(x, prologue.apply_density(w, prologue.density(alpha, 2)), padding=2, groups=2)
    xd, wd, ad = (t.detach().double().requires_grad_() for t in (x, w, alpha))
    ref = torch.nn.functional.conv2d(xd, wd * torch.outer(ad, ad), padding=2, groups=2)
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    gy = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, alpha), gy.float())
    want = torch.autograd.grad(ref, (xd, wd, ad), gy)
    for g, r in zip(got, want):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-5


def test_apply_density_keeps_the_weight_dtype():
    w = torch.randn(4, 2, 3, 3, dtype=torch.bfloat16)
    out = prologue.apply_density(w, prologue.density(torch.rand(3, dtype=torch.float64), 2))
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
