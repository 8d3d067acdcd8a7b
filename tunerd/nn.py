"""Drop-in torch modules backed by tunerd kernels.

`Conv1d/2d/3d` subclass the torch classes and only replace the convolution call, so their
state_dict, parameters and hooks are the torch ones. `ConvBNAct` fuses a conv with the
BatchNorm (and activation) that follows it, in three modes:

- eval:  BN's running statistics as the kernel's per-channel scale/shift epilogue.
- tune:  BN folded into the weights on every step (Efficient ConvBN "Tune mode"): gradients flow
         through the fold to W, gamma and beta; running statistics stay frozen.
- train: batch statistics with torch's BatchNorm semantics (momentum or cumulative averages,
         unbiased running variance, num_batches_tracked). The per-channel mean and variance come
         from the conv kernel's own epilogue (per-tile moments, merged stably), so the statistics
         need no second read of its output; normalisation and activation are then elementwise.

Fused modules keep the BN module where it was (now a pass-through), so state_dict keys and
optimizer parameter lists do not change when a model is patched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from tunerd.kernels import prologue
from tunerd.kernels.autograd import conv as _conv
from tunerd.kernels.convargs import is_tf_same_conv, is_timm_class, tf_same_padding
from tunerd.kernels.epilogue import LEAKY_SLOPE, activation_torch

from . import graphs

BN_MODES = ("train", "tune", "eval")

if TYPE_CHECKING:  # the mixins below only ever run inside torch's conv classes
    _ConvNd = nn.modules.conv._ConvNd
else:
    _ConvNd = object


def activation_name(m: nn.Module) -> str | None:
    """The epilogue's name for a torch activation module it can absorb, else None."""
    if type(m) is nn.GELU:
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if type(m) is nn.LeakyReLU:
        return "leaky_relu" if m.negative_slope == LEAKY_SLOPE else None
    return {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid"}.get(
        type(m)
    )


class _TunerdConv(_ConvNd):
    """Mixin over torch's _ConvNd: the convolution runs as a generated Triton kernel."""

    _ndim: int
    activation: str | None = None
    _tf_same = False  # padding from each input's size (timm's Conv2dSame), the kernel's own (low, high) pairs

    def _convolve(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **options: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """kernels.autograd.conv with this module's geometry and padding_mode."""
        padding: Any = self.padding
        if self._tf_same:
            padding = tf_same_padding(input.shape[-self._ndim :], self.kernel_size, self.stride, self.dilation)
        elif self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return _conv(input, weight, bias, self.stride, padding, self.dilation, self.groups, ndim=self._ndim, **options)

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **epilogue: Any
    ) -> torch.Tensor:
        return cast(torch.Tensor, self._convolve(input, weight, bias, **epilogue))  # no stats=True: y alone

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return graphs.run(self, input, self._forward)  # the plain forward unless CUDA graphs are enabled

    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias, activation=self.activation)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation}" if self.activation else "")


class Conv1d(_TunerdConv, nn.Conv1d):
    _ndim = 1

    def __init__(
        self, *args: Any, activation: str | None = None, cuda_graphs: bool | int = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.activation = activation
        use_cuda_graphs(self, cuda_graphs)


class Conv2d(_TunerdConv, nn.Conv2d):
    _ndim = 2

    def __init__(
        self, *args: Any, activation: str | None = None, cuda_graphs: bool | int = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.activation = activation
        use_cuda_graphs(self, cuda_graphs)


class Conv3d(_TunerdConv, nn.Conv3d):
    _ndim = 3

    def __init__(
        self, *args: Any, activation: str | None = None, cuda_graphs: bool | int = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.activation = activation
        use_cuda_graphs(self, cuda_graphs)


class Conv2dSame(Conv2d):
    """timm's Conv2dSame (TensorFlow 'SAME' padding computed per input size): the padding is the kernel's own,
    no padded copy of the input."""

    _tf_same = True


TUNERD_CONV: dict[type, type] = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}


def _is_tf_same(cls: type) -> bool:
    return issubclass(cls, nn.Conv2d) and is_tf_same_conv(cls)


def twin_class(cls: type) -> type | None:
    """The tunerd class a torch conv class is swapped for (torch's three, timm's Conv2dSame), else None."""
    return TUNERD_CONV.get(cls) or (Conv2dSame if _is_tf_same(cls) else None)


def use_cuda_graphs(module: nn.Module, cuda_graphs: bool | int) -> None:
    """cuda_graphs: False (off), True (tunerd.graphs.MAX_GRAPHS input signatures kept) or how many to keep: eval,
    no-grad CUDA calls of module replay captured CUDA graphs (tunerd.graphs)."""
    if cuda_graphs is False:
        graphs.disable(module)
    else:
        graphs.enable(module, graphs.MAX_GRAPHS if cuda_graphs is True else cuda_graphs)


class _FusedConvBN(_TunerdConv):
    """A conv that also applies the BatchNorm (and activation) that followed it in the model."""

    bn: nn.modules.batchnorm._BatchNorm  # not registered as a submodule: it stays in its place
    bn_mode: str = "train"

    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__["_tunerd_bn"]
        training = bn.training and self.bn_mode != "eval"
        if training and self.bn_mode == "tune":
            w, b = prologue.fold_bn(self.weight, self.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            return self._conv_forward(input, w, b, activation=self.activation)
        if training or not bn.track_running_stats:
            return self._batch_statistics(input, bn)
        scale, shift = prologue.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        return self._conv_forward(input, self.weight, self.bias, scale=scale, shift=shift, activation=self.activation)

    def _batch_statistics(self, input: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
        """torch's BatchNorm with batch statistics; the mean and variance come from the conv kernel itself."""
        z, mean, var = self._convolve(input, self.weight, None, stats=True)
        count = z.numel() // z.shape[1]
        factor: float | torch.Tensor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)  # the cumulative factor below stays on the device (no host read)
            factor = bn.num_batches_tracked.double().reciprocal() if bn.momentum is None else bn.momentum
        if count == 1:  # after counting the batch, as torch does
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()}")
        if bn.training and bn.track_running_stats:
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError("a BatchNorm that tracks running statistics has none")
            with torch.no_grad():  # torch's update, in float64 as its CPU kernel does
                batch_mean = mean.double() if self.bias is None else mean.double() + self.bias.double()
                unbiased = var.double() * (count / (count - 1))
                bn.running_mean.copy_(factor * batch_mean + (1.0 - factor) * bn.running_mean.double())
                bn.running_var.copy_(factor * unbiased + (1.0 - factor) * bn.running_var.double())
        if self.bias is not None:  # BN removes a conv bias: its gradient is zero (a tensor, as torch gives)
            mean = mean + self.bias.float() * 0.0
        shape = (1, -1) + (1,) * (z.dim() - 2)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        # never E[z^2] - E[z]^2: no cancellation for large means; a 16-bit z is promoted inside the subtraction
        centred = torch.sub(z, mean.reshape(shape).float())
        if bn.bias is None:
            y = centred * scale.reshape(shape)
        else:
            y = torch.addcmul(bn.bias.float().reshape(shape), centred, scale.reshape(shape))
        return activation_torch(self.activation, y.to(z.dtype))


class FusedConvBN1d(_FusedConvBN, nn.Conv1d):
    _ndim = 1


class FusedConvBN2d(_FusedConvBN, nn.Conv2d):
    _ndim = 2


class FusedConvBN3d(_FusedConvBN, nn.Conv3d):
    _ndim = 3


class FusedConvBN2dSame(FusedConvBN2d):
    _tf_same = True


FUSED_CONV: dict[type, type] = {nn.Conv1d: FusedConvBN1d, nn.Conv2d: FusedConvBN2d, nn.Conv3d: FusedConvBN3d}


class _PassThrough:
    """A module whose work a fused conv now does; it keeps its parameters and buffers."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


class _NormActPassThrough:
    """A BatchNorm + activation module (timm's BatchNormAct2d) whose normalisation a fused conv now does: it still
    applies its own drop and act children (a pass-through themselves where the conv absorbed the activation)."""

    drop: nn.Module
    act: nn.Module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(input))


_NORM_ACT = ("timm.layers.norm_act", "BatchNormAct2d")


def is_norm_act(m: nn.Module) -> bool:
    """Whether m is timm's BatchNormAct2d (or a subclass keeping its forward): torch's BatchNorm semantics, then its
    drop and act children, in one module. Recognised by its forward, so timm need not be importable here."""
    return (
        isinstance(m, nn.BatchNorm2d)
        and is_timm_class(type(m), *_NORM_ACT)
        and isinstance(getattr(m, "drop", None), nn.Module)
        and isinstance(getattr(m, "act", None), nn.Module)
    )


def pass_through_class(cls: type) -> type:
    """A subclass of cls (BatchNorm or activation) that returns its input unchanged; for a BatchNorm + activation
    module (is_norm_act), one that applies only its drop and act children."""
    name = f"FusedAway{cls.__name__}"
    base = _NormActPassThrough if is_timm_class(cls, *_NORM_ACT) else _PassThrough
    return _PASS_THROUGH.setdefault(cls, type(name, (base, cls), {"__module__": __name__}))


_PASS_THROUGH: dict[type, type] = {}


def fuse_conv_bn(conv: nn.Module, bn: nn.Module, act: nn.Module | None = None, bn_mode: str = "train") -> _FusedConvBN:
    """Fuse conv -> bn (-> act) in place: conv computes all three, bn and act become pass-throughs. Returns
    conv, now a fused conv."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    base = type(conv)
    cls = FUSED_CONV.get(base) or (FusedConvBN2dSame if _is_tf_same(base) else None)
    if cls is None:
        raise TypeError(f"cannot fuse into {base.__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the conv has {conv.out_channels} outputs")
    _swap_class(conv, cls)
    fused = cast(_FusedConvBN, conv)  # the class swap is beyond the type checker
    fused.__dict__["_tunerd_bn"] = bn
    fused.bn_mode = bn_mode
    fused.activation = activation_name(act) if act is not None else None
    for m in (bn, act):
        if m is not None:
            _swap_class(m, pass_through_class(type(m)))
    return fused


def _swap_class(m: nn.Module, cls: type) -> None:
    """Give m class cls, remembering its own (tunerd.patching restores it)."""
    vars(m)["_tunerd_orig_class"] = type(m)
    m.__class__ = cls


class ConvBNAct(nn.Module):
    """A standalone conv + BatchNorm + activation block (state_dict keys conv.*, bn.*).

    `bn_mode` picks how BN is applied while training ('train', 'tune' or 'eval'); in eval() it is
    always the running statistics, fused as the kernel's scale/shift epilogue.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        ndim: int = 2,
        activation: str | None = "relu",
        bn_mode: str = "train",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        cuda_graphs: bool | int = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
        bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]
        self.conv = conv_cls(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device, dtype=dtype
        )
        self.bn = bn_cls(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        fuse_conv_bn(self.conv, self.bn, None, bn_mode).activation = activation
        use_cuda_graphs(self.conv, cuda_graphs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
